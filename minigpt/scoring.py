"""Scoring text under a model, and comparing two models token by token, by teacher forcing.

    score_ids(model, ids)              sliding-window perplexity (transformers' perplexity guide)
    score_text(model, tokenizer, text) the same for a text, tokenized with encode_ordinary
    divergence_ids(model, base, ids)   per token, the KL divergence of model's next-token distribution
                                       from base's and whether their top-1 agree (a quantized model vs float32)
    compare_ids(base, tuned, ids, start)  both models' log-probs of ids[start:], the KL between their
                                       full next-token distributions, their top-5, where their top-1 differs

A model is a GPT or a Decoder (an adapter at some scale: AdapterScale.decoder(s)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import tiktoken
import torch

from .model import GPT
from .speed.decoder import Decoder

TOP_N = 5
DEFAULT_STRIDE = 512  # the perplexity guide's stride for GPT-2's 1024-token windows


class ScoringError(ValueError):
    """Text or settings that cannot be scored; the message says why."""


@dataclass
class Perplexity:
    token_ids: list[int]
    nll: list[float | None]  # per token, natural log; None for the first token (nothing predicts it)
    max_length: int
    stride: int

    @property
    def tokens(self) -> int:
        """How many tokens were scored: every one but the first."""
        return sum(x is not None for x in self.nll)

    @property
    def mean_nll(self) -> float:
        return math.fsum(x for x in self.nll if x is not None) / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) per window, as in transformers' perplexity guide: windows of max_length
    tokens moved by stride; each window scores the tokens after the previous window's end (its first
    token never: nothing in the window predicts it), so every token but the text's first is scored
    once, with the most context that window gives."""
    if max_length < 2:
        raise ScoringError(f"max-length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ScoringError(f"stride must be between 1 and max-length ({max_length}), got {stride}")
    spans, previous_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        spans.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n:
            break
    return spans


@torch.inference_mode()
def log_probs(model: GPT | Decoder, ids: list[int]) -> torch.Tensor:
    """Float32 log-softmax of the model's next-token logits at every position of ids: (len(ids), vocab)."""
    idx = torch.tensor([ids], device=model.device)
    return model(idx)[0].float().log_softmax(dim=-1)


def scored_windows(model: GPT | Decoder, ids: list[int], max_length: int | None = None, stride: int | None = None
                   ) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(max_length, stride, windows) for scoring ids under model, the defaults filled in and checked."""
    max_length = model.config.n_positions if max_length is None else max_length
    if max_length > model.config.n_positions:
        raise ScoringError(f"max-length {max_length} is longer than the model's context ({model.config.n_positions})")
    stride = max_length // 2 if stride is None else stride
    if len(ids) < 2:
        raise ScoringError(f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''} long: "
                           "scoring needs at least 2 (the first is not scored)")
    return max_length, stride, windows(len(ids), max_length, stride)


def score_ids(model: GPT | Decoder, ids: list[int], max_length: int | None = None, stride: int | None = None
              ) -> Perplexity:
    """Per-token negative log-likelihood and perplexity of ids under model, window by window."""
    max_length, stride, spans = scored_windows(model, ids, max_length, stride)
    nll: list[float | None] = [None] * len(ids)
    for begin, end, first in spans:
        logp = log_probs(model, ids[begin:end])
        targets = torch.tensor(ids[first:end], device=logp.device)
        chosen = logp[first - begin - 1:end - begin - 1].gather(1, targets[:, None])[:, 0]
        nll[first:end] = (-chosen).tolist()
    return Perplexity(list(ids), nll, max_length, stride)


@dataclass
class Divergence:
    """How far a model's next-token distributions are from a base's, at every scored token."""
    kl: list[float]  # KL(base || model) in nats, per scored token (llama-perplexity --kl-divergence's)
    same_top: list[bool]  # the two most likely next tokens are the same

    @property
    def mean_kl(self) -> float:
        return math.fsum(self.kl) / len(self.kl)

    def kl_quantile(self, q: float) -> float:
        return torch.tensor(self.kl, dtype=torch.float64).quantile(q).item()

    @property
    def top1_agreement(self) -> float:
        """The share of positions where both models' top-1 token is the same, 0 to 1."""
        return sum(self.same_top) / len(self.same_top)


def divergence_ids(model: GPT | Decoder, base: GPT | Decoder, ids: list[int], max_length: int | None = None,
                   stride: int | None = None) -> Divergence:
    """KL(base || model) of the next-token distributions, and top-1 agreement, at the positions score_ids
    scores (the same windows): e.g. a quantized model against float32."""
    _, _, spans = scored_windows(model, ids, max_length, stride)
    parts = [divergence(*(log_probs(m, ids[begin:end])[first - begin - 1:end - begin - 1] for m in (model, base)))
             for begin, end, first in spans]
    return Divergence([kl for d in parts for kl in d.kl], [same for d in parts for same in d.same_top])


def divergence(logp: torch.Tensor, logp_base: torch.Tensor) -> Divergence:
    """KL(base || model) and top-1 agreement at each row of two (positions, vocab) log-probability tensors."""
    logp, logp_base = logp.double(), logp_base.double()  # a small KL is a sum of many tiny terms
    return Divergence((logp_base.exp() * (logp_base - logp)).sum(dim=-1).tolist(),
                      (logp.argmax(dim=-1) == logp_base.argmax(dim=-1)).tolist())


def score_text(model: GPT | Decoder, tokenizer: tiktoken.Encoding, text: str, max_length: int | None = None,
               stride: int | None = None) -> Perplexity:
    return score_ids(model, tokenizer.encode_ordinary(text), max_length, stride)


@dataclass
class TokenDiff:
    """One token of a compared reply: what each model thought of it, and of the next token in general."""
    position: int  # 1-based, within the compared tokens
    token_id: int
    logprob_base: float
    logprob_tuned: float
    kl: float  # KL(tuned || base) of the two full next-token distributions, in nats
    top_base: list[tuple[int, float]]  # top-5 (token id, log-prob) under each model
    top_tuned: list[tuple[int, float]]

    @property
    def diff(self) -> float:
        """log p_tuned − log p_base of this token: > 0 where the adapter made it more likely."""
        return self.logprob_tuned - self.logprob_base

    @property
    def changed_mind(self) -> bool:
        """The two models' most likely next token differ here."""
        return self.top_base[0][0] != self.top_tuned[0][0]


@dataclass
class Comparison:
    tokens: list[TokenDiff]

    @property
    def mean_logprob_base(self) -> float:
        return sum(t.logprob_base for t in self.tokens) / len(self.tokens)

    @property
    def mean_logprob_tuned(self) -> float:
        return sum(t.logprob_tuned for t in self.tokens) / len(self.tokens)

    @property
    def mean_kl(self) -> float:
        return sum(t.kl for t in self.tokens) / len(self.tokens)

    def changed_minds(self) -> list[TokenDiff]:
        """Positions where the top-1 token differs, the largest KL first."""
        return sorted((t for t in self.tokens if t.changed_mind), key=lambda t: -t.kl)


def compare_ids(base: GPT | Decoder, tuned: GPT | Decoder, ids: list[int], start: int) -> Comparison:
    """Both models' view of ids[start:] given everything before it: one teacher-forced pass each.

    Over-long ids keep their last n_positions tokens (the context the reply was written in, as fitted)."""
    if not 1 <= start < len(ids):
        raise ScoringError(f"nothing to compare: {len(ids) - start} tokens after a context of {start}")
    keep = min(len(ids), base.config.n_positions)
    start, ids = start - (len(ids) - keep), list(ids[-keep:])
    start = max(start, 1)
    logp_base, logp_tuned = (log_probs(m, ids)[start - 1:len(ids) - 1] for m in (base, tuned))
    targets = torch.tensor(ids[start:], device=logp_base.device)[:, None]
    chosen_base, chosen_tuned = logp_base.gather(1, targets)[:, 0], logp_tuned.gather(1, targets)[:, 0]
    kl = (logp_tuned.exp() * (logp_tuned - logp_base)).sum(dim=-1)
    top_base, top_tuned = logp_base.topk(TOP_N), logp_tuned.topk(TOP_N)
    return Comparison([
        TokenDiff(i + 1, token, b, t, k, list(zip(bi, bv)), list(zip(ti, tv)))
        for i, (token, b, t, k, bi, bv, ti, tv) in enumerate(zip(
            ids[start:], chosen_base.tolist(), chosen_tuned.tolist(), kl.tolist(), top_base.indices.tolist(),
            top_base.values.tolist(), top_tuned.indices.tolist(), top_tuned.values.tolist()))])
