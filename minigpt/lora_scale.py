"""LoRA scale: the adapter's update scaled per request, W + s · ΔW, with no reload and no global state.

Scale 0 is the base model and 1 the tuned (merged) one, exactly: both are the decoders loaded at
start. Any other scale gets a model built on first use, as the tuned one was: a copy sharing every
tensor with the base except the targeted weights, merged from their float values and the adapter's
float32 updates, then given the same precision treatment (int8, oneDNN, the C step). A small LRU
keeps the last few, so sessions asking for different scales at once each get their own model.
"""
from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .adapters import merged_weight
from .model import GPT
from .speed.decoder import Decoder

MAX_SCALE = 2.0
CACHED_SCALES = 4  # models kept for scales other than 0 and 1; each costs one copy of the targeted weights


class AdapterScale:
    """Decoders for any adapter scale in [0, MAX_SCALE]; thread-safe.

    float_targets holds, for each targeted module name, the float Linear the update merges into: the
    base model's own module for float precisions (no extra memory), a kept float copy for int8 (whose
    float weights are gone after quantization). finish applies the precision to a freshly merged model.
    """

    def __init__(self, base: Decoder, tuned: Decoder, deltas: dict[str, torch.Tensor],
                 float_targets: dict[str, nn.Linear], finish: Callable[[GPT], Decoder],
                 capacity: int = CACHED_SCALES):
        self.base, self.tuned = base, tuned
        self.deltas, self.float_targets, self.finish = deltas, float_targets, finish
        self.capacity = capacity
        self.cache: OrderedDict[float, Decoder] = OrderedDict()
        self.lock = threading.Lock()  # guards the cache; scales 0 and 1 never take it

    def decoder(self, scale: float) -> Decoder:
        """The decoder for W + scale · ΔW: the loaded base or tuned one for 0 and 1, else built or cached."""
        scale = check_scale(scale)
        if scale == 0:
            return self.base
        if scale == 1:
            return self.tuned
        with self.lock:
            if scale in self.cache:
                self.cache.move_to_end(scale)
                return self.cache[scale]
            decoder = self.finish(self.merged(scale))
            self.cache[scale] = decoder
            if len(self.cache) > self.capacity:
                self.cache.popitem(last=False)  # a reply still using it keeps it alive until it ends
            return decoder

    def merged(self, scale: float) -> GPT:
        """A copy of the base model whose targeted Linears are float W + scale · ΔW (before finish)."""
        model = self.base.model.copy_sharing_weights()
        for name, delta in self.deltas.items():
            source = self.float_targets[name]
            linear = copy.deepcopy(source, memo={id(t): t for t in source.parameters()})  # shares the bias
            linear.weight = merged_weight(source.weight, delta, scale, name)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
        return model


def check_scale(scale: float) -> float:
    """A scale as a cache key (rounded to 1e-4), or ValueError when it is outside [0, MAX_SCALE]."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"LoRA scale must be a number, got {scale!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SCALE:
        raise ValueError(f"LoRA scale must be between 0 and {MAX_SCALE:g}, got {scale!r}")
    return round(value, 4)
