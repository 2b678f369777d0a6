"""Looking inside the model after it has answered: the logit lens and attention statistics.

The logit lens reads every layer's residual stream through the model's own final LayerNorm and
lm_head, as if the network stopped there (nostalgebraist 2020). The streams come from a plain
re-run of the model's modules, block by block, with no hooks and nothing added to the forward.
Layer 0 is the embeddings; the last layer is the model's output itself.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .model import GPT
from .speed.decoder import Decoder


def as_gpt(model: GPT | Decoder) -> GPT:
    return model.model if isinstance(model, Decoder) else model


@torch.inference_mode()
def residual_streams(model: GPT | Decoder, ids: Sequence[int]) -> Iterator[torch.Tensor]:
    """The residual stream (T, C) after the embeddings, then after each block: n_layer + 1 in all."""
    gpt = as_gpt(model)
    if not 0 < len(ids) <= gpt.config.n_positions:
        raise ValueError(f"need 1 to {gpt.config.n_positions} token ids, got {len(ids)}")
    idx = torch.tensor([list(ids)], device=gpt.device)
    x = gpt.transformer.wte(idx) + gpt.transformer.wpe(torch.arange(idx.size(1), device=gpt.device))
    yield x[0]
    for block in gpt.transformer.h:
        x, _ = block(x)
        yield x[0]


@torch.inference_mode()
def read_out(model: GPT | Decoder, stream: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities (T, vocab) of a residual stream (T, C): final LayerNorm, lm_head, log-softmax."""
    gpt = as_gpt(model)
    return gpt.lm_head(gpt.transformer.ln_f(stream)).float().log_softmax(dim=-1)


def layer_logprobs(model: GPT | Decoder, ids: Sequence[int]) -> torch.Tensor:
    """(n_layer + 1, T, vocab): what each layer predicts after each position; the last row is the model's output."""
    return torch.stack([read_out(model, stream) for stream in residual_streams(model, ids)])


@dataclass
class LogitLens:
    """Per layer (rows, embeddings first) and position (columns): the prediction of the token after it.
    Column t predicts ids[t + 1], so a sequence of T tokens gives T - 1 columns."""
    ids: list[int]
    top_ids: np.ndarray  # (n_layer + 1, T - 1) each layer's top-1 token
    top_probs: np.ndarray  # its probability
    target_probs: np.ndarray  # probability of the token that actually came next
    target_ranks: np.ndarray  # its rank, 1 = the layer's top-1


def logit_lens(model: GPT | Decoder, ids: Sequence[int]) -> LogitLens:
    """The lens over a whole sequence, one layer at a time (never n_layer x T x vocab at once)."""
    if len(ids) < 2:
        raise ValueError("the logit lens needs at least 2 tokens")
    targets = torch.tensor(list(ids[1:]))
    rows = []
    for stream in residual_streams(model, ids):
        logprobs = read_out(model, stream[:-1]).cpu()
        target = logprobs.gather(1, targets[:, None])
        top = logprobs.max(dim=-1)
        rows.append((top.indices, top.values.exp(), target[:, 0].exp(), 1 + (logprobs > target).sum(dim=-1)))
    top_ids, top_probs, target_probs, ranks = (torch.stack(column).numpy() for column in zip(*rows))
    return LogitLens(list(ids), top_ids, top_probs, target_probs, ranks)


def attention_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy in nats of attention rows (..., S): -sum p log p, with 0 log 0 = 0."""
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return -(probs * logs).sum(axis=-1)


def head_similarity(patterns: np.ndarray) -> np.ndarray:
    """Cosine similarity of the heads' attention patterns (nh, T, S), each flattened: (nh, nh)."""
    flat = patterns.reshape(patterns.shape[0], -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = flat / np.where(norms > 0, norms, 1.0)
    return unit @ unit.T


def without_sink(probs: np.ndarray) -> np.ndarray:
    """Attention rows (..., S) without the first key, the rest renormalised to sum to 1. Many heads park
    most of their attention on the first token (an attention sink); dropping it shows the rest.
    A row that could only see the first key becomes all zeros."""
    rest = probs[..., 1:]
    total = rest.sum(axis=-1, keepdims=True)
    return np.divide(rest, total, out=np.zeros_like(rest), where=total > 0)
