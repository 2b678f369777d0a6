"""Dropout whose mask belongs to the example, not to the process or the micro-batch.

nn.Dropout draws its mask from the global RNG, so which mask an example gets depends on where it sits:
its rank under torchrun, its micro-batch under gradient accumulation. Then N processes of batch B no
longer train like one process of batch N x B. ExampleDropout draws each row's mask from a generator
seeded by (the row's key, this layer's index): the training loop keys every row by (seed, step,
position in the step's global batch) with `set_example_keys`, so a row gets the same mask however
the step is split. Padding does not matter: a row's mask is drawn position by position from its own
generator, so the first T positions are the same whatever the padded width.

Without keys (outside the training loop, or a model trained by other code) it is ordinary dropout.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK_MIX = 1_000_003  # spreads (key, layer) pairs over generator seeds


class ExampleDropout(nn.Module):
    def __init__(self, p: float, layer: int = 0):
        super().__init__()
        self.p = p
        self.layer = layer  # tells this layer's masks from the others' for the same example
        self.keys: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.keys is None:
            return F.dropout(x, self.p, training=True)
        if len(self.keys) != x.size(0):
            raise ValueError(f"{len(self.keys)} dropout keys for a batch of {x.size(0)} rows")
        keep = torch.stack([torch.rand(x.shape[1:], generator=self._generator(key)) >= self.p for key in self.keys])
        return x * keep.to(x.device) / (1 - self.p)  # drawn on the CPU: the same masks on every device

    def _generator(self, key: int) -> torch.Generator:
        return torch.Generator().manual_seed((key * MASK_MIX + self.layer) % (1 << 63))

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}"


def example_keys(seed: int, step: int, positions: list[int]) -> list[int]:
    """A key per row: the run's seed, the optimizer step, and the row's position in the step's global batch."""
    return [((seed * MASK_MIX + step) * MASK_MIX + position) % (1 << 62) for position in positions]


def set_example_keys(model: nn.Module, keys: list[int] | None) -> None:
    """Key the rows of the next forward (and backward) passes; None: back to ordinary dropout."""
    for module in model.modules():
        if isinstance(module, ExampleDropout):
            module.keys = keys
