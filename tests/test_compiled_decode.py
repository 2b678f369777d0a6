"""The static-shape decode step (GPT.step) and its compiled use (GPT.compile_decode).

Oracle: the model's own cached forward, which tests/test_engine_parity.py checks against
transformers; and generate() on the uncompiled model for the compiled one.
"""
import copy

import pytest
import torch

from minigpt.generation import generate
from minigpt.model import CACHE_BUCKET
from minigpt.quantize import quantize_int8
from minigpt.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


@torch.inference_mode()
def test_step_matches_cached_forward_and_returns_the_new_keys(tiny_model):
    model, _, _ = tiny_model
    prompt = torch.tensor([[5, 17, 300, 42, 9]])
    reference, static = model.new_cache(16), model.new_cache(16)
    token = model(prompt, reference, last_only=True)[:, -1].argmax(-1, keepdim=True)
    model(prompt, static)
    for _ in range(6):
        expected = model(token, reference)[:, -1]
        logits, k, v = model.step(token, torch.tensor([static.length]), static.k, static.v)
        static.append(k, v)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        n = reference.length
        assert static.length == n
        torch.testing.assert_close(static.k[:, :, :, :n], reference.k[:, :, :, :n], rtol=0, atol=1e-6)
        torch.testing.assert_close(static.v[:, :, :, :n], reference.v[:, :, :, :n], rtol=0, atol=1e-6)
        token = expected.argmax(-1, keepdim=True)
    assert static.k[:, :, :, static.length:].abs().max() == 0  # slots past the end were never written


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_compiled_decode_streams_what_eager_decode_does(tiny_model, int8):
    model, tokenizer, _ = tiny_model
    eager = copy.deepcopy(model)
    if int8:
        quantize_int8(eager)
    compiled = copy.deepcopy(eager)
    compiled.compile_decode()
    prompt = tokenizer.encode_ordinary("The quick brown fox")
    for new_tokens in (20, 7):  # two requests, the same cache bucket: one graph serves both
        want = list(generate(eager, tokenizer, prompt, new_tokens, GREEDY, top_n=3))
        got = list(generate(compiled, tokenizer, prompt, new_tokens, GREEDY, top_n=3))
        assert [e.token_id for e in got] == [e.token_id for e in want]
        assert [e.text for e in got] == [e.text for e in want]
        for g, w in zip(got, want):
            assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
    assert compiled.new_cache(len(prompt) + 20).max_len == min(CACHE_BUCKET, model.config.n_positions)


def test_compiled_decode_refuses_a_full_cache(tiny_model):
    model = copy.deepcopy(tiny_model[0])
    model.compile_decode()
    cache = model.new_cache(4)
    model(torch.tensor([[1] * cache.max_len]), cache)
    with pytest.raises(ValueError, match="KV cache holds"):
        model(torch.tensor([[1]]), cache)


def test_a_tuned_model_built_from_a_compiled_base_compiles_its_own_step(tiny_model, tiny_checkpoint, tmp_path):
    from app_server import make_adapter
    from lora import load_tuned_model
    base = copy.deepcopy(tiny_model[0])
    base.compile_decode()
    tuned = load_tuned_model(base, make_adapter(tiny_checkpoint[0], tmp_path / "adapter"))
    # torch.compile keeps the function it wraps: the tuned step must be tuned's, or it would run base's weights
    assert tuned.compiled_step._torchdynamo_orig_callable.__self__ is tuned
    assert base.compiled_step._torchdynamo_orig_callable.__self__ is base
