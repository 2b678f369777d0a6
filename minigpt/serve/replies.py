"""One chat reply: its growing record (Reply), built from the model's token events, whether they come
from the shared scheduler (Engine.replies) or from a Stream computed alone in the calling thread
(stream_reply: scripts, benchmarks, tests); and the pace at which a browser is sent it."""
from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import tiktoken

from ..batching import Stream, decode
from ..generation import TokenEvent, generate
from ..request import Mode, ReplyRequest
from ..speed.decoder import Decoder
from .conversation import Prompt
from .scheduler import Done, Item, Queued, Started, Ticket

TOP_N = 5  # alternatives kept per position for the log-prob panel
FRAME_S = 0.05  # a browser is sent a streaming reply at most 20 times a second


@dataclass
class Reply:
    """A reply as it grows, and afterwards the record behind the log-prob and attention panels."""
    request: ReplyRequest  # what drew it, its seed filled in: the panels, branching and export read it back
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw model distribution (temperature 1, unfiltered)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # top-N (token id, raw log-prob) per token
    finish_reason: str | None = None  # "eos", "stop", "length" or "stopped" (the user pressed Stop)
    first_token_s: float | None = None  # time to first token, prefill included, from leaving the queue
    elapsed_s: float = 0.0
    token_times: list[float] = field(default_factory=list)  # seconds from the start to each token's arrival
    stop: tuple[str, ...] = ()  # the prompt's stop strings
    ahead: int | None = None  # while it waits in the queue: the requests before it; None once computing

    @property
    def mode(self) -> Mode:
        return self.request.mode

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        n = len(self.token_ids)
        if n < 2 or self.first_token_s is None or self.elapsed_s <= self.first_token_s:
            return None
        return (n - 1) / (self.elapsed_s - self.first_token_s)


class ReplyRecorder:
    """A reply's ticket items -> the growing Reply. take() says whether the reply should be shown again."""

    def __init__(self, request: ReplyRequest, prompt: Prompt):
        self.reply = Reply(request, list(prompt.ids), stop=prompt.stop, ahead=0)
        self.start = time.perf_counter()

    def take(self, item: Item) -> bool:
        reply = self.reply
        if isinstance(item, Queued):
            reply.ahead = item.ahead
            return True
        if isinstance(item, Started):
            reply.ahead, self.start = None, time.perf_counter()
            return False
        if isinstance(item, Done):
            if item.error is not None:
                raise item.error
            reply.ahead = None
            if reply.finish_reason is None:
                reply.finish_reason = "stopped"
            return True
        reply.elapsed_s = time.perf_counter() - self.start
        reply.token_times.append(reply.elapsed_s)
        if reply.first_token_s is None:
            reply.first_token_s = reply.elapsed_s
        reply.text += item.text
        reply.token_ids.append(item.token_id)
        reply.logprobs.append(item.logprob)
        reply.top.append(item.top)
        reply.finish_reason = item.finish_reason
        return item.finish_reason is None  # the finished reply is shown once, at Done


def reply_source(model: Decoder, tokenizer: tiktoken.Encoding, prompt: Prompt, request: ReplyRequest, top_n: int,
                 forced: Sequence[int] = (), draft: Decoder | None = None) -> Stream | Iterator[TokenEvent]:
    """What computes a reply: a Stream to batch with others, or, with a speculative draft (and no forced
    tokens, and a sampler that reads no history), generate()'s own loop, which checks the draft's proposals
    one sequence at a time."""
    if draft is not None and not forced and not request.params.reads_history:
        return generate(model, tokenizer, prompt.ids, request.max_new_tokens, request.params, seed=request.seed,
                        stop=prompt.stop, top_n=top_n, draft=draft)
    return Stream(model, tokenizer, prompt.ids, request.max_new_tokens, request.params, request.seed, prompt.stop,
                  top_n, forced)


def stream_reply(model: Decoder, tokenizer: tiktoken.Encoding, prompt: Prompt, request: ReplyRequest,
                 stop: threading.Event, draft: Decoder | None = None, top_n: int = TOP_N,
                 forced: Sequence[int] = ()) -> Iterator[Reply]:
    """One reply computed alone, in the calling thread, token by token as it is iterated: the same Reply
    after every token, finished last. Checks `stop` before each token; a random seed is drawn here, so
    the Reply records it."""
    request = request.with_seed()
    recorder = ReplyRecorder(request, prompt)
    recorder.take(Started())
    events = _alone(reply_source(model, tokenizer, prompt, request, top_n, forced, draft))
    while not stop.is_set() and (event := next(events, None)) is not None:
        if recorder.take(event):
            yield recorder.reply
    recorder.take(Done(stopped=stop.is_set()))
    yield recorder.reply


def _alone(source: Stream | Iterator[TokenEvent]) -> Iterator[TokenEvent]:
    if not isinstance(source, Stream):
        yield from source
        return
    yield from source.prefill(len(source.unread))
    while not source.finished:
        yield from decode([source])


def replies_of(ticket: Ticket, request: ReplyRequest, prompt: Prompt) -> Iterator[Reply]:
    """A scheduled reply's growing Reply, blocking between tokens; leaving early stops it."""
    recorder = ReplyRecorder(request, prompt)
    try:
        for item in ticket:
            if recorder.take(item):
                yield recorder.reply
    finally:
        ticket.stop.set()


async def areplies_of(ticket: Ticket, request: ReplyRequest, prompt: Prompt) -> AsyncIterator[Reply]:
    """replies_of, awaited: no thread waits for the next token."""
    recorder = ReplyRecorder(request, prompt)
    try:
        async for item in ticket:
            if recorder.take(item):
                yield recorder.reply
    finally:
        ticket.stop.set()


async def paced(replies: AsyncIterator[Reply], every_s: float = FRAME_S) -> AsyncIterator[Reply]:
    """The growing replies a browser is sent: at most one every `every_s` seconds, and always the last.
    The model does not wait for them. Sent every token, two Compare sides of a fast model (80 tokens/s
    each) keep the page's main thread so busy redrawing that a click on Stop lands seconds late."""
    shown, unsent = 0.0, None
    try:
        async for unsent in replies:
            if time.perf_counter() - shown >= every_s:
                yield unsent
                shown, unsent = time.perf_counter(), None
    finally:
        await replies.aclose()
    if unsent is not None:
        yield unsent


FINISH_WORDS = {"eos": "ended by the model", "stop": "ended at the next turn", "length": "hit the token limit",
                "stopped": "stopped by you"}


def stats_line(reply: Reply, device: str) -> str:
    """'42 tokens · first token 0.12 s · 18.3 tokens/s · Base GPT-2 · cpu float32 · ended by the model', or
    while the reply waits its turn, 'Waiting: 2 requests ahead · Base GPT-2'."""
    if reply.ahead is not None:
        ahead = "next in line" if reply.ahead == 0 else f"{reply.ahead} request{'s' if reply.ahead != 1 else ''} ahead"
        return f"Waiting: {ahead} · {reply.request.describe()}"
    parts = [f"{len(reply.token_ids)} token{'s' if len(reply.token_ids) != 1 else ''}"]
    if reply.first_token_s is not None:
        parts.append(f"first token {reply.first_token_s:.2f} s")
    if (speed := reply.tokens_per_s) is not None:
        parts.append(f"{speed:.1f} tokens/s")
    parts += [reply.request.describe(), device]
    if reply.finish_reason:
        parts.append(FINISH_WORDS[reply.finish_reason])
    return " · ".join(parts)
