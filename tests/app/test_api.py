"""The running app driven through its API with gradio_client: a tiny checkpoint and adapter, transformers
and peft as the oracles for what each mode must answer."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from peft import PeftModel
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from minigpt.prompts import DIALOGUE_HEADER
from minigpt.serve.conversation import BASE, TUNED, message_text

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def oracle(app):
    """(transformers base model, peft-tuned model, tokenizer) for the app's own checkpoint and adapter."""
    base = GPT2LMHeadModel.from_pretrained(app.checkpoint).eval()
    tuned = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(app.checkpoint), app.adapter).eval()
    return base, tuned, GPT2TokenizerFast.from_pretrained(app.checkpoint)


def history(*texts):
    """A chat history in Gradio's messages format, alternating user and assistant, ending with the user."""
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": [{"type": "text", "text": t}]} for i, t in enumerate(texts)]


def chat_args(hist, mode=BASE, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=24, seed=""):
    return hist, mode, temperature, top_k, top_p, max_new_tokens, seed


def expected_reply(model, tokenizer, prompt, max_new_tokens, stops):
    """Greedy continuation by the oracle, cut at the first stop string, stripped as the chat shows it."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=50256)
    text = tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0]
    return text.strip()


def test_a_reply_streams_in_and_equals_transformers_greedy_text(app, oracle):
    base, _, tokenizer = oracle
    job = Client(app.url, verbose=False).submit(*chat_args(history("Hello, who are you?")), api_name="/chat")
    texts = [message_text(out[0][-1]) for out in job]  # every streamed update, as it arrived
    final = job.outputs()[-1]
    chat, stats, prompt = final[0], final[1], final[2]

    assert len(texts[0]) < len(texts[-1]) and all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # it grows
    assert prompt == DIALOGUE_HEADER + "User: Hello, who are you?\nAssistant:"
    assert message_text(chat[-1]) == expected_reply(base, tokenizer, prompt, 24, ["\nUser:", "\nAssistant:"])
    assert [m["role"] for m in chat] == ["user", "assistant"]
    assert "first token" in stats and f"{BASE} · cpu float32" in stats


def test_both_modes_answer_each_with_its_own_model(app, oracle):
    base, tuned, tokenizer = oracle
    client = Client(app.url, verbose=False)
    hist = history("Name a colour.", "Blue.", "Another one?")
    replies = {}
    for mode, model in [(BASE, base), (TUNED, tuned)]:
        chat, stats, prompt = client.predict(*chat_args(hist, mode), api_name="/chat")[:3]
        replies[mode] = message_text(chat[-1])
        stops = ["\nUser:", "\nAssistant:"] if mode == BASE else ["\n### "]
        assert replies[mode] == expected_reply(model, tokenizer, prompt, 24, stops)
        assert mode in stats
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Instruction:\nAnother one?\n\n### Input:\nUser: Name a colour.\nAssistant: Blue." in prompt
    assert replies[BASE] != replies[TUNED]


def test_two_concurrent_sessions_keep_their_own_conversations_and_panels(app):
    """One base and one tuned session at once: each gets its own reply and keeps its own last-reply data."""
    sessions = {BASE: (history("Tell me about cats."), 37),
                TUNED: (history("Write about dogs.", "Dogs are loyal.", "More?"), 53)}

    def converse(mode):
        hist, max_new_tokens = sessions[mode]
        client = Client(app.url, verbose=False)
        chat, stats = client.predict(*chat_args(hist, mode, temperature=1.0, seed="7", max_new_tokens=max_new_tokens),
                                     api_name="/chat")[:2]
        caption = client.predict(1, api_name="/alternatives")[0]  # reads the reply this session stored
        return chat, stats, caption

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(sessions, pool.map(converse, sessions)))
    counts = {}
    for mode, (chat, stats, caption) in results.items():
        assert [message_text(m) for m in chat[:-1]] == [message_text(m) for m in sessions[mode][0]]
        assert mode in stats
        counts[mode] = int(stats.split(" token")[0])
        assert caption.startswith(f"Token 1 of {counts[mode]}: chose ")
    assert counts[BASE] != counts[TUNED]
    assert message_text(results[BASE][0][-1]) != message_text(results[TUNED][0][-1])


def test_a_seed_repeats_a_sampled_reply(app):
    client = Client(app.url, verbose=False)
    args = chat_args(history("Surprise me."), temperature=1.0, top_k=50, top_p=0.9, seed="123")
    first, second = (message_text(client.predict(*args, api_name="/chat")[0][-1]) for _ in range(2))
    assert first == second


def test_a_long_conversation_drops_its_oldest_exchanges_and_says_so(app):
    turns = []
    for i in range(12):
        turns += [f"Question {i}: " + "tell me more " * 20, f"Answer {i}: " + "here is more " * 20]
    chat, stats, prompt = Client(app.url, verbose=False).predict(*chat_args(history(*turns, "Last one?")),
                                                                 api_name="/chat")[:3]
    assert "The conversation outgrew the 1024-token window: the oldest " in stats
    assert prompt.startswith(DIALOGUE_HEADER) and "Question 0:" not in prompt and "Answer 11:" in prompt
    assert prompt.endswith("User: Last one?\nAssistant:") and len(chat) == 26  # the chat itself keeps everything


def streaming_replies(client: Client, count: int) -> list:
    """count long sampled replies submitted at once, asked for again until all are streaming: the random model
    samples <|endoftext|> now and then, and a reply it ended is not in flight for a Stop to reach."""
    for attempt in range(5):
        jobs = [client.submit(*chat_args(history(f"Tell me long story {attempt}.{i}"), temperature=1.0,
                                         max_new_tokens=500), api_name="/chat") for i in range(count)]
        deadline = time.monotonic() + 60
        while any(len(job.outputs()) < 3 and not job.done() for job in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not any(job.done() for job in jobs):
            return jobs
        for job in jobs:
            job.result(timeout=60)
    pytest.fail(f"in 5 tries the model ended a reply before all {count} were streaming")


def test_stop_ends_the_generation_early(app):
    client = Client(app.url, verbose=False)
    (job,) = streaming_replies(client, 1)
    client.predict(api_name="/stop")
    stats = job.result(timeout=60)[1]
    tokens = int(stats.split(" token")[0])
    assert stats.endswith("stopped by you") and tokens < 500


@pytest.mark.parametrize("args, message", [
    (chat_args(history("hi"), seed="-5"), "Seed must be between 0 and 18446744073709551615"),
    (chat_args(history("hi"), seed="1.5"), "Seed must be a whole number, got '1.5'"),
    (chat_args(history("hi"), temperature=-1), "less than minimum value 0"),  # Gradio checks slider bounds
    (chat_args(history("hi"), top_p=1.5), "greater than maximum value 1"),
    (chat_args(history("hi"), mode="GPT-5"), "'GPT-5' .* is not in the list of choices"),
    (chat_args(history("hi", "hello")), "no user message to reply to"),
    (chat_args(history("word " * 1100)), "Your message is too long"),
])
def test_bad_input_gets_a_clear_error(app, args, message):
    with pytest.raises(AppError, match=message):
        Client(app.url, verbose=False).predict(*args, api_name="/chat")


@pytest.mark.parametrize("hist, message", [
    ("hello", "The chat history must be a list of messages."),
    ([{"role": "user"}], "Message 1 of the chat history must be an object with a role and a content."),
    ([{"content": [{"type": "text", "text": "hi"}]}], "Message 1 of the chat history must be an object"),
    ([{"role": "user", "content": 42}], "The content of message 1 must be text or a list of text parts."),
    ([{"role": "robot", "content": "hi"}], "Message 1 of the chat history has an unknown role"),
    ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "Message 1 of the chat history holds a part "
                                                                     "that is not text: the chat takes text only."),
    (history("hi", "hello") * 500 + history("more?"), "The chat history has 1001 messages; at most 1000"),
])
def test_a_malformed_history_gets_one_line_of_ours(app, hist, message):
    """(A file part naming a server path: see test_security, since gradio_client would upload that file.)"""
    with pytest.raises(AppError) as refused:
        Client(app.url, verbose=False).predict(*chat_args(hist), api_name="/chat")
    text = str(refused.value)
    assert text.startswith(message) and "\n" not in text
    assert not any(leak in text for leak in ("validation error", "pydantic", "/etc/passwd", "Traceback"))


def test_stop_reaches_both_replies_a_session_has_in_flight(app):
    client = Client(app.url, verbose=False)
    jobs = streaming_replies(client, 2)
    client.predict(api_name="/stop")
    for job in jobs:
        stats = job.result(timeout=60)[1]
        assert stats.endswith("stopped by you") and int(stats.split(" token")[0]) < 500
