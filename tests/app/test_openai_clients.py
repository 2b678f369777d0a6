"""What real OpenAI clients send, against the running app: batched prompts (strings and token ids), n and
best_of, the penalties, logit_bias and min_p (transformers' logits, penalised by hand, as the oracle), structured
output (jsonschema validates every reply over many seeds), the tokenizer routes, /health and /metrics; and
LangChain's OpenAI and ChatOpenAI classes as clients nobody here wrote."""
import json

import httpx
import jsonschema
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import GPT2LMHeadModel, GPT2TokenizerFast, RepetitionPenaltyLogitsProcessor

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "n", "ok", "name"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99},
                         "ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 6}}}


@pytest.fixture(scope="module")
def api(app):
    return openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oracle(app):
    return GPT2LMHeadModel.from_pretrained(app.checkpoint).eval(), GPT2TokenizerFast.from_pretrained(app.checkpoint)


def greedy(model, ids, steps, warp=lambda logits, seen, generated: logits):
    """The oracle's greedy tokens after ids, each step's logits passed through warp(logits, prompt and generated
    ids, generated ids) first: the penalties written out by hand."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([out])).logits[0, -1]
            out.append(int(warp(logits.clone(), out, out[len(ids):]).argmax()))
            if out[-1] == 50256:
                break
    return [t for t in out[len(ids):] if t != 50256]


def test_a_list_of_prompts_strings_or_token_ids_gives_one_choice_each_as_alone(api, oracle):
    model, tokenizer = oracle
    texts = ["The history of the city", "Numbers: one, two,", "Once upon a time"]
    ids = [tokenizer(t).input_ids for t in texts]
    expected = [tokenizer.decode(greedy(model, i, 8)) for i in ids]
    for prompt in (texts, ids):
        completion = api.completions.create(model="minigpt-base", prompt=prompt, max_tokens=8, temperature=0)
        assert [c.index for c in completion.choices] == [0, 1, 2]
        assert [c.text for c in completion.choices] == expected
        assert completion.usage.prompt_tokens == sum(map(len, ids))
    single = api.completions.create(model="minigpt-base", prompt=ids[1], max_tokens=8, temperature=0)
    assert single.choices[0].text == expected[1]


def test_n_choices_are_the_seeds_that_follow_and_best_of_keeps_the_most_likely(api):
    args = dict(model="minigpt-base", prompt=["Hello", "Bye"], max_tokens=6, temperature=1.0, seed=2**63 + 5)
    both = api.completions.create(**args, n=3)
    assert [c.index for c in both.choices] == list(range(6))
    for i in range(3):  # sample i of each prompt is the request with seed + i
        alone = api.completions.create(**{**args, "prompt": "Bye", "seed": args["seed"] + i})
        assert both.choices[3 + i].text == alone.choices[0].text
    samples = api.completions.create(**{**args, "prompt": "Hello"}, n=4, logprobs=0)
    best = api.completions.create(**{**args, "prompt": "Hello"}, n=1, best_of=4)
    likeliest = max(samples.choices, key=lambda c: sum(c.logprobs.token_logprobs))
    assert [c.text for c in best.choices] == [likeliest.text] and best.usage.completion_tokens == sum(
        len(c.logprobs.tokens) for c in samples.choices)


def test_streamed_choices_carry_their_index_and_add_up_to_the_whole(api):
    args = dict(model="minigpt-tuned", prompt=["Hi", "Yo"], n=2, max_tokens=10, temperature=1.0, seed=3)
    whole = api.completions.create(**args)
    texts, finished = {}, {}
    for chunk in api.completions.create(**args, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    chat = api.chat.completions.create(model="minigpt-base", messages=[{"role": "user", "content": "Hi"}], n=3,
                                       max_tokens=5, seed=1)
    assert [c.index for c in chat.choices] == [0, 1, 2]


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.8), dict(frequency_penalty=1.5),
                                       dict(presence_penalty=2.0), dict(frequency_penalty=0.7, presence_penalty=-0.5),
                                       dict(logit_bias={"13": 100}), dict(logit_bias={"530": -100, "13": 5.5})])
def test_penalised_and_biased_greedy_text_is_the_oracles_by_hand(api, oracle, penalties):
    model, tokenizer = oracle
    ids = tokenizer("one, one, one, two, two, one, one").input_ids

    def warp(logits, seen, generated):
        for token, bias in penalties.get("logit_bias", {}).items():
            logits[int(token)] += bias
        if "repetition_penalty" in penalties:
            logits = RepetitionPenaltyLogitsProcessor(penalties["repetition_penalty"])(
                torch.tensor([seen]), logits[None])[0]
        for token in set(generated):
            logits[token] -= penalties.get("frequency_penalty", 0) * generated.count(token)
            logits[token] -= penalties.get("presence_penalty", 0)
        return logits

    completion = api.completions.create(model="minigpt-base", prompt=ids, max_tokens=12, temperature=0,
                                        extra_body={k: v for k, v in penalties.items() if k == "repetition_penalty"},
                                        **{k: v for k, v in penalties.items() if k != "repetition_penalty"})
    expected = greedy(model, ids, 12, warp)
    assert completion.choices[0].text == tokenizer.decode(expected)
    assert expected != greedy(model, ids, 12)  # the penalty changed the text: the test can tell


def test_min_p_at_1_keeps_only_the_most_likely_token(api, oracle):
    model, tokenizer = oracle
    ids = tokenizer("The cat sat").input_ids
    completion = api.completions.create(model="minigpt-base", prompt=ids, max_tokens=6, temperature=1.5, seed=9,
                                        extra_body={"min_p": 1.0})
    assert completion.choices[0].text == tokenizer.decode(greedy(model, ids, 6))


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_replies_parse_and_validate(api, seed):
    completion = api.chat.completions.create(
        model="minigpt-tuned", messages=[{"role": "user", "content": "Describe a thing as JSON."}], max_tokens=60,
        seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA,
                                                                           "strict": True}})
    content = completion.choices[0].message.content
    jsonschema.validate(json.loads(content), SCHEMA)
    assert " " not in content.replace(json.loads(content)["name"], "")  # no whitespace between JSON tokens
    assert completion.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", range(3))
def test_json_object_replies_are_objects_or_cut_by_the_token_budget(api, seed):
    completion = api.completions.create(model="minigpt-base", prompt="JSON:", max_tokens=40, seed=seed, n=2,
                                        extra_body={"response_format": {"type": "json_object"}})  # vLLM's extension
    for choice in completion.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
        else:
            assert choice.finish_reason == "length" and choice.text.startswith("{")


def test_tokenize_and_detokenize_answer_in_vllms_and_llama_cpps_shapes(app, oracle):
    _, tokenizer = oracle
    text = "Hello world<|endoftext|> again"
    ids = tokenizer(text).input_ids
    vllm = httpx.post(app.url + "tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()
    assert vllm["tokens"] == ids and vllm["count"] == len(ids) and vllm["max_model_len"] == 1024
    llama = httpx.post(app.url + "tokenize", json={"content": "Hi there", "with_pieces": True}, timeout=30).json()
    assert llama["tokens"] == [{"id": i, "piece": tokenizer.decode([i])} for i in tokenizer("Hi there").input_ids]
    back = httpx.post(app.url + "detokenize", json={"tokens": ids}, timeout=30).json()
    assert back == {"prompt": text, "content": text}
    bad = httpx.post(app.url + "detokenize", json={"tokens": [50257]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.get(app.url + "tokenizer_info", timeout=30).json()["eos_token"] == "<|endoftext|>"


def test_health_and_prometheus_metrics(app, api):
    assert httpx.get(app.url + "health", timeout=30).status_code == 200

    def samples():
        text = httpx.get(app.url + "metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = samples()
    completion = api.completions.create(model="minigpt-base", prompt="Hello", max_tokens=5, temperature=0)
    after = samples()
    ok = ("minigpt_api_requests_total", (("route", "/v1/completions"), ("status", "200")))
    assert after[ok] == before.get(ok, 0) + 1
    generated = ("minigpt_api_generation_tokens_total", ())
    assert after[generated] == before[generated] + completion.usage.completion_tokens
    assert after[("minigpt_api_time_to_first_token_seconds_count", ())] > 0
    assert ("minigpt_requests_waiting", ()) in after and ("minigpt_requests_running", ()) in after


def test_a_non_streaming_client_that_leaves_stops_its_reply_and_logs_no_error(app):
    body = {"model": "minigpt-base", "prompt": "Once", "max_tokens": 1000, "temperature": 1.0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(app.url + "v1/completions", json=body, timeout=1.0)
    httpx.get(app.url + "health", timeout=30)
    log = app.log.read_text()
    assert "KeyError" not in log and "failed" not in log and "Traceback" not in log


def test_langchain_openai_and_chat_openai_invoke_batch_and_stream(app):
    from langchain_openai import ChatOpenAI, OpenAI
    llm = OpenAI(model="minigpt-base", base_url=app.url + "v1", api_key="unused", max_tokens=6, temperature=0,
                 max_retries=0)
    assert isinstance(llm.invoke("Hello"), str)
    assert llm.batch(["Hello", "Once upon"]) == [llm.invoke("Hello"), llm.invoke("Once upon")]
    assert "".join(llm.stream("Hello")) == llm.invoke("Hello")
    chat = ChatOpenAI(model="minigpt-tuned", base_url=app.url + "v1", api_key="unused", max_tokens=6, temperature=0,
                      max_retries=0)
    answer = chat.invoke("Name a colour.").content
    assert [m.content for m in chat.batch(["Name a colour.", "Hi"])][0] == answer
    assert "".join(chunk.content for chunk in chat.stream("Name a colour.")) == answer
