"""Streaming generation: prefill the prompt into a KV cache, then decode one token per step, or
several per step with a draft model (speculative decoding).

`generate` is a Python generator that yields a TokenEvent per token. All compute happens inside
next(): a consumer that stops iterating (or calls close()) stops the model with it. The model is a
GPT or a speed.decoder.Decoder (which decodes single tokens through the fastest step built for it);
both are called the same way.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import tiktoken
import torch

from .model import GPT
from .json_output import JsonGrammar
from .sampling import History, SamplingParams, draw, filter_logits, sample
from .speed.decoder import Decoder
from .speed.logits import log_probs
from .tokenizer import EOT

Model = GPT | Decoder

# Proposals per speculative round: more wins more per accepted round and loses more per rejection.
DRAFT_TOKENS = 6


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
        return self._emit(self.utf8.decode(self.tokenizer.decode_single_token_bytes(token_id)))

    def flush(self) -> tuple[str, bool]:
        """The text held back, at the end of the stream (an incomplete character becomes U+FFFD, which a stop
        string may hold too); returns (text to emit, whether a stop string was reached)."""
        text, hit = self._emit(self.utf8.decode(b"", final=True))
        text, self.pending = text + self.pending, ""
        return text, hit

    def _emit(self, decoded: str) -> tuple[str, bool]:
        self.pending += decoded
        for s in self.stop:
            if (i := self.pending.find(s)) >= 0:
                text, self.pending = self.pending[:i], ""
                return text, True
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:n])), default=0)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text, False


def new_history(params: SamplingParams, tokenizer: tiktoken.Encoding, prompt_ids: Sequence[int]) -> History | None:
    """What the sampler's stages that read the sequence need (its tokens, its grammar), or None when none does."""
    if not params.reads_history:
        return None
    grammar = None if params.json_schema is None else JsonGrammar(params.json_schema, tokenizer)
    return History(prompt_ids, grammar)


Row = tuple[int, torch.Tensor, torch.Tensor | None]  # (token id, the logits that chose it, their attention row)


@torch.inference_mode()
def _forward(model: Model, ids: torch.Tensor, cache, with_attention: bool,
             last_only: bool = True) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Float32 logits (T, vocab) for the new tokens ids (1, T) after the cache (the last only with
    last_only) and, with attention, each of those queries' rows (n_layer, nh, S)."""
    if not with_attention:
        logits = model(ids, cache, last_only=last_only)[0].float()
        return logits, [None] * logits.size(0)
    logits, att = model.forward_with_attention(ids, cache, last_only=last_only)
    T, S = att.size(-2), att.size(-1)
    rows = [att[:, 0, :, j, :S - T + j + 1].float() for j in range(T - logits.size(1), T)]
    return logits[0].float(), rows


def _prefill(model: Model, cache, prompt: list[int], with_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read the prompt into the cache; the logits (vocab,) that choose the first token, and their attention.

    With attention asked for, the last prompt token gets a step alone, so every step's attention is
    a single row per head rather than a prompt's (T, S) maps for every layer.
    """
    device = model.device
    if with_attention and len(prompt) > 1:
        _forward(model, torch.tensor([prompt[:-1]], device=device), cache, with_attention=False)
        prompt = prompt[-1:]
    logits, attention = _forward(model, torch.tensor([prompt], device=device), cache, with_attention)
    return logits[-1], attention[-1]


def _one_at_a_time(model: Model, cache, prompt: list[int], params: SamplingParams, generator: torch.Generator,
                   with_attention: bool, forced: list[int], history: History | None) -> Iterator[Row]:
    def chosen(token: int) -> int:
        if history is not None:
            history.add(token)
        return token

    if forced:
        # The forced tokens are read with the prompt in one pass, which also gives the logits each one
        # was chosen over (they carry no attention row).
        logits = _forward(model, torch.tensor([prompt + forced[:-1]], device=model.device), cache,
                          with_attention=False, last_only=False)[0]
        yield from ((chosen(token), row, None) for token, row in zip(forced, logits[len(prompt) - 1:]))
        token = forced[-1]
    else:
        logits, attention = _prefill(model, cache, prompt, with_attention)
        token = chosen(int(sample(logits, params, generator, history)))
        yield token, logits, attention
    ids = torch.empty(1, 1, dtype=torch.long, device=model.device)  # every step: one token, written in place
    while True:
        rows, attentions = _forward(model, ids.fill_(token), cache, with_attention)
        token = chosen(int(sample(rows[-1], params, generator, history)))
        yield token, rows[-1], attentions[-1]


def _speculative(model: Model, draft: Model, cache, prompt: list[int], budget: int, draft_tokens: int,
                 params: SamplingParams, generator: torch.Generator, with_attention: bool) -> Iterator[Row]:
    """Speculative decoding: the draft proposes up to draft_tokens tokens, one at a time; the model
    scores them all in one pass, which reads its weights once, like a single step. The longest
    prefix it accepts is kept, then one token of the model's own (a correction, or one more).

    Greedy: a proposal is accepted when it is the model's argmax, so the tokens are the model's own
    greedy tokens. Sampling: a proposal x drawn from the draft's q is accepted with probability
    min(1, p(x)/q(x)), a rejection draws from max(0, p - q) renormalized (Leviathan et al. 2023), so
    tokens are distributed exactly as when sampling p, the model's filtered distribution, directly.
    """
    device = cache.k.device
    draft_cache = draft.new_cache(cache.max_len)
    logits, attention = _prefill(model, cache, prompt, with_attention)
    tokens = prompt + [int(sample(logits, params, generator))]
    yield tokens[-1], logits, attention
    while True:
        # The last token is in neither cache yet. Each round yields at most k + 1 tokens, and k stops
        # the model's pass at the last position the cache was sized for.
        k = min(draft_tokens, len(prompt) + budget - len(tokens) - 1)
        proposed, draft_probs = [], []
        for _ in range(k):
            unread = (tokens + proposed)[draft_cache.length:]
            q_logits = _forward(draft, torch.tensor([unread], device=device), draft_cache, with_attention=False)[0][-1]
            if params.greedy:
                proposed.append(int(q_logits.argmax()))
            else:
                draft_probs.append(filter_logits(q_logits, params).softmax(dim=-1))
                proposed.append(int(draw(draft_probs[-1], generator)))
        logits, attentions = _forward(model, torch.tensor([tokens[-1:] + proposed], device=device), cache,
                                      with_attention, last_only=False)
        n, token = _accept(logits, proposed, draft_probs, params, generator)
        cache.rewind(len(tokens) + n)
        draft_cache.rewind(min(draft_cache.length, len(tokens) + n))
        tokens += proposed[:n] + [token]
        yield from zip(proposed[:n] + [token], logits, attentions)


def _accept(logits: torch.Tensor, proposed: list[int], draft_probs: list[torch.Tensor], params: SamplingParams,
            generator: torch.Generator) -> tuple[int, int]:
    """How many proposals the model's logits (k + 1, vocab) accept, and the token it adds after them."""
    if params.greedy:
        choices = logits.argmax(dim=-1).tolist()
        n = next((i for i, (c, x) in enumerate(zip(choices, proposed)) if c != x), len(proposed))
        return n, choices[n]
    p = filter_logits(logits, params).softmax(dim=-1)
    for i, (x, q) in enumerate(zip(proposed, draft_probs)):
        if torch.rand((), device=p.device, generator=generator) * q[x] >= p[i, x]:  # rejected
            residual = (p[i] - q).clamp(min=0)
            return i, int(draw(residual if residual.sum() > 0 else p[i], generator))
    return len(proposed), int(draw(p[-1], generator))


@torch.inference_mode()
def prompt_logprobs(model: Model, prompt_ids: Sequence[int], top_n: int = 5) -> list[tuple[float, list[tuple[int, float]]]]:
    """Score a text: for every prompt token after the first, its raw log-probability given the tokens
    before it, and the top-N alternatives at that position (token id, raw log-probability)."""
    if len(prompt_ids) < 2:
        return []
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    logprobs = model(ids)[0, :-1].float().log_softmax(dim=-1)  # position i predicts token i + 1
    chosen = logprobs.gather(-1, ids[0, 1:, None])[:, 0].tolist()
    top = torch.topk(logprobs, top_n)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top.indices.tolist(), top.values.tolist())]


def generate(model: Model, tokenizer: tiktoken.Encoding, prompt_ids: Sequence[int], max_new_tokens: int = 100,
             params: SamplingParams = SamplingParams(), seed: int | None = None, stop: Sequence[str] = (),
             top_n: int = 5, return_attention: bool = False, draft: Model | None = None,
             draft_tokens: int = DRAFT_TOKENS, forced: Sequence[int] = ()) -> Iterator[TokenEvent]:
    """Stream up to max_new_tokens tokens after prompt_ids (see fit_to_context for over-long prompts).

    Stops at <|endoftext|>, at the first stop string (the text before it is emitted, the stop
    string is not), or at the token budget. Same seed and inputs give the same tokens.
    With a draft model (quantize.int8_drafts), decoding is speculative (see _speculative): greedy
    tokens stay the model's own, sampled ones keep the model's distribution but are other draws.
    `forced` tokens are the reply's first tokens instead of drawn ones (branching from an alternative);
    the rest is decoded one token at a time, without the draft, as are replies whose sampler reads the
    sequence (penalties, a JSON schema: SamplingParams.reads_history).
    """
    device = model.device
    eot_id = tokenizer.encode_single_token(EOT)
    prompt, max_new_tokens = fit_to_context(list(prompt_ids) or [eot_id], max_new_tokens, model.config.n_positions)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    if len(forced) > max_new_tokens:
        raise ValueError(f"{len(forced)} forced tokens exceed the budget of {max_new_tokens} new tokens")
    cache = model.new_cache(len(prompt) + max_new_tokens)
    decoder = StreamDecoder(tokenizer, stop)
    if draft is None or forced or params.reads_history:
        rows = _one_at_a_time(model, cache, prompt, params, generator, return_attention, list(forced),
                              new_history(params, tokenizer, prompt))
    else:
        rows = _speculative(model, draft, cache, prompt, max_new_tokens, draft_tokens, params, generator,
                            return_attention)
    for i, (token, logits, attention) in enumerate(rows):
        event = token_event(token, logits, decoder, eot_id, top_n, last=i == max_new_tokens - 1)
        event.attention = attention
        yield event
        if event.finish_reason:
            return


def token_event(token: int, logits: torch.Tensor, decoder: StreamDecoder, eot_id: int, top_n: int,
                last: bool) -> TokenEvent:
    """The event of `token`, chosen over logits (vocab,): its text delta, raw log-prob and top_n
    alternatives; finished at EOS, at a stop string, or when it is the `last` of the budget."""
    logprob, top = log_probs(logits, token, top_n)
    text, hit_stop = decoder.push(token) if token != eot_id else ("", False)
    if not hit_stop and (token == eot_id or last):
        rest, hit_stop = decoder.flush()
        text += rest
    finish = "stop" if hit_stop else "eos" if token == eot_id else "length" if last else None
    return TokenEvent(token, text, logprob, top, None, finish)
