"""Streaming one chat reply: tokens and log-probs against transformers, Stop, and the stats line."""
import asyncio
import threading
import time

import pytest
import torch

from minigpt.request import ReplyRequest
from minigpt.sampling import SamplingParams
from minigpt.serve.conversation import BASE, TUNED, Prompt, read_request
from minigpt.serve.replies import Reply, paced, stats_line, stream_reply
from tests.helpers import run_async


def greedy(max_new_tokens):
    return read_request(BASE, 0, 0, 1.0, max_new_tokens, None, 1.0, context=128)[0]


def test_a_greedy_reply_matches_transformers_tokens_and_raw_logprobs(tiny_model):
    model, tokenizer, hf_model = tiny_model
    ids = tokenizer.encode_ordinary("User: Hello there\nAssistant:")
    prompt = Prompt("", ids, 0, stop=())
    replies = list(stream_reply(model, tokenizer, prompt, greedy(12), threading.Event()))

    reply = replies[-1]
    assert all(r is reply for r in replies) and len(replies) == 12  # one yield per token, the last one finished
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=50256)
    expected = out.sequences[0, len(ids):].tolist()
    assert reply.token_ids == expected
    raw = torch.stack([logits[0].log_softmax(-1) for logits in out.logits])
    torch.testing.assert_close(torch.tensor(reply.logprobs), raw[torch.arange(12), expected], atol=1e-4, rtol=0)
    top = raw[3].topk(5)
    assert [t for t, _ in reply.top[3]] == top.indices.tolist()
    assert reply.text == tokenizer.decode(expected) and reply.finish_reason == "length"
    assert 0 < reply.first_token_s <= reply.elapsed_s and reply.tokens_per_s > 0


def test_stop_ends_the_compute_between_tokens(tiny_model):
    model, tokenizer, _ = tiny_model
    steps = []
    hook = model.transformer.ln_f.register_forward_hook(lambda *_: steps.append(1))  # one call per model step
    try:
        stop = threading.Event()
        replies = stream_reply(model, tokenizer, Prompt("", [464, 3290], 0, ()), greedy(50), stop)
        for i, reply in enumerate(replies):
            if i == 2:
                stop.set()
        assert reply.finish_reason == "stopped" and len(reply.token_ids) == 3
        assert len(steps) == 3  # exactly the three tokens shown (the first step also reads the prompt)
    finally:
        hook.remove()


def test_stop_before_the_first_token_computes_nothing(tiny_model):
    model, tokenizer, _ = tiny_model
    stop = threading.Event()
    stop.set()
    (reply,) = stream_reply(model, tokenizer, Prompt("", [464], 0, ()), greedy(5), stop)
    assert reply.token_ids == [] and reply.finish_reason == "stopped" and reply.first_token_s is None


def test_a_stop_string_ends_the_reply_before_it(tiny_model):
    model, tokenizer, _ = tiny_model
    prompt = Prompt("", [464, 3290], 0, ())
    free = list(stream_reply(model, tokenizer, prompt, greedy(8), threading.Event()))[-1].text
    stop_at = free[len(free) // 2:len(free) // 2 + 2]
    assert stop_at.strip()
    cut = list(stream_reply(model, tokenizer, Prompt("", prompt.ids, 0, (stop_at,)), greedy(8),
                            threading.Event()))[-1]
    assert cut.finish_reason == "stop" and cut.text == free[:free.index(stop_at)]


def request(mode=BASE, scale=1.0):
    return ReplyRequest(mode, SamplingParams(0.0), 10, 0, scale)


@pytest.mark.parametrize("reply, line", [
    (Reply(request(), [1], token_ids=[5, 6, 7], first_token_s=0.5, elapsed_s=1.5, finish_reason="eos"),
     "3 tokens · first token 0.50 s · 2.0 tokens/s · Base GPT-2 · cpu float32 · ended by the model"),
    (Reply(request(TUNED), [1], token_ids=[5], first_token_s=0.25, elapsed_s=0.25, finish_reason="stopped"),
     "1 token · first token 0.25 s · Alpaca LoRA · cpu float32 · stopped by you"),
    (Reply(request(TUNED, 0.5), [1], token_ids=[5], first_token_s=0.25, elapsed_s=0.25, finish_reason="length"),
     "1 token · first token 0.25 s · Alpaca LoRA at scale 0.5 · cpu float32 · hit the token limit"),
    (Reply(request(), [1], finish_reason="stopped"), "0 tokens · Base GPT-2 · cpu float32 · stopped by you"),
    (Reply(request(), [1], ahead=0), "Waiting: next in line · Base GPT-2"),
    (Reply(request(TUNED, 2), [1], ahead=3), "Waiting: 3 requests ahead · Alpaca LoRA at scale 2"),
])
def test_stats_line(reply, line):
    assert stats_line(reply, "cpu float32") == line


def test_paced_sends_at_most_one_reply_per_frame_and_always_the_last(tiny_model):
    model, tokenizer, _ = tiny_model
    prompt = Prompt("", tokenizer.encode_ordinary("Hello"), 0, stop=())
    arrivals = []

    async def stream():
        for reply in stream_reply(model, tokenizer, prompt, greedy(60), threading.Event()):
            arrivals.append(time.perf_counter())
            yield reply
            await asyncio.sleep(0.002)  # a fast model: 60 tokens in well under a second, many per frame

    async def receive():
        return [(time.perf_counter(), len(reply.token_ids), reply.finish_reason)
                async for reply in paced(stream(), every_s=0.05)]

    sent = run_async(receive())
    assert len(arrivals) == 60 and sent[-1][1:] == (60, "length")  # the finished reply always arrives
    assert sent[0][1] == 1  # the first token shows at once
    assert 2 <= len(sent) < 60
    gaps = [b[0] - a[0] for a, b in zip(sent[:-2], sent[1:-1])]  # between unfinished replies
    assert all(gap >= 0.05 for gap in gaps), gaps


def test_closing_paced_closes_the_model_stream():
    closed = []

    async def stream():
        try:
            for n in range(50):
                yield n
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def two_then_leave():
        replies = paced(stream(), every_s=0)
        await anext(replies), await anext(replies)
        await replies.aclose()  # the browser went away: Gradio closes the handler's generator

    run_async(two_then_leave())
    assert closed == [True]  # closed, and with it the reply's ticket (whose Stop flag it sets)
