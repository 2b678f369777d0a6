"""From-scratch LoRA training for MiniGPT's GPT-2: the layer, its injection, Alpaca data, the training run.

Reading and applying adapters is the model library's job (minigpt.adapters); it is re-exported here
for scripts that train and then load.
"""
from minigpt.adapters import (
           AdapterConfig,
           AdapterError,
           load_tuned_model,
           match_targets,
           read_adapter,
)
from minigpt.prompts import alpaca_prompt

from .layer import LoRALinear, inject_lora, lora_parameters
from .save import save_adapter

__all__ = ["AdapterConfig", "AdapterError", "LoRALinear", "alpaca_prompt", "inject_lora", "load_tuned_model",
           "lora_parameters", "match_targets", "read_adapter", "save_adapter"]
