"""The seam between generation and the speed paths: one Decoder per served model, built at load time.

Generation, the panels and the serving layer call a Decoder as they would call the GPT itself
(`decoder(idx, cache, last_only=...)`, `forward_with_attention`, `new_cache`). Batches without a cache
and the attention path run through the model's PyTorch forward; a single new token after a cache goes
through `step` when one was built for this model (the C decode step, native.py), and so does a prompt
read into a cache where the C step reads prompts faster than PyTorch (int8 in AMX tiles, and int4: every
prompt token then computed exactly as when decoded one at a time). Nothing else ever reaches into the model to
switch paths.

step_rows decodes one token for each of several sequences at once (continuous batching): through one
C call when every row's decoder has the C step, else through each model's PyTorch decode_rows.
read_prompts reads several new prompts at once, through one C call or one PyTorch pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..config import GPTConfig
from ..model import GPT, KVCache
from . import native
from .int4 import Int4Linear
from .quantize import Int8Linear

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

    @property
    def precision(self) -> str:
        """'int4', 'int8', or the weights' float dtype ('float32', 'bfloat16', ...): for status lines."""
        if isinstance(self.model.transformer.h[0].mlp.c_fc, Int4Linear):
            return "int4"
        if isinstance(self.model.lm_head, Int8Linear):
            return "int8"
        return str(self.model.lm_head.weight.dtype).removeprefix("torch.")

    @property
    def reads_prompts(self) -> bool:
        """Whether prompts read into a cache go through the C step (see native.NativeDecoder.reads_prompts)."""
        return isinstance(self.step, native.NativeDecoder) and self.step.reads_prompts

    def __call__(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        if self.step is not None and cache is not None and idx.shape == (1, 1):
            return self.step(idx, cache)
        if cache is not None and last_only and idx.size(0) == 1 and self.reads_prompts:
            return native.read_tokens([self.step], idx.tolist(), [cache]).view(1, 1, -1)
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


def step_rows(decoders: Sequence[Decoder], tokens: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
    """Float32 logits (n, vocab) of one new token for each of n sequences: row i is tokens[i] after caches[i],
    decoded by decoders[i] (rows may mix models: base, tuned, any LoRA scale). With the C step everywhere,
    one call reads each weight once for all the rows that share it, and computes every row exactly as it
    would alone; otherwise each model's rows share one PyTorch forward (equal to a lone row's to float
    rounding)."""
    steps = [d.step for d in decoders]
    if all(isinstance(s, native.NativeDecoder) for s in steps):
        return native.step_rows(steps, tokens, caches)
    logits = torch.empty(len(tokens), decoders[0].config.vocab_size, device=decoders[0].device)
    by_model: dict[int, list[int]] = {}
    for i, decoder in enumerate(decoders):
        by_model.setdefault(id(decoder.model), []).append(i)
    for rows in by_model.values():
        model = decoders[rows[0]].model
        idx = torch.tensor([[tokens[i]] for i in rows], device=model.device)
        logits[rows] = model.decode_rows(idx, [caches[i] for i in rows])[:, 0].float()
    return logits


def read_prompts(decoders: Sequence[Decoder], prompts: Sequence[Sequence[int]], caches: Sequence[KVCache]
                 ) -> torch.Tensor:
    """Float32 logits (n, vocab) after each of n prompts, prompts[i] read into the empty caches[i] by
    decoders[i], all in one pass: one C call where every decoder's C step reads prompts, else one PyTorch
    forward (GPT.prefill_rows: the decoders must then share one model)."""
    if all(decoder.reads_prompts for decoder in decoders):
        return native.read_tokens([decoder.step for decoder in decoders], prompts, caches)
    if len({id(decoder.model) for decoder in decoders}) != 1:
        raise ValueError("a PyTorch pass reads the prompts of one model")
    return decoders[0].model.prefill_rows([list(p) for p in prompts], caches)
