"""Hypothesis fuzzing of the engine's entry points: sampling parameters, odd prompts, the tokenizer,
the context-window rule and the streaming decoder. Every input gives a result or a ValueError that
names the bad field; nothing else escapes.

Lone surrogates (which a JSON client can send) are not an error: the tokenizer reads each one as
U+FFFD, and a high+low pair as the character it encodes (the UTF-16 reading, used as the oracle).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minigpt import load_pretrained
from minigpt.generation import StreamDecoder, fit_to_context, generate
from minigpt.sampling import SamplingParams, filter_logits, sample
from minigpt.tokenizer import EOT_ID
from tests.helpers.checkpoints import make_checkpoint

pytestmark = pytest.mark.slow

ODD_PIECES = ["", " ", "\t\n\r", "\x00", "\x07\x1b[31m", "\u202e", "\ufeff", "\ud800", "\udfff", "\ud83d\ude00",
              "<|endoftext|>", "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "**bold** `code`",
              "🎉👨‍👩‍👧", "中文字符", "日本語", "Ω≈ç√", "\u200b", "\\u0000", "'; DROP TABLE users; --"]
odd_text = st.lists(st.sampled_from(ODD_PIECES) | st.text(max_size=20), max_size=12).map("".join)
any_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e-320, 5e-324, 1e308])
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """A 16-token context, so even a huge max_new_tokens ends within 15 steps."""
    return load_pretrained(make_checkpoint(tmp_path_factory.mktemp("short"), n_positions=16)[0], device="cpu")


def utf16_reading(text: str) -> str:
    """What the tokenizer should see: surrogate pairs joined, lone surrogates replaced by U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def is_valid(temperature, top_k, top_p) -> bool:
    ok_t = isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0
    ok_k = top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0)
    ok_p = isinstance(top_p, (int, float)) and 0 < top_p <= 1
    return ok_t and ok_k and ok_p


@FUZZ
@given(temperature=any_float, top_k=st.none() | st.integers(-3, 10**9) | st.booleans(),
       top_p=any_float | st.sampled_from([1e-300, 1.0, 1.0000001]),
       logits=st.lists(st.floats(-50, 50), min_size=1, max_size=40), seed=st.integers(0, 2**32 - 1))
def test_sampling_params_give_a_valid_token_or_a_named_error(temperature, top_k, top_p, logits, seed):
    if not is_valid(temperature, top_k, top_p):
        with pytest.raises(ValueError, match="temperature|top_k|top_p"):
            SamplingParams(temperature, top_k, top_p)
        return
    params = SamplingParams(temperature, top_k, top_p)
    logits = torch.tensor(logits)
    filtered = filter_logits(logits, params)
    kept = torch.isfinite(filtered)
    assert kept[logits.argmax()], "the most likely token must always survive"
    if top_k and top_k < len(logits):
        kth = logits.sort(descending=True).values[top_k - 1]
        assert kept.sum() <= top_k + (logits == kth).sum() - 1  # ties at the k-th value are all kept
    token = int(sample(logits, params, torch.Generator().manual_seed(seed)))
    assert 0 <= token < len(logits) and kept[token]


@FUZZ
@given(prompt_len=st.integers(0, 400), max_new=st.integers(-10, 10**7), context=st.integers(2, 1024))
def test_context_window_rule(prompt_len, max_new, context):
    prompt = list(range(prompt_len))
    if max_new < 1:
        with pytest.raises(ValueError, match="max_new_tokens"):
            fit_to_context(prompt, max_new, context)
        return
    kept, budget = fit_to_context(prompt, max_new, context)
    assert budget == min(max_new, context - 1)
    assert len(kept) + budget <= context and kept == prompt[len(prompt) - len(kept):]
    assert len(kept) == min(prompt_len, context - budget)


@FUZZ
@given(text=odd_text)
def test_tokenizer_keeps_user_text_as_text(tiny_model, text):
    _, tokenizer, _ = tiny_model
    ids = tokenizer.encode_ordinary(text)
    assert EOT_ID not in ids  # a typed <|endoftext|> is never the special token
    assert tokenizer.decode(ids) == utf16_reading(text)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=odd_text, max_new=st.integers(-3, 10**6), temperature=st.sampled_from([0, 0.7, 1e-320, 2.0]),
       top_k=st.sampled_from([0, 1, 50, 10**6]), top_p=st.sampled_from([1e-300, 0.5, 1.0]), seed=st.integers(0, 99))
def test_generate_answers_any_prompt_or_names_the_bad_budget(short_model, text, max_new, temperature, top_k, top_p,
                                                             seed):
    model, tokenizer = short_model
    ids = tokenizer.encode_ordinary(text)
    events = generate(model, tokenizer, ids, max_new, SamplingParams(temperature, top_k, top_p), seed=seed)
    if max_new < 1:
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            next(events)
        return
    events = list(events)
    context = model.config.n_positions
    assert 1 <= len(events) <= min(max_new, context - 1)
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].finish_reason in ("eos", "length")
    assert all(0 <= e.token_id < model.config.vocab_size and math.isfinite(e.logprob) for e in events)
    text_ids = [e.token_id for e in events if e.token_id != EOT_ID]
    assert "".join(e.text for e in events) == tokenizer.decode_bytes(text_ids).decode("utf-8", "replace")


def test_a_100k_character_prompt_keeps_its_most_recent_tokens(tiny_model):
    model, tokenizer, _ = tiny_model
    text = "".join(ODD_PIECES) * (100_000 // len("".join(ODD_PIECES)) + 1)
    ids = tokenizer.encode_ordinary(text[:100_000])
    assert len(ids) > 10 * model.config.n_positions
    events = list(generate(model, tokenizer, ids, 8, SamplingParams(temperature=0)))
    # Greedy from the whole prompt equals greedy from the window the context rule keeps.
    window, _ = fit_to_context(ids, 8, model.config.n_positions)
    assert [e.token_id for e in events] == [e.token_id for e in generate(model, tokenizer, window, 8,
                                                                         SamplingParams(temperature=0))]


@FUZZ
@given(ids=st.lists(st.integers(0, EOT_ID - 1), max_size=30),
       stop=st.sampled_from(["\n", "User:", " the", "é", "\ufffd", ", "]) | st.text(min_size=1, max_size=4))
@example(ids=[126], stop="\ufffd")  # a lone continuation byte becomes U+FFFD only when flushed
def test_stream_decoder_emits_exactly_the_text_before_the_stop_string(tiny_model, ids, stop):
    _, tokenizer, _ = tiny_model
    whole = tokenizer.decode_bytes(ids).decode("utf-8", "replace")
    decoder, out, hit = StreamDecoder(tokenizer, [stop]), [], False
    for token in ids:
        text, hit = decoder.push(token)
        out.append(text)
        if hit:
            break
    if not hit:
        text, hit = decoder.flush()
        out.append(text)
    expected = whole[:whole.find(stop)] if stop in whole else whole
    assert "".join(out) == expected and hit == (stop in whole)
