"""Training checkpoints: adapter, optimizer, scheduler, step and RNG state in one safetensors file.

Tensors go in as tensors, everything else as JSON in the file's metadata, so nothing is pickled,
and the whole file is replaced atomically: a run killed mid-write leaves the previous checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write

STATE_FILE = "training_state.safetensors"


@dataclass
class TrainingState:
    step: int  # optimizer steps completed
    run: dict  # the options that determine the trajectory; a resume must use the same ones
    lora: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict[str, torch.Tensor]


def save_state(path: Path, state: TrainingState) -> None:
    tensors = {f"lora.{k}": v.detach().contiguous() for k, v in state.lora.items()}
    tensors |= {f"rng.{k}": v for k, v in state.rng.items()}
    for index, per_param in state.optimizer["state"].items():
        tensors |= {f"optimizer.{index}.{k}": v for k, v in per_param.items()}
    metadata = {"step": str(state.step), "run": json.dumps(state.run),
                "param_groups": json.dumps(state.optimizer["param_groups"]),
                "scheduler": json.dumps(state.scheduler)}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_state(path: Path) -> TrainingState:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        lora = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
        rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = v
        param_groups = json.loads(metadata["param_groups"])
        for group in param_groups:
            group["betas"] = tuple(group["betas"])
        return TrainingState(int(metadata["step"]), json.loads(metadata["run"]), lora,
                             {"state": per_param, "param_groups": param_groups}, json.loads(metadata["scheduler"]), rng)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"cannot resume from {path}: the checkpoint is unreadable ({e})") from None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
