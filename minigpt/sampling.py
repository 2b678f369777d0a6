"""Turning next-token logits into a choice: temperature, top-k, top-p, greedy.

Order (as in transformers' logits warpers): temperature scales, top-k keeps the k most likely,
top-p keeps the smallest set whose probability reaches p. The most likely token always survives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None or 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {k!r}")
        if not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_stages(logits: torch.Tensor, params: SamplingParams) -> list[tuple[str, torch.Tensor]]:
    """The sampler's pipeline, stage by stage: [("raw", logits), ("temperature", ...), ("top-k", ...),
    ("top-p", ...)] as logits (..., vocab), filtered tokens at -inf; a stage that is off is left out.
    The last stage is what sample() draws from (after a softmax); greedy has the raw stage only.
    The chat's sampling panel shows these same tensors."""
    stages = [("raw", logits)]
    if params.greedy:
        return stages
    best = logits.argmax(dim=-1, keepdim=True)  # the most likely token survives every filter below
    # top-k is chosen on the unscaled logits: the same set (temperature keeps the order), without the
    # ties that dividing by a huge temperature would round distinct logits into.
    outside_top_k = None
    if params.top_k and params.top_k < logits.size(-1):
        outside_top_k = logits < torch.topk(logits, params.top_k).values[..., -1:]
    # Shift the max to 0 and never divide by less than the dtype's smallest normal number, so a
    # temperature like 1e-320 acts as greedy instead of giving inf - inf = nan.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(params.temperature, torch.finfo(logits.dtype).tiny)
    stages.append(("temperature", logits))
    if outside_top_k is not None:
        logits = logits.masked_fill(outside_top_k, float("-inf"))
        stages.append(("top-k", logits))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        # Kept explicitly: a p that rounds to 0, or a huge temperature that rounds logits into a tie,
        # would otherwise let sorting pick another token as "the top".
        drop.scatter_(-1, best, False)
        stages.append(("top-p", logits.masked_fill(drop, float("-inf"))))
    return stages


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Logits (..., vocab) with temperature applied and tokens outside top-k / top-p set to -inf."""
    return filter_stages(logits, params)[-1][1]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (..., vocab): argmax when greedy, else a draw from the filtered distribution."""
    if params.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
