"""One scheduler owns every forward pass the server makes: the replies of the chat, Compare, branches and
the API, and the passes of the panels and of scoring. First come, first served, with decoding batched
(continuous batching, as vLLM and llama.cpp's server do).

A request is submitted and gets a Ticket at once: its place in the queue while it waits, then its
results as they come. Waiting holds no thread, only a queue entry; the queue is bounded (ServerBusy).
One worker thread runs every step:
  1. requests whose Stop flag is set leave, waiting or running (a closed tab, a client that left);
  2. waiting requests are admitted in arrival order while rows are free; a Task (a panel's or a
     scoring pass) at the head of the queue runs then, alone, and the streams go on after it;
  3. streams still reading their prompt read up to prefill_chunk tokens between them, oldest first, so a
     long prompt never freezes the streams already decoding for more than one chunk; new prompts that fit
     whole are read together, one pass per model (requests that arrive at once start at once);
  4. every stream past its prompt decodes one token, all rows in one batched call (batching.decode).
A stream's KV cache exists only while it runs: memory is bounded by the row limit.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from ..batching import Stream, decode, prefill_together
from ..generation import TokenEvent

PREFILL_CHUNK = 256  # prompt tokens read per step: a 1,000-token prompt delays running streams by 4 short steps
log = logging.getLogger(__name__)


class ServerBusy(Exception):
    """The queue is full: the request is refused, not queued."""


@dataclass(frozen=True)
class Queued:
    ahead: int  # requests before this one in the queue (0: next when a row frees up)


@dataclass(frozen=True)
class Started:
    """The request left the queue: its computation starts now."""


@dataclass(frozen=True)
class Done:
    """The last item of every ticket."""
    result: Any = None  # a Task's return value
    error: BaseException | None = None
    stopped: bool = False  # its Stop flag ended it before it finished


Item = Queued | Started | TokenEvent | Done


class Ticket:
    """One request's results, in order, for one consumer: iterate it (blocking) or async-iterate it (no
    thread waits). `stop` is its Stop flag: set it to end the request, waiting or running."""

    def __init__(self, stop: threading.Event | None = None):
        self.stop = stop or threading.Event()
        self._items: deque[Item] = deque()
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None

    def put(self, item: Item, wake: bool = True) -> None:
        """Called by the worker. wake=False leaves an async consumer asleep until wake_all: a step's tokens
        for many tickets then wake their event loop once, not once per ticket (each wake is a write to the
        loop's pipe, and lends the GIL to the loop's thread while the worker waits to get it back)."""
        with self._lock:
            self._items.append(item)
            self._lock.notify()
        if wake:
            wake_all([self])

    def __iter__(self) -> Iterator[Item]:
        while True:
            with self._lock:
                while not self._items:
                    self._lock.wait()
                item = self._items.popleft()
            yield item
            if isinstance(item, Done):
                return

    async def __aiter__(self) -> AsyncIterator[Item]:
        with self._lock:
            self._loop, self._ready = asyncio.get_running_loop(), asyncio.Event()
        while True:
            with self._lock:
                items = list(self._items)
                self._items.clear()
                if not items:
                    self._ready.clear()
            if not items:
                await self._ready.wait()
                continue
            for item in items:
                yield item
                if isinstance(item, Done):
                    return


def wake_all(tickets: list[Ticket]) -> None:
    """Wake the async consumers of tickets: one call into each event loop they are awaited on."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Ticket]] = {}
    for ticket in tickets:
        with ticket._lock:
            loop = ticket._loop
        if loop is not None:
            by_loop.setdefault(loop, []).append(ticket)
    for loop, waiting in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_ready, waiting)
        except RuntimeError:  # the consumers' event loop has closed: nobody is listening
            for ticket in waiting:
                ticket.stop.set()


def _set_ready(tickets: list[Ticket]) -> None:
    for ticket in tickets:
        ticket._ready.set()


@dataclass(eq=False)
class StreamJob:
    """A reply: make() builds its Stream when it is admitted (so its cache exists only while it runs), or
    an iterator of events that advances itself one token per step (speculative decoding: the draft
    model's proposals are checked per sequence)."""
    make: Callable[[], Stream | Iterator[TokenEvent]]
    ticket: Ticket
    stream: Stream | None = None
    events: Iterator[TokenEvent] | None = None


@dataclass(eq=False)
class Task:
    """Any other forward pass (a panel, scoring): fn() runs on the worker, its result ends the ticket."""
    fn: Callable[[], Any]
    ticket: Ticket = field(default_factory=Ticket)


class Scheduler:
    """The queue and the worker. The worker is a thread of its own (background=True), or the caller of
    serve(): app.py serves from the main thread, the one that loaded the models. PyTorch's OpenMP keeps a
    pool of threads per thread that runs parallel work, and a second pool on 2 cores makes libgomp stop
    spinning (docs/serving.md); the C step's own pool serves any thread."""

    def __init__(self, max_rows: int, max_waiting: int, prefill_chunk: int = PREFILL_CHUNK,
                 background: bool = True):
        if max_rows < 1 or max_waiting < 0 or prefill_chunk < 1:
            raise ValueError("max_rows and prefill_chunk must be >= 1, max_waiting >= 0")
        self.max_rows, self.max_waiting, self.prefill_chunk = max_rows, max_waiting, prefill_chunk
        self.waiting: deque[StreamJob | Task] = deque()
        self.running: list[StreamJob] = []
        self.lock = threading.Condition()
        if background:
            threading.Thread(target=self.serve, name="minigpt-scheduler", daemon=True).start()

    # -- what the serving layer calls ---------------------------------------------------------------------

    def submit(self, job: StreamJob | Task, follow_up: bool = False) -> Ticket:
        """Queue a job; its ticket says its place at once. ServerBusy when the queue is full, unless the job is
        the follow-up of a request the queue took (a finished reply's panels): refusing it would fail that
        request after its work was done. There are no more of those than rows."""
        with self.lock:
            if not follow_up and len(self.waiting) >= self.max_waiting and not self._has_room():
                raise ServerBusy(f"the server is busy: {len(self.waiting)} requests are waiting already")
            self.waiting.append(job)
            job.ticket.put(Queued(len(self.waiting) - 1))
            self.lock.notify()
        return job.ticket

    def reply(self, make: Callable[[], Stream | Iterator[TokenEvent]], stop: threading.Event | None = None) -> Ticket:
        return self.submit(StreamJob(make, Ticket(stop)))

    def run(self, fn: Callable[[], Any]) -> Any:
        """fn() on the worker, in its turn; blocks the calling thread (a Gradio worker) until it is done."""
        return _result(list(self.submit(Task(fn)))[-1])

    async def run_async(self, fn: Callable[[], Any], follow_up: bool = False) -> Any:
        """fn() on the worker, in its turn, awaited without holding a thread (follow_up: as submit's)."""
        done = None
        async for done in self.submit(Task(fn), follow_up):
            pass
        return _result(done)

    # -- the worker ---------------------------------------------------------------------------------------

    def _has_room(self) -> bool:
        """A row is free and nothing waits for it: the job starts at the next step, it does not queue."""
        return not self.waiting and len(self.running) < self.max_rows

    @torch.inference_mode()  # grad mode is per thread: the worker never builds a graph
    def serve(self) -> NoReturn:
        """The worker loop, in the calling thread, for good (a KeyboardInterrupt ends it)."""
        while True:
            with self.lock:
                self._leave_queue_if_stopped()
                admitted, task = self._admit()
                while not (self.running or admitted or task):
                    self.lock.wait()
                    self._leave_queue_if_stopped()
                    admitted, task = self._admit()
            for job in admitted:
                self._start(job)
            wake_all([job.ticket for job in admitted])
            if task is not None:
                task.ticket.put(Started())
                try:
                    task.ticket.put(Done(result=task.fn()))
                except Exception as e:  # noqa: BLE001  (the caller gets it; the worker goes on)
                    task.ticket.put(Done(error=e))
            self._step()

    def _leave_queue_if_stopped(self) -> None:
        stopped = [job for job in self.waiting if job.ticket.stop.is_set()]
        for job in stopped:
            self.waiting.remove(job)
            job.ticket.put(Done(stopped=True))
        if stopped:
            self._tell_places()

    def _admit(self) -> tuple[list[StreamJob], Task | None]:
        """Waiting jobs that start now, in arrival order: streams while rows are free, or the Task at the head."""
        admitted: list[StreamJob] = []
        task = None
        while self.waiting:
            if isinstance(self.waiting[0], Task):
                if not admitted:
                    task = self.waiting.popleft()
                break
            if len(self.running) + len(admitted) >= self.max_rows:
                break
            admitted.append(self.waiting.popleft())
        self.running += admitted
        if admitted or task:
            self._tell_places()
        return admitted, task

    def _tell_places(self) -> None:
        for ahead, job in enumerate(self.waiting):
            job.ticket.put(Queued(ahead), wake=False)
        wake_all([job.ticket for job in self.waiting])

    def _start(self, job: StreamJob) -> None:
        job.ticket.put(Started(), wake=False)  # serve() wakes the admitted jobs' consumers together
        try:
            made = job.make()
        except Exception as e:  # noqa: BLE001
            self._end(job, Done(error=e))
            return
        if isinstance(made, Stream):
            job.stream = made
        else:
            job.events = made

    def _end(self, job: StreamJob, done: Done) -> None:
        with self.lock:
            if job in self.running:
                self.running.remove(job)
        if job.events is not None:
            job.events.close()
        job.stream = job.events = None  # frees the KV cache
        job.ticket.put(done)

    def _step(self) -> None:
        with self.lock:
            running = list(self.running)
        for job in running:
            if job.ticket.stop.is_set():
                self._end(job, Done(stopped=True))
        budget, together = self.prefill_chunk, {}
        for job in self._alive(running):
            stream = job.stream
            if stream is None or stream.prefilled or budget <= 0:
                continue
            if stream.cache.length == 0 and not stream.forced and len(stream.unread) <= budget:
                together.setdefault(id(stream.model.model), []).append(job)  # a whole new prompt
                budget -= len(stream.unread)
            else:
                chunk = min(budget, len(stream.unread))
                budget -= chunk
                self._guarded([job], lambda: [job.stream.prefill(chunk)])
        for jobs in together.values():
            self._guarded(jobs, lambda: prefill_together([job.stream for job in jobs]))
        for job in self._alive(running):
            if job.events is not None:
                self._guarded([job], lambda: [[next(job.events)]])
        ready = [job for job in self._alive(running) if job.stream is not None and job.stream.prefilled]
        if ready:
            self._guarded(ready, lambda: [[event] for event in decode([job.stream for job in ready])])

    def _alive(self, jobs: list[StreamJob]) -> list[StreamJob]:
        return [job for job in jobs if (job.stream is not None and not job.stream.finished) or job.events is not None]

    def _guarded(self, jobs: list[StreamJob], compute: Callable[[], list[list[TokenEvent]]]) -> None:
        """Run compute (one list of events per job), hand out the events, end the jobs that finished; an
        error ends the jobs it concerns, and only them."""
        try:
            results = compute()
        except Exception as e:  # noqa: BLE001
            log.error("a forward pass failed for %d request(s): %s: %s", len(jobs), type(e).__name__, e)
            for job in jobs:
                self._end(job, Done(error=e))
            return
        for job, events in zip(jobs, results):
            for event in events:
                job.ticket.put(event, wake=False)
            if events and events[-1].finish_reason is not None:
                self._end(job, Done())  # its Done wakes its consumer, the events before it included
        wake_all([job.ticket for job in jobs])


def _result(done: Done) -> Any:
    if done.error is not None:
        raise done.error
    return done.result
