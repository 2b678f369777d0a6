"""The scheduler: first come, first served; each waiting request told its place; a bounded queue; Stop
while waiting; tasks in their turn; a long prompt read in chunks between the running streams' tokens;
errors kept to their request; waiting without a thread; and replies through it equal to replies alone."""
import asyncio
import threading

import pytest

from minigpt.batching import Stream
from minigpt.generation import TokenEvent, generate
from minigpt.sampling import SamplingParams
from minigpt.serve.conversation import BASE, Prompt, read_request
from minigpt.serve.engine import Engine
from minigpt.serve.scheduler import Done, Queued, Scheduler, ServerBusy, Started, StreamJob, Task, Ticket, wake_all
from minigpt.speed.decoder import as_decoder
from tests.helpers import run_async

GREEDY = SamplingParams(0.0)


class Log:
    """One ordered record of what every ticket received: (name, item)."""

    def __init__(self):
        self.items, self.lock = [], threading.Lock()

    def ticket(self, name):
        log = self

        class Logged(Ticket):
            def put(self, item, wake=True):
                with log.lock:
                    log.items.append((name, item))
                super().put(item, wake)
        return Logged()

    def of(self, name):
        return [item for n, item in self.items if n == name]

    def tokens(self):
        return [name for name, item in self.items if isinstance(item, TokenEvent)]


def gate(scheduler):
    """Occupy the worker with a task until the returned event is set: the queue stays as submitted."""
    opened, running = threading.Event(), threading.Event()
    scheduler.submit(Task(lambda: (running.set(), opened.wait(30))))
    assert running.wait(30)
    return opened


def stream_job(model, tokenizer, log, name, n=3, prompt=(464, 3290), seed=0):
    return StreamJob(lambda: Stream(model, tokenizer, list(prompt), n, GREEDY, seed), log.ticket(name))


def finish(*tickets):
    for ticket in tickets:
        for _ in ticket:
            pass


@pytest.fixture
def tiny(tiny_model):
    model, tokenizer, _ = tiny_model
    return as_decoder(model), tokenizer


def test_waiting_requests_are_told_their_place_and_served_in_arrival_order(tiny):
    model, tokenizer = tiny
    scheduler, log = Scheduler(max_rows=1, max_waiting=10), Log()
    opened = gate(scheduler)
    tickets = [scheduler.submit(stream_job(model, tokenizer, log, name)) for name in "abcd"]
    assert [log.of(name) for name in "abcd"] == [[Queued(0)], [Queued(1)], [Queued(2)], [Queued(3)]]
    opened.set()
    finish(*tickets)
    # one row: each reply runs whole, in arrival order, and the others move up as each one starts
    assert log.tokens() == [*"aaa", *"bbb", *"ccc", *"ddd"]
    assert [item for item in log.of("d") if isinstance(item, Queued)] == [Queued(3), Queued(2), Queued(1), Queued(0)]
    assert all(isinstance(log.of(name)[-1], Done) and log.of(name)[-1].error is None for name in "abcd")


def test_rows_decode_together_and_new_requests_join_between_steps(tiny):
    model, tokenizer = tiny
    scheduler, log = Scheduler(max_rows=3, max_waiting=10), Log()
    opened = gate(scheduler)
    tickets = [scheduler.submit(stream_job(model, tokenizer, log, name, n=4)) for name in "ab"]
    opened.set()
    finish(*tickets)
    assert log.tokens() == [*"ab" * 4]  # one step, one token for every row


def test_a_full_queue_refuses_and_stop_while_waiting_computes_nothing(tiny):
    model, tokenizer = tiny
    scheduler, log = Scheduler(max_rows=1, max_waiting=2), Log()
    opened = gate(scheduler)
    made = []
    first = scheduler.submit(stream_job(model, tokenizer, log, "a"))
    second = scheduler.submit(StreamJob(lambda: made.append(1), log.ticket("b")))
    with pytest.raises(ServerBusy, match="busy: 2 requests are waiting"):
        scheduler.submit(stream_job(model, tokenizer, log, "c"))
    second.stop.set()
    opened.set()
    finish(first, second)
    assert log.of("b") == [Queued(1), Done(stopped=True)] and made == []  # never started, never built


def test_a_follow_up_of_a_queued_request_is_queued_when_the_queue_is_full(tiny):
    """A finished chat reply's panels: refusing them would fail a reply whose text the user already has."""
    scheduler = Scheduler(max_rows=1, max_waiting=1)
    opened = gate(scheduler)
    scheduler.submit(Task(lambda: None))  # the queue is full
    with pytest.raises(ServerBusy):
        scheduler.submit(Task(lambda: "refused"))
    follow_up = scheduler.submit(Task(lambda: "panels"), follow_up=True)
    opened.set()
    *_, done = follow_up
    assert done == Done(result="panels")


def test_tasks_run_in_their_turn_and_errors_stay_with_their_request(tiny):
    model, tokenizer = tiny
    scheduler, log = Scheduler(max_rows=4, max_waiting=10), Log()
    opened = gate(scheduler)
    ran = []
    a = scheduler.submit(stream_job(model, tokenizer, log, "a", n=6))
    bad = scheduler.submit(StreamJob(lambda: 1 / 0, log.ticket("bad")))
    task = scheduler.submit(Task(lambda: ran.append(len(log.of("a"))) or "result", log.ticket("task")))
    opened.set()
    finish(a, bad, task)
    assert isinstance(log.of("bad")[-1].error, ZeroDivisionError)
    assert log.of("task")[-1] == Done(result="result")
    assert ran and ran[0] < 6 + 3  # the task ran while "a" was still decoding, not after it
    assert len([item for item in log.of("a") if isinstance(item, TokenEvent)]) == 6  # "a" went on unharmed
    with pytest.raises(ValueError, match="boom"):
        scheduler.run(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert scheduler.run(lambda: 42) == 42


def test_a_long_prompt_is_read_in_chunks_between_the_running_streams_tokens(tiny):
    model, tokenizer = tiny
    scheduler, log = Scheduler(max_rows=2, max_waiting=10, prefill_chunk=8), Log()
    opened = gate(scheduler)
    short = scheduler.submit(stream_job(model, tokenizer, log, "short", n=30))
    long_prompt = tokenizer.encode_ordinary("word " * 100)[:100]
    long = scheduler.submit(stream_job(model, tokenizer, log, "long", n=2, prompt=long_prompt))
    opened.set()
    finish(short, long)
    order = log.tokens()
    # 100 prompt tokens, 8 a step: the long reply's first token comes ~13 steps in, and the short one
    # decoded a token at every one of those steps
    assert order.index("long") >= 12 and order[:12] == ["short"] * 12


def test_async_consumers_wait_without_threads(tiny):
    model, tokenizer = tiny
    scheduler = Scheduler(max_rows=1, max_waiting=500)
    opened = gate(scheduler)

    async def many():
        before = threading.active_count()
        tickets = [scheduler.submit(StreamJob(lambda: Stream(model, tokenizer, [464], 2, GREEDY, 0), Ticket()))
                   for _ in range(200)]

        async def consume(ticket):
            return [item async for item in ticket]
        tasks = [asyncio.create_task(consume(t)) for t in tickets]
        await asyncio.sleep(0.2)
        threads = threading.active_count()
        opened.set()
        results = await asyncio.gather(*tasks)
        return before, threads, results

    before, threads, results = run_async(many())
    assert threads == before  # 200 requests waiting, not one thread more
    assert all(isinstance(r[-1], Done) and sum(isinstance(i, TokenEvent) for i in r) == 2 for r in results)
    assert all(any(isinstance(i, Started) for i in r) for r in results)


def test_a_steps_tokens_wake_their_event_loop_once():
    """Tokens put without waking reach nobody until wake_all, which calls into the consumers' loop once for
    all their tickets (a write to its pipe and a GIL hand-over each, where there was one per ticket)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    tickets = [Ticket() for _ in range(3)]

    async def consume(ticket):
        return [item async for item in ticket]
    consumers = [asyncio.run_coroutine_threadsafe(consume(t), loop) for t in tickets]
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(5)  # each consumer is awaiting now
    calls, call = [], loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args: (calls.append(args), call(*args))[1]
    try:
        for ticket in tickets:
            ticket.put(Done(), wake=False)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(5)
        assert calls[1:] == [] and not any(c.done() for c in consumers)  # (calls[0]: the sleep's)
        wake_all(tickets)
        assert [c.result(5) for c in consumers] == [[Done()]] * 3
        assert len(calls) == 2  # the sleep's, and one wake for the three
    finally:
        loop.call_soon_threadsafe(loop.stop)


def test_replies_through_the_engine_equal_replies_alone(tiny_model):
    model, tokenizer, _ = tiny_model
    engine = Engine({BASE: as_decoder(model)}, tokenizer, "")
    requests = [read_request(BASE, t, 10, 0.9, 12, seed, 1.0, context=128)[0] for t, seed in ((0, 1), (0.8, 2), (1.2, 3))]
    prompts = [Prompt("", tokenizer.encode_ordinary(text), 0, ()) for text in ("Hi", "The fox", "Once upon")]
    streams = [engine.replies_blocking(r, p, threading.Event()) for r, p in zip(requests, prompts)]
    replies = [list(s)[-1] for s in streams]
    for reply, request, prompt in zip(replies, requests, prompts):
        expected = list(generate(model, tokenizer, prompt.ids, 12, request.params, seed=request.seed))
        assert reply.token_ids == [e.token_id for e in expected]
        assert reply.logprobs == pytest.approx([e.logprob for e in expected], abs=1e-5)
        assert reply.request == request and reply.finish_reason == "length"
