"""Streaming generation: prefill the prompt into a KV cache, then decode one token per step.

`generate` is a Python generator that yields a TokenEvent per token. All compute happens inside
next(): a consumer that stops iterating (or calls close()) stops the model with it.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import tiktoken
import torch

from .model import GPT
from .sampling import SamplingParams, sample
from .tokenizer import EOT


@dataclass
class TokenEvent:
    token_id: int
    text: str  # UTF-8-safe text delta: "" while a character is still incomplete or held back by a stop string
    logprob: float  # log-probability of this token under the model's raw (unfiltered, temperature 1) distribution
    top: list[tuple[int, float]]  # the top-N alternatives (token id, raw log-probability), most likely first
    attention: torch.Tensor | None = None  # (n_layer, n_head, S): the attention rows of the query that chose this token
    finish_reason: str | None = None  # on the last event: "eos", "stop" (a stop string) or "length"


def fit_to_context(prompt_ids: Sequence[int], max_new_tokens: int, context: int) -> tuple[list[int], int]:
    """The context-window rule: prompt + new tokens never exceed `context`.

    max_new_tokens is capped at context - 1 (at least one prompt token must remain); an over-long
    prompt keeps its most recent tokens, leaving room for all the requested new tokens.
    Returns (prompt ids to use, new-token budget).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_new_tokens = min(max_new_tokens, context - 1)
    keep = context - max_new_tokens
    return list(prompt_ids[-keep:]), max_new_tokens


class StreamDecoder:
    """Token ids -> text deltas that never split a UTF-8 character, holding back a possible stop string."""

    def __init__(self, tokenizer: tiktoken.Encoding, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds incomplete sequences back
        self.pending = ""  # decoded text not yet emitted because it may begin a stop string

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text to emit now, whether a stop string was reached)."""
        self.pending += self.utf8.decode(self.tokenizer.decode_single_token_bytes(token_id))
        for s in self.stop:
            if (i := self.pending.find(s)) >= 0:
                text, self.pending = self.pending[:i], ""
                return text, True
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:n])), default=0)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending + self.utf8.decode(b"", final=True), ""
        return text


@torch.inference_mode()
def _step(model: GPT, ids: torch.Tensor, cache, with_attention: bool):
    if with_attention:
        logits, att = model.forward_with_attention(ids, cache, last_only=True)
        return logits[0, -1].float(), att[:, 0, :, -1, :].float()  # (n_layer, nh, S)
    return model(ids, cache, last_only=True)[0, -1].float(), None


def generate(model: GPT, tokenizer: tiktoken.Encoding, prompt_ids: Sequence[int], max_new_tokens: int = 100,
             params: SamplingParams = SamplingParams(), seed: int | None = None, stop: Sequence[str] = (),
             top_n: int = 5, return_attention: bool = False) -> Iterator[TokenEvent]:
    """Stream up to max_new_tokens tokens after prompt_ids (see fit_to_context for over-long prompts).

    Stops at <|endoftext|>, at the first stop string (the text before it is emitted, the stop
    string is not), or at the token budget. Same seed and inputs give the same tokens.
    """
    device = model.lm_head.weight.device
    eot_id = tokenizer.encode_single_token(EOT)
    prompt, max_new_tokens = fit_to_context(list(prompt_ids) or [eot_id], max_new_tokens, model.config.n_positions)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    cache = model.new_cache(len(prompt) + max_new_tokens)
    decoder = StreamDecoder(tokenizer, stop)

    # The first step reads the whole prompt and its logits choose the first token. With attention
    # asked for, the last prompt token gets that step alone, so every step's attention is a single
    # row per head rather than a prompt's (T, S) maps for every layer.
    unread = prompt
    if return_attention and len(prompt) > 1:
        _step(model, torch.tensor([prompt[:-1]], device=device), cache, with_attention=False)
        unread = prompt[-1:]
    ids = torch.tensor([unread], device=device)
    next_ids = torch.empty(1, 1, dtype=torch.long, device=device)  # every later step: one token, written in place
    for i in range(max_new_tokens):
        logits, attention = _step(model, ids, cache, return_attention)
        token = int(sample(logits, params, generator))
        logprobs = logits.log_softmax(dim=-1)
        top = torch.topk(logprobs, top_n)
        text, hit_stop = decoder.push(token) if token != eot_id else ("", False)
        finish = "eos" if token == eot_id else "stop" if hit_stop else "length" if i == max_new_tokens - 1 else None
        if finish in ("eos", "length"):
            text += decoder.flush()
        yield TokenEvent(token, text, float(logprobs[token]), list(zip(top.indices.tolist(), top.values.tolist())),
                         attention, finish)
        if finish:
            return
        ids = next_ids.fill_(token)
