"""One chat reply: stream it from the model, stop it on request, time it, and keep what the panels need."""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace

import tiktoken

from ..generation import generate
from ..model import GPT
from ..speed.decoder import Decoder
from .conversation import MAX_SEED, Prompt, Settings

TOP_N = 5  # alternatives kept per position for the log-prob panel
FRAME_S = 0.05  # a browser is sent a streaming reply at most 20 times a second


@dataclass
class Reply:
    """A reply as it grows, and afterwards the record behind the log-prob and attention panels."""
    mode: str
    prompt_ids: list[int]
    scale: float = 1.0  # the LoRA scale of a tuned-mode reply
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw model distribution (temperature 1, unfiltered)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # top-N (token id, raw log-prob) per token
    finish_reason: str | None = None  # "eos", "stop", "length" or "stopped" (the user pressed Stop)
    first_token_s: float | None = None  # time to first token, prefill included
    elapsed_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # seconds from the start to each token's arrival
    settings: Settings | None = None  # what drew it, its seed filled in: branching and export repeat it
    stop: tuple[str, ...] = ()  # the prompt's stop strings

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        n = len(self.token_ids)
        if n < 2 or self.first_token_s is None or self.elapsed_s <= self.first_token_s:
            return None
        return (n - 1) / (self.elapsed_s - self.first_token_s)


def stream_reply(model: GPT | Decoder, tokenizer: tiktoken.Encoding, mode: str, prompt: Prompt, settings: Settings,
                 stop: threading.Event, draft: GPT | Decoder | None = None, top_n: int = TOP_N,
                 forced: Sequence[int] = (), scale: float = 1.0) -> Iterator[Reply]:
    """Yield the same Reply after every token, finished last; checks `stop` before each token.
    Each token keeps its top_n alternatives.

    The model runs inside this generator: when stop is set, or the consumer closes the generator,
    no further token is computed. A random seed is drawn here, so the Reply records it. `forced`
    tokens start the reply (a branch: see generation.generate).
    """
    if settings.seed is None:
        settings = replace(settings, seed=random.randint(0, MAX_SEED))
    reply = Reply(mode, list(prompt.ids), scale, settings=settings, stop=prompt.stop)
    start = time.perf_counter()
    events = generate(model, tokenizer, prompt.ids, settings.max_new_tokens, settings.params,
                      seed=settings.seed, stop=prompt.stop, top_n=top_n, draft=draft, forced=forced)
    try:
        while not stop.is_set():
            event = next(events, None)
            if event is None:
                break
            reply.elapsed_s = time.perf_counter() - start
            reply.token_times.append(reply.elapsed_s)
            if reply.first_token_s is None:
                reply.first_token_s = reply.elapsed_s
            reply.text += event.text
            reply.token_ids.append(event.token_id)
            reply.logprobs.append(event.logprob)
            reply.top.append(event.top)
            reply.finish_reason = event.finish_reason
            if event.finish_reason is None:
                yield reply
        if stop.is_set() and reply.finish_reason is None:
            reply.finish_reason = "stopped"
        yield reply
    finally:
        events.close()


def paced(replies: Iterator[Reply], every_s: float = FRAME_S) -> Iterator[Reply]:
    """The growing replies a browser is sent: at most one every `every_s` seconds, and always the last.
    The model does not wait for them. Sent every token, two Compare sides of a fast model (80 tokens/s
    each) keep the page's main thread so busy redrawing that a click on Stop lands seconds late."""
    shown, unsent = 0.0, None
    with closing(replies):
        for unsent in replies:
            if time.perf_counter() - shown >= every_s:
                yield unsent
                shown, unsent = time.perf_counter(), None
    if unsent is not None:
        yield unsent


FINISH_WORDS = {"eos": "ended by the model", "stop": "ended at the next turn", "length": "hit the token limit",
                "stopped": "stopped by you"}


def stats_line(reply: Reply, device: str) -> str:
    """'42 tokens · first token 0.12 s · 18.3 tokens/s · Base GPT-2 · cpu float32 · ended by the model'."""
    parts = [f"{len(reply.token_ids)} token{'s' if len(reply.token_ids) != 1 else ''}"]
    if reply.first_token_s is not None:
        parts.append(f"first token {reply.first_token_s:.2f} s")
    if (speed := reply.tokens_per_s) is not None:
        parts.append(f"{speed:.1f} tokens/s")
    parts += [reply.mode if reply.scale == 1 else f"{reply.mode} at scale {reply.scale:g}", device]
    if reply.finish_reason:
        parts.append(FINISH_WORDS[reply.finish_reason])
    return " · ".join(parts)
