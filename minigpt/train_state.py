"""Training checkpoints: trained tensors, optimizer, learning-rate schedule and step in one safetensors file.

Tensors go in as tensors, everything else as JSON in the file's metadata, so nothing is pickled,
and the whole file is replaced atomically: a run killed mid-write leaves the previous checkpoint.
There is no RNG state to keep: dropout masks are a function of (seed, step, example).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .atomic import save_tensors
from .schedule import Schedule

STATE_FILE = "training_state.safetensors"


@dataclass
class TrainingState:
    step: int  # optimizer steps completed
    schedule: Schedule  # the learning rate's segments; the last one's end is the planned length
    run: dict  # the options that determine the trajectory; a resume must use the same ones
    params: dict[str, torch.Tensor]  # the trained tensors: a LoRA adapter, or a whole model
    optimizer: dict
    evaluation: dict  # held-out examples per evaluation, best loss and its step, evaluations since: "examples",
    # "best_loss", "best_step", "since_best" (empty before the first evaluation)


def save_state(path: Path, state: TrainingState) -> None:
    tensors = {f"params.{k}": v.detach().contiguous() for k, v in state.params.items()}
    for index, per_param in state.optimizer["state"].items():
        tensors |= {f"optimizer.{index}.{k}": v for k, v in per_param.items()}
    metadata = {"step": str(state.step), "total": str(state.schedule.total), "run": json.dumps(state.run),
                "param_groups": json.dumps(state.optimizer["param_groups"]),
                "schedule": json.dumps(state.schedule.to_json()), "evaluation": json.dumps(state.evaluation)}
    save_tensors(tensors, path, metadata)


def load_state(path: Path) -> TrainingState:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        params = {k.removeprefix("params."): v for k, v in tensors.items() if k.startswith("params.")}
        per_param: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = v
        param_groups = json.loads(metadata["param_groups"])
        for group in param_groups:
            group["betas"] = tuple(group["betas"])
        run = json.loads(metadata["run"])
        if "schedule" in metadata:
            schedule = Schedule.from_json(json.loads(metadata["schedule"]))
        else:  # written before schedules had segments: one warm-up + cosine over `total` steps
            schedule = Schedule.new(int(metadata["total"]), run.get("warmup_steps"))
        optimizer = {"state": per_param, "param_groups": param_groups}
        return TrainingState(int(metadata["step"]), schedule, run, params, optimizer,
                             json.loads(metadata.get("evaluation", "{}")))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"cannot resume from {path}: the checkpoint is unreadable ({e})") from None
