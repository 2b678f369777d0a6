"""The LoRA layer and its injection into a GPT.

    x ──► frozen W, b ───────────────────────────┐
    │                                             (+) ──► y = W x + b + (alpha / r) · B A dropout(x)
    └─► dropout ──► A (r × in) ──► B (out × r) ──┘

A starts Kaiming-uniform and B at zero (as in PEFT), so a fresh adapter leaves the model unchanged.
lora_A / lora_B are bias-free nn.Linear modules, which gives state-dict keys of the form
`...c_attn.lora_A.weight`: PEFT's on-disk names once prefixed with `base_model.model.`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.adapters import lora_delta, match_targets
from minigpt.dropout import ExampleDropout


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, device=None, dtype=None):
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.r = r
        self.scaling = alpha / r
        self.lora_dropout = ExampleDropout(dropout) if dropout > 0 else nn.Identity()  # masks keyed by example
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.reset_lora_parameters()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Wrap an existing Linear, reusing (not copying) its weight and bias, which become frozen."""
        w = linear.weight
        with torch.device("meta"):  # skip allocating and initialising a base weight we discard
            layer = cls(linear.in_features, linear.out_features, r, alpha, dropout, linear.bias is not None)
        layer.weight, layer.bias = w, linear.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.lora_A.to_empty(device=w.device).to(w.dtype)
        layer.lora_B.to_empty(device=w.device).to(w.dtype)
        layer.reset_lora_parameters()
        return layer

    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (float32 arithmetic); forward then skips the LoRA branch."""
        if not self.merged:
            self.weight.copy_(self.weight.float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self.weight.float() - self.delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)  # scale the narrow r-wide tensor

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def inject_lora(model: nn.Module, targets: str | Sequence[str], r: int, alpha: float,
                dropout: float = 0.0) -> list[str]:
    """Replace the targeted Linears with LoRALinear in place and freeze everything but lora_A / lora_B.

    Returns the replaced module names; raises ValueError when nothing matches.
    """
    names = match_targets(model, targets)
    if not names:
        raise ValueError(f"no Linear module matches target_modules={targets!r} (try c_attn, c_proj, c_fc)")
    model.requires_grad_(False)
    for i, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = LoRALinear.from_linear(getattr(owner, child), r, alpha, dropout)
        if isinstance(layer.lora_dropout, ExampleDropout):
            layer.lora_dropout.layer = i  # each layer its own masks
        setattr(owner, child, layer)
    return names


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by our names: `transformer.h.0.attn.c_attn.lora_A.weight`, ..."""
    return {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
