"""Data for the chat app's analysis panels: token texts, probability bands, top alternatives, timings.

Probabilities are the raw model distribution (temperature 1, before top-k/top-p), as generate() reports them.
"""
from __future__ import annotations

import math

import numpy as np
import tiktoken

from .replies import Reply

# Probability bands for colouring tokens, most likely first: (lower bound, label, colour).
BANDS = [(0.5, "p ≥ 0.5", "#4caf50"), (0.1, "0.1 ≤ p < 0.5", "#cddc39"),
         (0.01, "0.01 ≤ p < 0.1", "#ff9800"), (0.0, "p < 0.01", "#f44336")]


def token_text(tokenizer: tiktoken.Encoding, token_id: int) -> str:
    """One token's text on its own (a byte of a split UTF-8 character shows as U+FFFD)."""
    return tokenizer.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


def band(prob: float) -> str:
    return next(label for lower, label, _ in BANDS if prob >= lower)


def alternatives(reply: Reply, tokenizer: tiktoken.Encoding, position: int) -> dict[str, float]:
    """The top alternatives at a 1-based position of the reply: {quoted token text: probability}."""
    if not 1 <= position <= len(reply.token_ids):
        raise ValueError(f"position {position} is outside the reply (1..{len(reply.token_ids)})")
    result: dict[str, float] = {}
    for token_id, logprob in reply.top[position - 1]:
        label = repr(token_text(tokenizer, token_id))
        result[label if label not in result else f"{label} (id {token_id})"] = math.exp(logprob)
    return result


def position_caption(reply: Reply, tokenizer: tiktoken.Encoding, position: int) -> str:
    chosen = reply.token_ids[position - 1]
    return (f"Token {position} of {len(reply.token_ids)}: chose {token_text(tokenizer, chosen)!r} with "
            f"p = {math.exp(reply.logprobs[position - 1]):.3f}. Top {len(reply.top[position - 1])} alternatives, "
            "raw model distribution (temperature 1, before top-k/top-p).")


def token_durations(reply: Reply) -> np.ndarray:
    """Milliseconds per token: the first includes reading the prompt, each later one is a decode step
    (speculative decoding delivers several tokens per step: the first carries the step's time)."""
    return np.diff(np.array([0.0, *reply.token_times])) * 1000.0
