"""LoRA adapters on disk in PEFT's format: read, check against a model, and merge into a copy of it.

A folder holds adapter_config.json and adapter_model.safetensors; tensor keys are
`base_model.model.<our module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r). Our
module paths mirror transformers' GPT-2, so the same files load in `peft` and here.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CheckpointError
from .hub import fetch
from .model import GPT

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# PEFT options that change what an adapter computes; we implement only their defaults.
UNSUPPORTED = ("use_dora", "use_rslora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "layer_replication", "target_parameters", "exclude_modules",
               "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "use_bdlora")


class AdapterError(CheckpointError):
    """An adapter that cannot be found, read, or applied to this model; the message says which and why."""


@dataclass(frozen=True)
class AdapterConfig:
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["c_attn"])
    base_model_name_or_path: str | None = None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_peft_json(self) -> dict:
        """The fields PEFT's LoraConfig reads; everything not listed keeps PEFT's default."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model_name_or_path,
                "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": self.target_modules, "fan_in_fan_out": True,  # GPT-2's Conv1D layers in transformers
                "bias": "none", "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
                "use_rslora": False, "use_dora": False}

    @classmethod
    def from_peft_json(cls, data: object, source: str = CONFIG_FILE) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise AdapterError(f"{source} must hold a JSON object")
        if data.get("peft_type") != "LORA":
            raise AdapterError(f"{source}: peft_type is {data.get('peft_type')!r}; only LORA adapters are supported")
        for key in UNSUPPORTED:
            if data.get(key):
                raise AdapterError(f"{source}: {key}={data[key]!r} is not supported")
        if data.get("bias", "none") != "none":
            raise AdapterError(f"{source}: bias={data['bias']!r} is not supported (only 'none')")
        r, alpha, dropout = data.get("r"), data.get("lora_alpha"), data.get("lora_dropout", 0.0)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterError(f"{source}: r must be a positive integer, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise AdapterError(f"{source}: lora_alpha must be a number, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise AdapterError(f"{source}: lora_dropout must be a number in [0, 1), got {dropout!r}")
        targets = data.get("target_modules")
        if not (isinstance(targets, str) or isinstance(targets, list) and targets
                and all(isinstance(t, str) for t in targets)):
            raise AdapterError(f"{source}: target_modules must be a module-name list or a regex, got {targets!r}")
        return cls(r, alpha, dropout, targets, data.get("base_model_name_or_path"))


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The (out, in) weight update scaling · B @ A, in float32 whatever the adapter dtype."""
    return (lora_b.float() @ lora_a.float()) * scaling


def match_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the transformer-block Linears that PEFT's target_modules rule selects.

    A list selects modules whose name equals an entry or ends in "." + entry (so "c_proj" takes both
    attn.c_proj and mlp.c_proj, "attn.c_proj" only the first); a string is a regex that must match the
    whole name; "all-linear" takes every block Linear. lm_head is never a target (it is tied to wte).
    """
    candidates = [name for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and name.startswith("transformer.h.") and ".lora_" not in name]
    if targets == "all-linear":
        return candidates
    if isinstance(targets, str):
        return [name for name in candidates if re.fullmatch(targets, name)]
    return [name for name in candidates if any(name == t or name.endswith(f".{t}") for t in targets)]


def resolve_adapter(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a Hub repo id, fetched (or read from the cache) with snapshot_download."""
    return fetch(name_or_path, [CONFIG_FILE, WEIGHTS_FILE], "adapter", AdapterError)


def read_adapter(folder: Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """(config, tensors keyed by our module names, e.g. `transformer.h.0.attn.c_attn.lora_A.weight`)."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"missing {path.name} in {folder}")
    try:
        config = AdapterConfig.from_peft_json(json.loads(config_path.read_text()), str(config_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path} is not valid JSON: {e}") from None
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights_path} is truncated or corrupt: {e}") from None
    return config, {key.removeprefix(PEFT_PREFIX): t for key, t in tensors.items()}


def adapter_deltas(model: GPT, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check the adapter against model, strictly, and return each targeted module's float32 weight update."""
    targets = match_targets(model, config.target_modules)
    if not targets:
        raise AdapterError(f"target_modules={config.target_modules!r} selects no Linear module of this model")
    expected = {f"{name}.lora_{ab}.weight" for name in targets for ab in "AB"}
    unexpected = sorted(tensors.keys() - expected, key=_natural)
    if unexpected:
        module = unexpected[0].rsplit(".lora_", 1)[0]
        why = "which target_modules does not select" if _has_module(model, module) else \
            f"a module this {model.config.n_layer}-layer model does not have: the adapter was made for another base"
        raise AdapterError(f"adapter has unexpected tensor {unexpected[0]}, {why}")
    missing = sorted(expected - tensors.keys(), key=_natural)
    if missing:
        raise AdapterError(f"adapter is missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    deltas = {}
    for name in targets:
        linear = model.get_submodule(name)
        a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        if a.dim() != 2 or b.dim() != 2 or a.size(0) != config.r or b.size(1) != config.r:
            raise AdapterError(f"adapter tensors of {name} have shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                               f"expected (r, in) and (out, r) with r={config.r}")
        if (a.size(1), b.size(0)) != (linear.in_features, linear.out_features):
            raise AdapterError(
                f"adapter expects {name} with in_features={a.size(1)}, out_features={b.size(0)}, but the model has "
                f"{linear.in_features}, {linear.out_features} (n_embd={model.config.n_embd}): "
                "it was made for another base model")
        deltas[name] = lora_delta(a, b, config.scaling)
    return deltas


def load_tuned_model(base: GPT, adapter: str | Path) -> GPT:
    """A new GPT with the adapter merged in, sharing every other tensor with base; base is not modified.

    The targeted weights become base weight + update, computed in float32 and cast back to the base's
    dtype and device. Base and tuned models can then serve requests at the same time on any threads.
    """
    config, tensors = read_adapter(resolve_adapter(adapter))
    return merge_deltas(base, adapter_deltas(base, config, tensors))


def merge_deltas(base: GPT, deltas: dict[str, torch.Tensor], scale: float = 1.0) -> GPT:
    """A copy of base sharing every tensor but the targets of deltas, whose weights become W + scale · ΔW."""
    tuned = base.copy_sharing_weights()
    for name, delta in deltas.items():
        linear = tuned.get_submodule(name)
        linear.weight = merged_weight(linear.weight, delta, scale, name)
    return tuned


@torch.no_grad()
def merged_weight(weight: torch.Tensor, delta: torch.Tensor, scale: float, name: str) -> nn.Parameter:
    """W + scale · ΔW computed in float32, in W's dtype, device and memory order (a new tensor)."""
    merged = torch.empty_like(weight)
    merged.copy_(weight.float() + (delta if scale == 1 else delta * scale).to(weight.device))
    if not merged.isfinite().all():  # as peft's safe_merge: a NaN/inf tensor or lora_alpha poisons every reply
        raise AdapterError(f"adapter makes the weight of {name} NaN or infinite: its tensors or lora_alpha "
                           "are corrupt")
    return nn.Parameter(merged, requires_grad=False)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _natural(key: str) -> list:
    """Sort key that puts h.2 before h.10."""
    return [int(part) if part.isdigit() else part for part in key.split(".")]
