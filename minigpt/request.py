"""What one reply is asked to be, as one value: the model (a Mode), its LoRA scale, the sampling settings,
the token budget and the seed. Built and validated once (the chat, Compare, the API and the CLI all make
it the same way), carried to the scheduler, stored on the reply and written in its export, so every
panel reads back exactly what drew the reply."""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from enum import Enum

from .lora_scale import check_scale
from .sampling import SamplingParams

MAX_SEED = 2**64 - 1  # seeds are 64-bit, as OpenAI's and vLLM's (torch's generator takes them)
DRAWN_SEEDS = 2**32  # a seed drawn at random is below this: short enough to read back and retype


class Mode(str, Enum):
    """Which model answers. The value is the label the page shows; framing is how a conversation is
    written for it (minigpt.prompts), api_id its name in the OpenAI-compatible API."""
    BASE = "Base GPT-2"
    TUNED = "Alpaca LoRA"

    def __str__(self) -> str:  # the label, in f-strings too (as Python 3.12's StrEnum would)
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def framing(self) -> str:
        return "dialogue" if self is Mode.BASE else "alpaca"

    @property
    def api_id(self) -> str:
        return "minigpt-base" if self is Mode.BASE else "minigpt-tuned"


@dataclass(frozen=True)
class ReplyRequest:
    mode: Mode
    params: SamplingParams
    max_new_tokens: int
    seed: int | None = None  # None: drawn when the reply starts (with_seed), so the reply records it
    scale: float = 1.0  # the LoRA scale, W + scale·ΔW (peft's word); a base-mode request keeps 1.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", Mode(self.mode))
        except ValueError:
            raise ValueError(f"mode must be {' or '.join(m.value for m in Mode)}, got {self.mode!r}") from None
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(self.params).__name__}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got {n!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
        object.__setattr__(self, "scale", check_scale(self.scale) if self.mode is Mode.TUNED else 1.0)

    def with_seed(self) -> ReplyRequest:
        """This request with its seed fixed: a random one if it has none."""
        return self if self.seed is not None else replace(self, seed=random.randrange(DRAWN_SEEDS))

    def describe(self) -> str:
        """'Alpaca LoRA at scale 0.5', or the mode's label at scale 1 and in base mode."""
        return self.mode.value if self.scale == 1 else f"{self.mode.value} at scale {self.scale:g}"
