"""The C decode step (minigpt/speed/native.py, int8_decode.c) against an independent oracle.

Oracle: our float32 model with every Linear's weight replaced by the int8 model's dequantized weight
(q * scale, from the stored tensors). The C step does the same arithmetic in another order and with
float32 activations, so it must agree to float32 rounding (tolerance 1e-4, where int8 rounding
itself moves logits by about 1e-2). The float32 model is checked against transformers elsewhere.
"""
import copy
import subprocess
import sys
import threading

import pytest
import torch

from minigpt.config import GPTConfig
from minigpt.generation import generate
from minigpt.inference import load_for_inference, speculative_drafts
from minigpt.model import GPT
from minigpt.sampling import SamplingParams
from minigpt.serve.engine import load_engine
from minigpt.speed import native
from minigpt.speed.decoder import Decoder
from minigpt.speed.native import NativeUnavailable, native_step
from minigpt.speed.quantize import Int8Linear, quantize_int8
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the C decode step needs AVX-512; other CPUs keep PyTorch's int8 kernel")
ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_model):
    """(int8 model decoding in C, float32 model on its dequantized weights, tokenizer)."""
    model, tokenizer, _ = tiny_model
    int8 = copy.deepcopy(model)
    quantize_int8(int8)
    int8 = Decoder(int8, native_step(int8), "C decode step")
    reference = copy.deepcopy(model)
    linears = dict(reference.named_modules())
    for name, quantized in int8.model.named_modules():
        if isinstance(quantized, Int8Linear) and name in linears:
            linears[name].weight = torch.nn.Parameter(quantized.dequantize())
    reference.lm_head.weight = reference.transformer.wte.weight = torch.nn.Parameter(int8.model.lm_head.dequantize())
    return int8, reference, tokenizer


def one_at_a_time(model, ids, cache):
    """Logits (T, vocab) of feeding ids one token per call."""
    return torch.cat([model(torch.tensor([[i]]), cache)[0] for i in ids])


def test_every_step_matches_the_dequantized_float32_model(models):
    int8, reference, tokenizer = models
    ids = tokenizer.encode_ordinary("The quick brown fox jumps over the lazy dog, and then it ran away")
    cache, ref_cache = int8.new_cache(64), reference.new_cache(64)
    with torch.inference_mode():
        ours = one_at_a_time(int8, ids, cache)
        expected = reference(torch.tensor([ids]), ref_cache)[0]
    assert cache.length == ref_cache.length == len(ids)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.k, ref_cache.k, atol=ATOL, rtol=0)  # the keys and values it stored
    torch.testing.assert_close(cache.v, ref_cache.v, atol=ATOL, rtol=0)
    plain = int8.model  # without the C step, PyTorch's int8 kernel rounds activations to bfloat16: not this close
    with torch.inference_mode():
        assert (one_at_a_time(plain, ids, plain.new_cache(64)) - expected).abs().max() > 10 * ATOL


def test_it_reads_a_cache_that_pytorch_wrote(models):
    """Production order: the prompt is read by PyTorch (many tokens at once), then the C step continues."""
    int8, reference, tokenizer = models
    ids = tokenizer.encode_ordinary("Once upon a time, in a small village by the sea,")
    cache = reference.new_cache(64)
    with torch.inference_mode():
        reference(torch.tensor([ids[:-1]]), cache)
        ours = int8(torch.tensor([ids[-1:]]), cache)[0]
        expected = reference(torch.tensor([ids]))[0, -1:]
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_prompts_and_batches_stay_on_pytorch(models):
    int8, _, tokenizer = models
    plain = int8.model  # the same model without the C step
    ids = torch.tensor([tokenizer.encode_ordinary("Hello there, general")] * 2)
    with torch.inference_mode():
        for x in (ids[:1], ids, ids[:, :1]):  # a prompt, a batch of prompts, a batch of single tokens
            assert torch.equal(int8(x, int8.new_cache(16, batch_size=x.size(0))),
                               plain(x, plain.new_cache(16, batch_size=x.size(0))))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=50)],
                         ids=["greedy", "sampled"])
def test_generate_streams_the_reference_tokens(models, params):
    int8, reference, tokenizer = models
    prompt = tokenizer.encode_ordinary("Hi")  # one token: the prompt's step is a C step too
    assert len(prompt) == 1
    ours = list(generate(int8, tokenizer, prompt, 40, params, seed=3))
    expected = list(generate(reference, tokenizer, prompt, 40, params, seed=3))
    assert [e.token_id for e in ours] == [e.token_id for e in expected]
    assert [e.logprob for e in ours] == pytest.approx([e.logprob for e in expected], abs=ATOL)


def test_concurrent_requests_do_not_share_state(models):
    int8, _, tokenizer = models
    prompts = [tokenizer.encode_ordinary(t) for t in ("One", "Two three", "Four five six", "Seven")]

    def tokens(prompt):
        return [e.token_id for e in generate(int8, tokenizer, prompt, 30, SamplingParams(temperature=0))]

    alone = [tokens(p) for p in prompts]
    together = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, tokens(prompts[i])))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_speculative_drafts_decode_in_c_and_keep_the_models_tokens(tiny_model):
    model, tokenizer, _ = tiny_model
    draft = speculative_drafts(model)[0]
    assert draft.step is not None and draft.kernel == "C decode step"
    prompt = tokenizer.encode_ordinary("The meaning of life is")
    plain = [e.token_id for e in generate(model, tokenizer, prompt, 30, SamplingParams(temperature=0))]
    fast = [e.token_id for e in generate(model, tokenizer, prompt, 30, SamplingParams(temperature=0), draft=draft)]
    assert fast == plain


def test_load_for_inference_decodes_int8_in_c(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    base, _, _ = load_for_inference(folder, device="cpu", precision="int8")
    assert isinstance(base.step, native.NativeDecoder)
    assert load_for_inference(folder, device="cpu", precision="float32")[0].step is None


def test_cli_and_app_decode_int8_in_c(models, tiny_checkpoint):
    _, reference, tokenizer = models
    folder = str(tiny_checkpoint[0])
    expected = [e.token_id for e in generate(reference, tokenizer, tokenizer.encode_ordinary("Hi"), 12,
                                             SamplingParams(temperature=0))]
    run = subprocess.run([sys.executable, "-m", "minigpt.generate", "--model", folder, "--dtype", "int8", "--prompt",
                          "Hi", "--max-new-tokens", "12", "--temperature", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == "", run.stderr  # no fallback warning
    assert run.stdout == "Hi" + tokenizer.decode(expected) + "\n"
    assert load_engine(folder, None, "cpu", "int8").device == "cpu int8 (C decode step)"


def test_without_a_compiler_int8_warns_and_decodes_with_pytorch(tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native, "library", native.library.__wrapped__)  # build afresh, not the cached library
    with pytest.warns(UserWarning, match=r"stays on PyTorch's kernel: no C compiler .*'/nonexistent/cc'"):
        base, _, tokenizer = load_for_inference(folder, device="cpu", precision="int8")
    assert base.step is None and base.kernel == "PyTorch"
    assert len(list(generate(base, tokenizer, [1, 2], 5, SamplingParams(temperature=0)))) == 5


def test_a_compiler_error_is_reported(monkeypatch):
    monkeypatch.setenv("CC", "false")  # runs, fails, says nothing
    with pytest.raises(NativeUnavailable, match="false could not build int8_decode.c"):
        native.library.__wrapped__()


def test_models_it_cannot_serve_are_refused_with_the_reason(tiny_model):
    model, _, _ = tiny_model
    with pytest.raises(NativeUnavailable, match="needs an int8 model"):
        native_step(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    quantize_int8(bf16)
    with pytest.raises(NativeUnavailable, match="float32 CPU tensors, got torch.bfloat16"):
        native_step(bf16)
    narrow = GPT(GPTConfig(vocab_size=100, n_positions=16, n_embd=48, n_layer=1, n_head=4))
    quantize_int8(narrow)
    with pytest.raises(NativeUnavailable, match="multiples of 64, got 48"):
        native_step(narrow)


def test_a_full_cache_is_refused(models):
    int8, _, _ = models
    cache = int8.new_cache(2)
    with torch.inference_mode():
        one_at_a_time(int8, [5, 6], cache)
        with pytest.raises(ValueError, match="KV cache holds 2 tokens; 3 requested"):
            int8(torch.tensor([[7]]), cache)
    assert cache.length == 2


def test_bad_tokens_and_foreign_caches_are_refused_before_c_runs(models):
    int8, _, _ = models
    with torch.inference_mode():
        for token in (-1, int8.config.vocab_size):
            with pytest.raises(IndexError, match=f"token id {token} is outside the vocabulary of 50257"):
                int8(torch.tensor([[token]]), int8.new_cache(4))
        wider = GPT(GPTConfig(vocab_size=100, n_positions=16, n_embd=64, n_layer=3, n_head=4)).new_cache(4)
        with pytest.raises(ValueError, match=r"this model's float32 cache for one sequence, got \(3, 1, 4, 4, 16\)"):
            int8(torch.tensor([[5]]), wider)
    assert wider.length == 0
