"""The OpenAI-compatible API of the running app, driven by the official openai client; transformers and
peft are the oracles for the text and the log-probabilities, the app's own chat for the framing."""
import json
import time

import httpx
import openai
import pytest
import torch
from gradio_client import Client
from peft import PeftModel
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from minigpt.serve.conversation import BASE, TUNED, message_text
from tests.app.test_api import chat_args, expected_reply, history
from tests.helpers.app_server import running_app

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

STOPS = {BASE: ["\nUser:", "\nAssistant:"], TUNED: ["\n### "]}
IDS = {BASE: "minigpt-base", TUNED: "minigpt-tuned"}


@pytest.fixture(scope="module")
def api(app):
    return openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oracle(app):
    """{mode: transformers model (peft for the tuned one)}, and the tokenizer, for the app's checkpoint."""
    base = GPT2LMHeadModel.from_pretrained(app.checkpoint).eval()
    tuned = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(app.checkpoint), app.adapter).eval()
    return {BASE: base, TUNED: tuned}, GPT2TokenizerFast.from_pretrained(app.checkpoint)


def log_softmax(model, ids):
    """The oracle's raw log-probabilities (len(ids), vocab): row i is the distribution after ids[:i + 1]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def test_models_lists_base_and_tuned(api):
    assert sorted(m.id for m in api.models.list()) == ["minigpt-base", "minigpt-tuned"]
    assert api.models.retrieve("minigpt-tuned").id == "minigpt-tuned"


@pytest.mark.parametrize("mode", [BASE, TUNED])
def test_a_greedy_completion_is_the_oracles_greedy_text(api, oracle, mode):
    models, tokenizer = oracle
    prompt = "The history of the city begins"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = models[mode].generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=50256)
    completion = api.completions.create(model=IDS[mode], prompt=prompt, max_tokens=20, temperature=0)
    choice = completion.choices[0]
    assert choice.text == tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True)
    assert completion.usage.prompt_tokens == ids.size(1)
    assert completion.usage.completion_tokens == out.size(1) - ids.size(1)
    assert choice.finish_reason == ("length" if out.size(1) - ids.size(1) == 20 else "stop")


@pytest.mark.parametrize("mode", [BASE, TUNED])
def test_a_chat_completion_is_framed_as_the_app_frames_it_and_is_the_oracles_greedy_reply(app, api, oracle, mode):
    models, tokenizer = oracle
    turns = ["Name a colour.", "Blue.", "Another one?"]
    chat, _, prompt = Client(app.url, verbose=False).predict(*chat_args(history(*turns), mode), api_name="/chat")[:3]
    messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    completion = api.chat.completions.create(model=IDS[mode], messages=messages, max_tokens=24, temperature=0)
    content = completion.choices[0].message.content
    assert content.strip() == message_text(chat[-1])  # the app's reply to the same conversation
    assert content.strip() == expected_reply(models[mode], tokenizer, prompt, 24, STOPS[mode])
    assert completion.usage.prompt_tokens == len(tokenizer(prompt).input_ids)


def test_a_system_message_replaces_the_dialogue_header(api, oracle):
    _, tokenizer = oracle
    messages = [{"role": "system", "content": "A talk between two pirates."}, {"role": "user", "content": "Ahoy?"}]
    completion = api.chat.completions.create(model="minigpt-base", messages=messages, max_tokens=1, temperature=0)
    framed = "A talk between two pirates.\n\nUser: Ahoy?\nAssistant:"
    assert completion.usage.prompt_tokens == len(tokenizer(framed).input_ids)


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_chunks_add_up_to_the_whole_response(api, chat):
    args = dict(model="minigpt-tuned", max_tokens=30, temperature=1.0, top_p=0.9, seed=11)
    if chat:
        args["messages"] = [{"role": "user", "content": "Tell me a story."}]
        create, text = api.chat.completions.create, lambda c: c.message.content
        delta = lambda c: c.delta.content or ""  # noqa: E731
    else:
        args["prompt"] = "Once upon a time"
        create, text, delta = api.completions.create, lambda c: c.text, lambda c: c.text
    whole = create(**args)
    chunks = list(create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = [c for c in chunks if c.choices]
    assert "".join(delta(c.choices[0]) for c in streamed) == text(whole.choices[0])
    assert [c.choices[0].finish_reason for c in streamed][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in streamed[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1


def test_a_stream_is_server_sent_events_ending_with_done(app):
    body = {"model": "minigpt-base", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", app.url + "v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


def greedy_ids(model, tokenizer, prompt, max_new_tokens):
    """(prompt ids, the oracle's greedy continuation ids, the rows of log-probs that chose each of them)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=50256)[0].tolist()
    n = ids.size(1)
    return out[:n], out[n:], log_softmax(model, out)[n - 1:-1]


def test_completion_logprobs_are_the_oracles_log_softmax(api, oracle):
    models, tokenizer = oracle
    prompt = "Numbers: one, two,"
    completion = api.completions.create(model="minigpt-base", prompt=prompt, max_tokens=10, temperature=0, logprobs=5)
    logprobs = completion.choices[0].logprobs
    _, new, rows = greedy_ids(models[BASE], tokenizer, prompt, 10)
    assert logprobs.tokens == [tokenizer.decode([i]) for i in new]
    for row, token_id, chosen, top in zip(rows, new, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen == pytest.approx(float(row[token_id]), abs=1e-4)
        best = torch.topk(row, 5)
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert set(top) == {tokenizer.decode([i]) for i in best.indices.tolist()}
    assert logprobs.text_offset[0] == len(prompt)


def test_chat_top_logprobs_are_the_oracles_log_softmax(app, api, oracle):
    models, tokenizer = oracle
    completion = api.chat.completions.create(model="minigpt-tuned", messages=[{"role": "user", "content": "Hi!"}],
                                             max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    prompt = Client(app.url, verbose=False).predict(*chat_args(history("Hi!"), TUNED, max_new_tokens=1),
                                                    api_name="/chat")[2]  # the app's framing of the same message
    prompt_ids, new, rows = greedy_ids(models[TUNED], tokenizer, prompt, 8)
    tokens = completion.choices[0].logprobs.content
    assert completion.usage.prompt_tokens == len(prompt_ids) and 1 <= len(tokens) <= len(new)
    for row, token_id, token in zip(rows, new, tokens):
        assert token.token == tokenizer.decode([token_id])
        assert token.logprob == pytest.approx(float(row[token_id]), abs=1e-4)
        assert [a.logprob for a in token.top_logprobs] == pytest.approx(torch.topk(row, 3).values.tolist(), abs=1e-4)


def test_echo_scores_the_prompt(api, oracle):
    models, tokenizer = oracle
    text = "The cat sat on the mat."
    completion = api.completions.create(model="minigpt-base", prompt=text, max_tokens=0, echo=True, logprobs=2)
    choice = completion.choices[0]
    ids = tokenizer(text).input_ids
    expected = log_softmax(models[BASE], ids)
    assert choice.text == text and choice.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [float(expected[i, ids[i + 1]]) for i in range(len(ids) - 1)], abs=1e-4)
    assert completion.usage.completion_tokens == 0 and choice.finish_reason == "length"


@pytest.mark.parametrize("args, status, param, words", [
    (dict(model="gpt-4o"), 404, "model", "does not exist"),
    (dict(model=["minigpt-base"]), 400, "model", "model must be a model id (a string)"),
    (dict(temperature=2.5), 400, "temperature", "from 0 to 2"),
    (dict(top_p=0), 400, "top_p", "greater than 0 and at most 1"),
    (dict(top_k=-1), 400, "top_k", "from 0 to 50257"),
    (dict(max_tokens=0), 400, "max_tokens", "from 1 to 1023"),
    (dict(logprobs=6), 400, "logprobs", "from 0 to 5"),
    (dict(seed=-1), 400, "seed", "from 0 to 4294967295"),
    (dict(n=2), 400, "n", "from 1 to 1"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    (dict(prompt=[1, 2, 3]), 400, "prompt", "must be a string"),
    (dict(prompt="word " * 1100), 400, "prompt", "context window is 1024 tokens"),
])
def test_a_bad_completion_request_gets_openais_error_shape_and_status(app, args, status, param, words):
    body = {"model": "minigpt-base", "prompt": "Hi", "max_tokens": 4, **args}
    response = httpx.post(app.url + "v1/completions", json=body, timeout=60)
    error = response.json()["error"]
    assert response.status_code == status and error["param"] == param and words in error["message"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in response.text


@pytest.mark.parametrize("args, status, words", [
    (dict(messages=[]), 400, "non-empty list"),
    (dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]), 400,
     "must be the user's"),
    (dict(messages=[{"role": "tool", "content": "x"}]), 400, "system, user or assistant"),
    (dict(messages=[{"role": "user", "content": "word " * 1100}]), 400, "context window is 1024 tokens"),
    (dict(logprobs=True, top_logprobs=21), 400, "top_logprobs must be a whole number from 0 to 20"),
])
def test_a_bad_chat_request_is_refused_through_the_official_client(api, args, status, words):
    body = {"model": "minigpt-base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **args}
    with pytest.raises(openai.APIStatusError) as refused:
        api.chat.completions.create(**body)
    assert refused.value.status_code == status and words in refused.value.message


def test_bad_json_and_unknown_routes_get_openais_error_shape(app):
    bad = httpx.post(app.url + "v1/chat/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    deep = httpx.post(app.url + "v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000, timeout=30)
    assert deep.status_code == 400 and deep.json()["error"]["message"] == "The request body is nested too deeply."
    missing = httpx.get(app.url + "v1/embeddings", timeout=30)
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_disconnects_mid_stream_stops_its_generation(app):
    body = {"model": "minigpt-base", "prompt": "Once", "max_tokens": 1000, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", app.url + "v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the first token arrived; then the client hangs up
    log = app.log
    deadline = time.monotonic() + 60
    while "API: minigpt-base stopped after" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in log.read_text().splitlines() if x.startswith("API: minigpt-base stopped after"))
    assert int(line.split("after ")[1].split(" of")[0]) < 1000


def test_the_server_log_holds_no_traceback(app):
    log = app.log.read_text()
    assert "Traceback" not in log and "OpenAI-compatible API: http://127.0.0.1:" in log


def test_an_api_key_is_required_when_set(tmp_path):
    with running_app(tmp_path, app_args=["--api-key", "s3cret"], n_positions=64) as app:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            refused = httpx.get(app.url + "v1/models", headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        api = openai.OpenAI(base_url=app.url + "v1", api_key="s3cret", max_retries=0)
        assert api.completions.create(model="minigpt-base", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        assert "(a bearer API key is required)" in (tmp_path / "app.log").read_text()


def test_beyond_loopback_without_a_key_the_api_is_off_and_says_so(app_without_adapter):
    refused = httpx.get(app_without_adapter.url + "v1/models", timeout=30)
    assert refused.status_code == 403 and "--api-key" in refused.json()["error"]["message"]
    assert httpx.get(app_without_adapter.url, timeout=30).status_code == 200  # the chat itself is served
    assert "OpenAI-compatible API: off, because" in app_without_adapter.log.read_text()
