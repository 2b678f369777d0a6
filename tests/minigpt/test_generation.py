"""The streaming decoder: events, UTF-8 safety, stop strings, context rule, cancellation, seeds."""

import pytest
import torch

from minigpt import GPTConfig, SamplingParams, fit_to_context, generate
from minigpt.model import KVCache

GREEDY = SamplingParams(temperature=0)


class ScriptedModel:
    """Stands in for GPT in the decode loop: predicts a fixed script of tokens after the prompt and counts calls."""

    def __init__(self, script: list[int], prompt_len: int, n_positions: int = 1024):
        self.config = GPTConfig(n_positions=n_positions, n_embd=8, n_layer=1, n_head=1)
        self.device = torch.device("cpu")
        self.script, self.prompt_len, self.calls = script, prompt_len, 0

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config, max_len)

    def __call__(self, idx, cache, last_only=False):
        self.calls += 1
        cache.length += idx.size(1)
        logits = torch.full((1, 1, 50257), -10.0)
        k = cache.length - self.prompt_len  # index in the script of the token predicted now
        logits[0, 0, self.script[k] if k < len(self.script) else 0] = 10.0
        return logits


def run(tokenizer, script, prompt="Say:", stop=(), max_new_tokens=100):
    prompt_ids = tokenizer.encode_ordinary(prompt)
    model = ScriptedModel(script, len(prompt_ids))
    return model, list(generate(model, tokenizer, prompt_ids, max_new_tokens, GREEDY, stop=stop))


def test_split_utf8_characters_arrive_whole(tiny_model):
    _, tokenizer, _ = tiny_model
    text = " 🎉🔥 日本語のテキスト, naïve 👨‍👩‍👧 done"
    script = tokenizer.encode_ordinary(text)
    partial = [t for t in script if not _valid_utf8(tokenizer.decode_single_token_bytes(t))]
    assert partial, "the test text must contain characters split across tokens"
    _, events = run(tokenizer, script + [tokenizer.eot_token])
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == text
    assert [e.token_id for e in events] == script + [tokenizer.eot_token]
    assert events[-1].finish_reason == "eos" and all(e.finish_reason is None for e in events[:-1])


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stop_string_across_tokens_ends_before_it(tiny_model):
    _, tokenizer, _ = tiny_model
    script = tokenizer.encode_ordinary("Hello world, and more text after")
    model, events = run(tokenizer, script, stop=["o w"])
    assert "".join(e.text for e in events) == "Hell"
    assert events[-1].finish_reason == "stop"
    assert len(events) == 2  # "Hello", " world": no token is generated after the stop string completes
    assert model.calls == 2  # one step per token (the first also reads the prompt), none after the stop


def test_text_held_back_for_a_possible_stop_string_is_released(tiny_model):
    _, tokenizer, _ = tiny_model
    script = tokenizer.encode_ordinary("User said hi. Userland is fine")
    _, events = run(tokenizer, script, stop=["\nUser:"], max_new_tokens=len(script))
    assert "".join(e.text for e in events) == "User said hi. Userland is fine"
    assert events[-1].finish_reason == "length"


def test_endoftext_stops_and_is_not_shown(tiny_model):
    _, tokenizer, _ = tiny_model
    script = tokenizer.encode_ordinary("abc") + [tokenizer.eot_token] + tokenizer.encode_ordinary(" zzz")
    _, events = run(tokenizer, script)
    assert "".join(e.text for e in events) == "abc"
    assert events[-1].token_id == tokenizer.eot_token and events[-1].finish_reason == "eos"


def test_closing_the_generator_stops_the_compute(tiny_model):
    _, tokenizer, _ = tiny_model
    prompt_ids = tokenizer.encode_ordinary("Count:")
    model = ScriptedModel(tokenizer.encode_ordinary(" one two three four five six seven"), len(prompt_ids))
    stream = generate(model, tokenizer, prompt_ids, 100, GREEDY)
    taken = [next(stream) for _ in range(3)]
    stream.close()
    assert len(taken) == 3 and model.calls == 3  # one step per token; the first also reads the prompt
    with pytest.raises(StopIteration):
        next(stream)
    assert model.calls == 3


@pytest.mark.parametrize("prompt_len, max_new, context, kept, budget", [
    (10, 5, 128, 10, 5),  # fits: nothing changes
    (200, 20, 128, 108, 20),  # too long: the most recent 108 tokens stay, 20 new tokens fit
    (50, 500, 128, 1, 127),  # the budget is capped at context - 1: one prompt token stays
    (128, 1, 128, 127, 1),
])
def test_context_window_rule(prompt_len, max_new, context, kept, budget):
    prompt = list(range(prompt_len))
    ids, new = fit_to_context(prompt, max_new, context)
    assert (len(ids), new) == (kept, budget)
    assert ids == prompt[-kept:] and len(ids) + new <= context


def test_context_rule_rejects_a_non_positive_budget():
    with pytest.raises(ValueError, match="max_new_tokens"):
        fit_to_context([1, 2], 0, 128)


def test_over_long_prompt_generates_within_the_window(tiny_model):
    model, tokenizer, _ = tiny_model
    long_prompt = tokenizer.encode_ordinary("word " * 600)
    assert len(long_prompt) > model.config.n_positions
    events = list(generate(model, tokenizer, long_prompt, 30, GREEDY))
    assert 1 <= len(events) <= 30
    # the result equals generating from the kept tail of the prompt
    tail, _ = fit_to_context(long_prompt, 30, model.config.n_positions)
    assert [e.token_id for e in generate(model, tokenizer, tail, 30, GREEDY)] == [e.token_id for e in events]


def test_budget_larger_than_the_window_is_capped(tiny_model):
    _, tokenizer, _ = tiny_model
    prompt_ids = tokenizer.encode_ordinary("x")
    model = ScriptedModel([tokenizer.encode_ordinary("a")[0]] * 5000, len(prompt_ids), n_positions=64)
    events = list(generate(model, tokenizer, prompt_ids, 5000, GREEDY))
    assert len(events) == 63 and events[-1].finish_reason == "length"


def test_same_seed_same_text_and_logprobs_are_raw(tiny_model):
    model, tokenizer, _ = tiny_model
    prompt = tokenizer.encode_ordinary("Once upon a time")
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9)
    a = list(generate(model, tokenizer, prompt, 24, params, seed=11))
    b = list(generate(model, tokenizer, prompt, 24, params, seed=11))
    c = list(generate(model, tokenizer, prompt, 24, params, seed=12))
    assert [e.token_id for e in a] == [e.token_id for e in b]
    assert [e.token_id for e in a] != [e.token_id for e in c]

    ids = torch.tensor([prompt + [e.token_id for e in a]])
    with torch.no_grad():
        raw = model(ids)[0].log_softmax(-1)  # the unfiltered distribution at temperature 1
    for i, event in enumerate(a):
        row = raw[len(prompt) - 1 + i]
        assert event.logprob == pytest.approx(row[event.token_id].item(), abs=1e-4)
        top = torch.topk(row, 5)
        assert [t for t, _ in event.top] == top.indices.tolist()
        assert [lp for _, lp in event.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_attention_rows_per_step(tiny_model):
    model, tokenizer, _ = tiny_model
    prompt = tokenizer.encode_ordinary("The cat sat on the")
    events = list(generate(model, tokenizer, prompt, 8, GREEDY, return_attention=True))
    cfg = model.config
    ids = torch.tensor([prompt + [e.token_id for e in events]])
    with torch.no_grad():
        _, full = model.forward_with_attention(ids)
    for i, event in enumerate(events):
        query = len(prompt) - 1 + i  # the position whose logits chose this token
        assert event.attention.shape == (cfg.n_layer, cfg.n_head, query + 1)
        torch.testing.assert_close(event.attention.sum(-1), torch.ones(cfg.n_layer, cfg.n_head))
        torch.testing.assert_close(event.attention, full[:, 0, :, query, :query + 1], rtol=0, atol=1e-5)
    assert all(e.attention is None for e in generate(model, tokenizer, prompt, 3, GREEDY))


def test_empty_prompt_starts_from_endoftext(tiny_model):
    model, tokenizer, _ = tiny_model
    events = list(generate(model, tokenizer, [], 5, GREEDY))
    expected = list(generate(model, tokenizer, [tokenizer.eot_token], 5, GREEDY))
    assert [e.token_id for e in events] == [e.token_id for e in expected]


def test_forced_tokens_lead_and_the_greedy_continuation_equals_transformers(tiny_model):
    """Branching: the reply's first tokens are forced (a prefix, then an alternative); the rest is the
    oracle's greedy continuation of prompt + forced tokens, and every forced token keeps its raw log-prob."""
    model, tokenizer, hf_model = tiny_model
    prompt = tokenizer.encode_ordinary("Once upon a time there was")
    original = list(generate(model, tokenizer, prompt, 12, GREEDY))
    alternative = original[3].top[1][0]  # the second most likely token at the 4th position
    forced = [e.token_id for e in original[:3]] + [alternative]
    events = list(generate(model, tokenizer, prompt, 12, GREEDY, forced=forced))
    assert [e.token_id for e in events[:4]] == forced
    for ours, theirs in zip(events[:4], original[:4]):  # the same distributions as the original reply's
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        assert [lp for _, lp in ours.top] == pytest.approx([lp for _, lp in theirs.top], abs=1e-4)
    assert events[3].logprob == pytest.approx(original[3].top[1][1], abs=1e-4)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt + forced]), max_new_tokens=8, do_sample=False,
                                pad_token_id=50256)
    assert [e.token_id for e in events[4:]] == out[0, len(prompt) + 4:].tolist()
    with pytest.raises(ValueError, match="forced tokens exceed"):
        next(generate(model, tokenizer, prompt, 2, GREEDY, forced=forced))
