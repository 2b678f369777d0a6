"""From-scratch LoRA for MiniGPT's GPT-2: the layer, PEFT-format adapter files, Alpaca data and training."""
from .adapter import AdapterConfig, AdapterError, load_tuned_model, read_adapter, save_adapter
from .alpaca import alpaca_prompt
from .layer import LoRALinear, inject_lora, lora_parameters, match_targets

__all__ = ["AdapterConfig", "AdapterError", "LoRALinear", "alpaca_prompt", "inject_lora", "load_tuned_model",
           "lora_parameters", "match_targets", "read_adapter", "save_adapter"]
