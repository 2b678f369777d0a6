"""The seam between generation and the speed paths: one Decoder per served model, built at load time.

Generation, the panels and the serving layer call a Decoder as they would call the GPT itself
(`decoder(idx, cache, last_only=...)`, `forward_with_attention`, `new_cache`). Prompts, batches and
the attention path run through the model's PyTorch forward; a single new token after a cache goes
through `step` when one was built for this model (the C int8 decode step, native.py). Nothing else ever
reaches into the model to switch paths.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import GPTConfig
from ..model import GPT, KVCache

Step = Callable[[torch.Tensor, KVCache], torch.Tensor]  # (idx (1, 1), cache) -> logits (1, 1, vocab)


class Decoder:
    def __init__(self, model: GPT, step: Step | None = None, kernel: str = "PyTorch"):
        self.model = model
        self.step = step
        self.kernel = kernel  # what decodes single tokens, for status lines: "PyTorch", "C decode step"

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        if self.step is not None and cache is not None and idx.shape == (1, 1):
            return self.step(idx, cache)
        return self.model(idx, cache, last_only=last_only)

    def forward_with_attention(self, idx: torch.Tensor, cache: KVCache | None = None,
                               last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_attention(idx, cache, last_only=last_only)

    def new_cache(self, max_len: int | None = None, batch_size: int = 1) -> KVCache:
        return self.model.new_cache(max_len, batch_size)

    def __repr__(self) -> str:
        return f"Decoder({type(self.model).__name__}, kernel={self.kernel!r})"


def as_decoder(model: GPT | Decoder) -> Decoder:
    """A Decoder for a plain GPT (PyTorch for every step); a Decoder as it is."""
    return model if isinstance(model, Decoder) else Decoder(model)
