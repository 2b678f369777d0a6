"""Turning next-token logits into a choice, as a pipeline of named stages.

Order (as vLLM and transformers apply them): first the stages that read the sequence so far or the
request, on the raw logits (the JSON grammar's mask, logit bias, the repetition, frequency and presence
penalties); then the warpers as in transformers: temperature scales, top-k keeps the k most likely, top-p
keeps the smallest set whose probability reaches p, min-p drops tokens less likely than min_p times the
most likely. Greedy takes the argmax after the first group. The most likely token survives every warper.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .speed.logits import first_max, top_k_ids

MAX_PENALTY = 2.0  # presence and frequency penalties: -2 to 2, OpenAI's range
MAX_BIAS = 100.0  # logit_bias values: -100 to 100, OpenAI's range
MAX_REPETITION_PENALTY = 2.0  # repetition_penalty: above 0, at most 2 (1 = off; CTRL's paper used 1.2)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # None or 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0 = off: keeps tokens at least min_p times as likely as the most likely one
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time the token was generated so far
    repetition_penalty: float = 1.0  # 1 = off: divides positive logits of tokens seen (prompt too), multiplies negative
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    json_schema: str | None = None  # a JSON schema (text): the reply is JSON that it validates

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not _finite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {k!r}")
        if not _finite(p) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _finite(value := getattr(self, name)) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be from -{MAX_PENALTY:g} to {MAX_PENALTY:g} (0 = off), got {value!r}")
        r = self.repetition_penalty
        if not _finite(r) or not 0 < r <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be above 0 and at most {MAX_REPETITION_PENALTY:g} (1 = off), "
                             f"got {r!r}")
        for pair in self.logit_bias:
            ok = isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], int) and pair[0] >= 0
            if not ok or not _finite(pair[1]) or not -MAX_BIAS <= pair[1] <= MAX_BIAS:
                raise ValueError(f"logit_bias must be (token id, bias from -{MAX_BIAS:g} to {MAX_BIAS:g}) pairs, "
                                 f"got {pair!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            raise ValueError(f"json_schema must be a JSON schema's text, got {type(self.json_schema).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def reads_history(self) -> bool:
        """Whether a stage reads the sequence so far (the penalties, the grammar): sample with a History."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.json_schema is not None)


def read_logit_bias(mapping: object, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> ((id, bias), ...) for SamplingParams; ValueError says what is wrong."""
    if not isinstance(mapping, dict):
        raise ValueError(f"logit_bias must be an object mapping token ids to biases, got {mapping!r}")
    pairs = []
    for key, bias in mapping.items():
        token = int(key) if isinstance(key, str) and key.isdigit() and len(key) < 10 else -1
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias keys must be token ids from 0 to {vocab_size - 1}, got {key!r}")
        if not _finite(bias) or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise ValueError(f"logit_bias values must be numbers from -{MAX_BIAS:g} to {MAX_BIAS:g}, got {bias!r} "
                             f"for {key}")
        pairs.append((token, float(bias)))
    return tuple(pairs)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Constraint(Protocol):
    """What the sampler needs of a grammar (minigpt.json_output.JsonGrammar): the tokens it allows next,
    and to follow the sequence."""

    def allowed(self, vocab_size: int) -> torch.Tensor: ...  # bool (vocab_size,)

    def accept(self, token: int) -> None: ...


class History:
    """One sequence's past, as its stages read it: the tokens seen (prompt and generated), how often each
    was generated, and the grammar following it. add() every token the sequence gets."""

    def __init__(self, prompt_ids: Iterable[int] = (), grammar: Constraint | None = None):
        self.seen = set(prompt_ids)
        self.generated: Counter[int] = Counter()
        self.grammar = grammar

    def add(self, token: int) -> None:
        self.seen.add(token)
        self.generated[token] += 1
        if self.grammar is not None:
            self.grammar.accept(token)


def history_stages(logits: torch.Tensor, params: SamplingParams,
                   history: History | None) -> list[tuple[str, torch.Tensor]]:
    """The stages that read the request or the sequence so far, on raw logits (vocab,); those off are left out."""
    stages = []
    if history is not None and history.grammar is not None:
        logits = logits.masked_fill(~history.grammar.allowed(logits.size(-1)).to(logits.device), float("-inf"))
        stages.append(("JSON grammar", logits))
    if params.logit_bias:
        ids, bias = _indexed(logits, [i for i, _ in params.logit_bias], [b for _, b in params.logit_bias])
        stages.append(("logit bias", logits := logits.index_add(-1, ids, bias)))
    if history is None:
        return stages
    if params.repetition_penalty != 1 and history.seen:
        ids, _ = _indexed(logits, sorted(history.seen), [])
        seen = logits[ids]
        penalised = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        stages.append(("repetition penalty", logits := logits.index_copy(-1, ids, penalised)))
    if history.generated and (params.frequency_penalty or params.presence_penalty):
        ids, counts = _indexed(logits, list(history.generated), list(history.generated.values()))
        if params.frequency_penalty:
            logits = logits.index_add(-1, ids, -params.frequency_penalty * counts)
            stages.append(("frequency penalty", logits))
        if params.presence_penalty:
            stages.append(("presence penalty", logits := logits.index_add(-1, ids, torch.full_like(
                counts, -params.presence_penalty))))
    return stages


def _indexed(logits: torch.Tensor, ids: Sequence[int], values: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (those inside the vocabulary) and their values, as tensors on the logits' device."""
    kept = [(i, v) for i, v in zip(ids, values or [0.0] * len(ids)) if i < logits.size(-1)]
    return (torch.tensor([i for i, _ in kept], dtype=torch.long, device=logits.device),
            torch.tensor([v for _, v in kept], dtype=logits.dtype, device=logits.device))


def filter_stages(logits: torch.Tensor, params: SamplingParams,
                  history: History | None = None) -> list[tuple[str, torch.Tensor]]:
    """The sampler's pipeline, stage by stage: [("raw", logits), ("JSON grammar", ...), ("logit bias", ...),
    ("repetition penalty", ...), ("frequency penalty", ...), ("presence penalty", ...), ("temperature", ...),
    ("top-k", ...), ("top-p", ...), ("min-p", ...)] as logits (..., vocab), filtered tokens at -inf; a stage
    that is off is left out. The stages that read a sequence (grammar, penalties) need its history and
    logits (vocab,). The last stage is what sample() draws from (after a softmax), or takes the argmax of
    when greedy (which has no warper stages). The chat's sampling panel shows these same tensors."""
    stages = [("raw", logits), *history_stages(logits, params, history)]
    return stages if params.greedy else stages + warper_stages(stages[-1][1], params)


def warper_stages(logits: torch.Tensor, params: SamplingParams) -> list[tuple[str, torch.Tensor]]:
    """The warpers' stages on logits (..., vocab): temperature, then top-k, top-p and min-p where they are on."""
    stages = []
    best = first_max(logits)  # the most likely token survives every filter below
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
        # Only the tokens top-k left (its ties included) need sorting: every other one is at -inf already, so
        # the order and the sums are those of the whole vocabulary's sort, for 40 tokens instead of 50,257.
        kept = logits.size(-1) if outside_top_k is None else int((~outside_top_k).sum(-1, dtype=torch.int32).max())
        sorted_logits, order = torch.topk(logits, kept)  # descending
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= params.top_p)
        # Kept explicitly: a p that rounds to 0, or a huge temperature that rounds logits into a tie,
        # would otherwise let sorting pick another token as "the top".
        drop.scatter_(-1, best, False)
        stages.append(("top-p", logits := logits.masked_fill(drop, float("-inf"))))
    if params.min_p > 0:
        # The max is at 0 after the temperature's shift: p / p_max = exp(logit), so the cut is log(min_p).
        drop = logits < math.log(params.min_p)
        drop.scatter_(-1, best, False)
        stages.append(("min-p", logits.masked_fill(drop, float("-inf"))))
    return stages


def filter_logits(logits: torch.Tensor, params: SamplingParams, history: History | None = None) -> torch.Tensor:
    """Logits (..., vocab) after every stage: what sample() draws from (after a softmax)."""
    return filter_stages(logits, params, history)[-1][1]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           history: History | None = None) -> torch.Tensor:
    """One token id per row of logits (..., vocab): argmax when greedy, else a draw from the filtered
    distribution. The stages that read a sequence need its history (and logits (vocab,))."""
    stages = history_stages(logits, params, history)
    logits = stages[-1][1] if stages else logits
    if params.greedy:
        return first_max(logits)
    if params.top_k and params.top_k < logits.size(-1) and logits.dim() == 1:
        # Every warper after top-k reads only the tokens it keeps: on those alone (tens of values instead of
        # 50,257) they give the same numbers, in a fifth of the time.
        ids = top_k_ids(logits, params.top_k)
        return ids[draw(warper_stages(logits[ids], params)[-1][1].softmax(dim=-1), generator)]
    return draw(warper_stages(logits, params)[-1][1].softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs (..., n), shape (..., 1): index i with probability probs[i] / sum(probs).
    Inverse transform sampling: the first index whose running sum (in float64) passes one uniform draw
    times the total. One random number a row, where torch.multinomial draws an exponential for every
    token of the row (1 ms for GPT-2's 50,257 on a CPU, a third of a decode step)."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    u = torch.rand((*probs.shape[:-1], 1), dtype=torch.float64, device=probs.device, generator=generator)
    # u < 1, so u * total < total (float32's values are normal doubles): some running sum passes it, and the
    # first to pass it belongs to a token of probability > 0 (a token of probability 0 adds nothing).
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
