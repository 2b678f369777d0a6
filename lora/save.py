"""Write a trained adapter as a PEFT adapter folder: adapter_config.json + adapter_model.safetensors."""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from minigpt.adapters import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, AdapterConfig
from minigpt.atomic import atomic_write, save_tensors

from .layer import lora_parameters


def save_adapter(model: nn.Module, folder: str | Path, config: AdapterConfig) -> Path:
    """Write the LoRA tensors of an injected model as a PEFT adapter folder (each file atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + name: p.detach().contiguous() for name, p in lora_parameters(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA layers to save")
    save_tensors(tensors, folder / WEIGHTS_FILE, {"format": "pt"})
    with atomic_write(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config.to_peft_json(), indent=2) + "\n")
    return folder
