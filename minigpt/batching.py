"""Continuous batching: many sequences decoding together, one forward pass per step for all of them.

A Stream is one sequence being generated: its KV cache, sampler settings, random generator, token
budget and stop strings. The serving layer's scheduler (minigpt/serve/scheduler.py) keeps a set of
streams and, every step, reads the next chunk of a waiting prompt (`Stream.prefill`) and then decodes one
token for every stream past its prompt in one call (`decode`); prompts that arrive together are read
in one pass (`prefill_together`). Streams join and leave between steps.

Each stream keeps its own cache and its own generator, so what it produces does not depend on its
neighbours: with the C decode step a row is computed exactly as it would be alone, and the tokens and
log-probs equal generation.generate's for the same inputs and seed (tests/minigpt/test_batching.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import tiktoken
import torch

from .generation import StreamDecoder, TokenEvent, fit_to_context, new_history, token_event
from .model import GPT
from .sampling import SamplingParams, sample
from .speed.decoder import Decoder, as_decoder, read_prompts, step_rows
from .tokenizer import EOT


class Stream:
    """One sequence's generation state, advanced from outside: prefill() until `prefilled`, then one
    token per decode() step until `finished`. Sampling follows generation.generate exactly."""

    def __init__(self, model: GPT | Decoder, tokenizer: tiktoken.Encoding, prompt_ids: Sequence[int],
                 max_new_tokens: int, params: SamplingParams, seed: int, stop: Sequence[str] = (),
                 top_n: int = 5, forced: Sequence[int] = ()):
        self.model, self.params, self.top_n = as_decoder(model), params, top_n
        self.eot_id = tokenizer.encode_single_token(EOT)
        prompt, self.budget = fit_to_context(list(prompt_ids) or [self.eot_id], max_new_tokens,
                                             self.model.config.n_positions)
        if len(forced) > self.budget:
            raise ValueError(f"{len(forced)} forced tokens exceed the budget of {self.budget} new tokens")
        self.history = new_history(params, tokenizer, prompt)  # for the stages that read the sequence so far
        self.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        self.cache = self.model.new_cache(len(prompt) + self.budget)
        self.unread = prompt  # prompt tokens not yet in the cache
        self.forced = list(forced)
        self.decoder = StreamDecoder(tokenizer, stop)
        self.produced = 0
        self.last: int | None = None  # the newest token, not yet in the cache
        self.finished = False

    @property
    def prefilled(self) -> bool:
        return not self.unread

    @torch.inference_mode()
    def prefill(self, max_tokens: int) -> list[TokenEvent]:
        """Read up to max_tokens more prompt tokens into the cache. The last chunk also gives the first
        token (or, for a branch, reads the forced tokens with it and gives their events)."""
        chunk, self.unread = self.unread[:max_tokens], self.unread[max_tokens:]
        device = self.model.device
        if self.unread:
            self.model(torch.tensor([chunk], device=device), self.cache, last_only=True)
            return []
        if not self.forced:
            return [self.draw(self.model(torch.tensor([chunk], device=device), self.cache, last_only=True)[0, -1])]
        # A branch: the forced tokens are read with the prompt's end in one pass, which also gives the
        # logits each one was chosen over.
        logits = self.model(torch.tensor([chunk + self.forced[:-1]], device=device), self.cache)[0].float()
        return [self.emit(token, row) for token, row in zip(self.forced, logits[len(chunk) - 1:])
                if not self.finished]

    def draw(self, logits: torch.Tensor) -> TokenEvent:
        """The next token, sampled from logits (vocab,) with this stream's settings and generator."""
        logits = logits.float()
        return self.emit(int(sample(logits, self.params, self.generator, self.history)), logits)

    def emit(self, token: int, logits: torch.Tensor) -> TokenEvent:
        """The event of a token chosen over logits (vocab,); the stream finishes on EOS, a stop string or
        its budget."""
        self.produced += 1
        self.last = token
        if self.history is not None:
            self.history.add(token)
        event = token_event(token, logits, self.decoder, self.eot_id, self.top_n, self.produced == self.budget)
        self.finished = event.finish_reason is not None
        return event


@torch.inference_mode()
def decode(streams: Sequence[Stream]) -> list[TokenEvent]:
    """One token for every stream (each prefilled, none finished), in one batched step."""
    logits = step_rows([s.model for s in streams], [s.last for s in streams], [s.cache for s in streams])
    return [s.draw(row) for s, row in zip(streams, logits)]


@torch.inference_mode()
def prefill_together(streams: Sequence[Stream]) -> list[list[TokenEvent]]:
    """Read the whole prompts of several new streams of one model in one pass (decoder.read_prompts), and draw
    each one's first token: [[its first event]] per stream. Not for branches (forced tokens)."""
    logits = read_prompts([s.model for s in streams], [s.unread for s in streams], [s.cache for s in streams])
    for stream in streams:
        stream.unread = []
    return [[stream.draw(row)] for stream, row in zip(streams, logits)]
