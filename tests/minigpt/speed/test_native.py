"""The C decode step (minigpt/speed/native.py, decode_step.c) against an independent oracle.

Every variant this CPU can run is checked (on x86-64: avx2 and the portable C loop always, avx512
where the CPU has it); the aarch64 variants are checked under emulation (qemu-aarch64) at the end.

A batched step (step_rows: several sequences, of a base model and its LoRA-merged copy, in one call)
is checked against each row's own single step: the logits and the cache writes must be bit for bit
the same.

float32 models: the oracle is the same model's PyTorch forward. The C step multiplies the same
float32 numbers in another order, so logits agree to float32 rounding (FLOAT32_ATOL).

int8 and int4 models: the oracle is our float32 model with every Linear's weight replaced by the quantized
model's dequantized weight (q * scale, from the stored tensors; int4: its int8 lm_head and int4 blocks) and
every Linear's input rounded to int16 as the C step rounds it (round_like_c). The C step does the same
arithmetic in another order, so it must agree to float32 rounding (tolerance 1e-4, where int8 rounding
itself moves logits by about 1e-2). Without the int16 rounding, the dequantized model still agrees to
INT16_REL of the largest logit. The float32 model is checked against transformers elsewhere.
"""
import copy
import ctypes
import dataclasses
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lora import inject_lora
from minigpt.adapters import merge_deltas
from minigpt.config import GPTConfig
from minigpt.generation import generate
from minigpt.inference import load_for_inference, speculative_drafts
from minigpt.model import GPT, KVCache
from minigpt.sampling import SamplingParams
from minigpt.serve.engine import load_engine
from minigpt.speed import native
from minigpt.speed.decoder import Decoder
from minigpt.speed.native import NativeUnavailable, native_step, read_tokens, step_rows
from minigpt.speed.onednn import KERNEL_ENV, use_input_major_weights
from minigpt.speed.int4 import Int4Linear, quantize_int4
from minigpt.speed.quantize import Int8Linear, quantize_int8
from tests.helpers import REPO, generate_cli

ATOL = 1e-4
FLOAT32_ATOL = 1e-5  # the tiny model's logits are about 1 in size: a few float32 roundings apart
INT16_REL = 3e-5  # int16 activations: |C - dequantized float32| <= ATOL + INT16_REL * max|logit|
QUANTIZE = {"int8": quantize_int8, "int4": quantize_int4}
# The variants of this CPU's architecture; only one the CPU cannot run (avx512 on an AVX2-only x86) skips.
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in native.cpu_isas(), reason=f"this CPU cannot run {isa}"))
        for isa in (("neon", "generic") if platform.machine().lower() in native.ARM64 else ("avx512", "avx2", "generic"))]


@pytest.fixture(autouse=True, scope="module")
def fresh_build_cache(tmp_path_factory):
    """Build into a folder of this test run (the build cache itself is tested too), not the user's cache."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        m.delenv("MINIGPT_ISA", raising=False)
        yield


def round_like_c(x: torch.Tensor) -> torch.Tensor:
    """Each vector rounded to int16 with one scale, amax / 32767, as decode_step.c's linear does for int8."""
    amax = x.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 32767 / amax, 0)
    return torch.round(x * inverse) * (amax / 32767)


def dequantized_reference(model, int8, round_inputs=True):
    """A float32 copy of model whose Linears hold the int8 or int4 model's dequantized weights and, with
    round_inputs, round their inputs to int16: what the C step computes."""
    int8 = unwrapped(int8)
    reference = copy.deepcopy(model)
    linears = dict(reference.named_modules())
    for name, quantized in int8.named_modules():
        if isinstance(quantized, (Int8Linear, Int4Linear)) and name in linears:
            linears[name].weight = torch.nn.Parameter(quantized.dequantize())
            if round_inputs:
                linears[name].register_forward_pre_hook(lambda module, args: (round_like_c(args[0]),))
    reference.lm_head.weight = reference.transformer.wte.weight = torch.nn.Parameter(int8.lm_head.dequantize())
    return reference


def unwrapped(model: GPT | Decoder) -> GPT:
    return model.model if isinstance(model, Decoder) else model


def c_decoder(model: GPT, isa: str | None = None, precision: str = "int8") -> Decoder:
    """An int8 (or int4) copy of model decoding in C (the variant for this CPU, or isa)."""
    int8 = copy.deepcopy(model)
    QUANTIZE[precision](int8)
    return Decoder(int8, native_step(int8, isa), "C decode step")


def assert_close_to_dequantized(ours, model, int8, ids):
    """The C step's logits ours vs the dequantized float32 model without int16 rounding: within INT16_REL."""
    with torch.inference_mode():
        expected = dequantized_reference(model, int8, round_inputs=False)(torch.tensor([ids]))[0]
    assert (ours - expected).abs().max() <= ATOL + INT16_REL * expected.abs().max()


QUANTIZED_ISAS = [pytest.param((isa.values[0], precision), marks=isa.marks, id=f"{isa.values[0]}-{precision}")
                  for isa in ISAS for precision in QUANTIZE]


@pytest.fixture(scope="module", params=QUANTIZED_ISAS)
def models(request, tiny_model):
    """(int8 or int4 model decoding in C with one variant, float32 model on its dequantized weights, tokenizer,
    the float32 model)."""
    model, tokenizer, _ = tiny_model
    isa, precision = request.param
    int8 = c_decoder(model, isa, precision)
    assert int8.step.isa == isa
    return int8, dequantized_reference(model, int8), tokenizer, model


@pytest.fixture(scope="module")
def default_models(tiny_model):
    """models, with the variant chosen for this CPU."""
    model, tokenizer, _ = tiny_model
    int8 = c_decoder(model)
    assert int8.step.isa == native.cpu_isas()[0]
    return int8, dequantized_reference(model, int8), tokenizer


@pytest.fixture(scope="module", params=ISAS)
def float32_models(request, tiny_model):
    """(float32 model decoding in C with one variant, the same model on PyTorch, tokenizer)."""
    model, tokenizer, _ = tiny_model
    in_c = Decoder(model, native_step(model, request.param), "C decode step")
    assert in_c.step.isa == request.param
    return in_c, model, tokenizer


def one_at_a_time(model, ids, cache):
    """Logits (T, vocab) of feeding ids one token per call."""
    return torch.cat([model(torch.tensor([[i]]), cache)[0] for i in ids])


def test_every_step_matches_the_dequantized_float32_model(models):
    int8, reference, tokenizer, model = models
    ids = tokenizer.encode_ordinary("The quick brown fox jumps over the lazy dog, and then it ran away")
    cache, ref_cache = int8.new_cache(64), reference.new_cache(64)
    with torch.inference_mode():
        ours = one_at_a_time(int8, ids, cache)
        expected = reference(torch.tensor([ids]), ref_cache)[0]
    assert cache.length == ref_cache.length == len(ids)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.k, ref_cache.k, atol=ATOL, rtol=0)  # the keys and values it stored
    torch.testing.assert_close(cache.v, ref_cache.v, atol=ATOL, rtol=0)
    assert_close_to_dequantized(ours, model, int8, ids)
    plain = int8.model  # without the C step, PyTorch's int8 kernel (int4's lm_head too) rounds activations to
    with torch.inference_mode():  # bfloat16: not this close
        assert (one_at_a_time(plain, ids, plain.new_cache(64)) - expected).abs().max() > 10 * ATOL


def test_float32_steps_match_the_pytorch_forward(float32_models):
    in_c, model, tokenizer = float32_models
    ids = tokenizer.encode_ordinary("The quick brown fox jumps over the lazy dog, and then it ran away")
    cache, ref_cache = in_c.new_cache(64), model.new_cache(64)
    with torch.inference_mode():
        ours = one_at_a_time(in_c, ids, cache)
        expected = model(torch.tensor([ids]), ref_cache)[0]
        step_by_step = one_at_a_time(model, ids, model.new_cache(64))
    assert cache.length == ref_cache.length == len(ids)
    torch.testing.assert_close(ours, expected, atol=FLOAT32_ATOL, rtol=0)
    torch.testing.assert_close(cache.k, ref_cache.k, atol=FLOAT32_ATOL, rtol=0)
    torch.testing.assert_close(cache.v, ref_cache.v, atol=FLOAT32_ATOL, rtol=0)
    assert not torch.equal(ours, step_by_step)  # the C step ran (it sums in another order than PyTorch)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=50)],
                         ids=["greedy", "sampled"])
def test_float32_generate_streams_the_pytorch_tokens(float32_models, params):
    in_c, model, tokenizer = float32_models
    ours = list(generate(in_c, tokenizer, tokenizer.encode_ordinary("Hi"), 40, params, seed=3))
    expected = list(generate(model, tokenizer, tokenizer.encode_ordinary("Hi"), 40, params, seed=3))
    assert [e.token_id for e in ours] == [e.token_id for e in expected]
    assert [e.logprob for e in ours] == pytest.approx([e.logprob for e in expected], abs=FLOAT32_ATOL)


def test_it_reads_a_cache_that_pytorch_wrote(models):
    """Production order: the prompt is read by PyTorch (many tokens at once), then the C step continues."""
    int8, reference, tokenizer, _ = models
    ids = tokenizer.encode_ordinary("Once upon a time, in a small village by the sea,")
    cache = reference.new_cache(64)
    with torch.inference_mode():
        reference(torch.tensor([ids[:-1]]), cache)
        ours = int8(torch.tensor([ids[-1:]]), cache)[0]
        expected = reference(torch.tensor([ids]))[0, -1:]
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_batches_and_every_positions_logits_stay_on_pytorch(default_models):
    int8, _, tokenizer = default_models
    plain = int8.model  # the same model without the C step
    ids = torch.tensor([tokenizer.encode_ordinary("Hello there, general")] * 2)
    with torch.inference_mode():
        for x in (ids[:1], ids, ids[:, :1]):  # a prompt's every position, a batch of prompts, of single tokens
            assert torch.equal(int8(x, int8.new_cache(16, batch_size=x.size(0))),
                               plain(x, plain.new_cache(16, batch_size=x.size(0))))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=50)],
                         ids=["greedy", "sampled"])
def test_generate_streams_the_reference_tokens(models, params):
    int8, reference, tokenizer, _ = models
    prompt = tokenizer.encode_ordinary("Hi")  # one token: the prompt's step is a C step too
    assert len(prompt) == 1
    ours = list(generate(int8, tokenizer, prompt, 40, params, seed=3))
    expected = list(generate(reference, tokenizer, prompt, 40, params, seed=3))
    assert [e.token_id for e in ours] == [e.token_id for e in expected]
    assert [e.logprob for e in ours] == pytest.approx([e.logprob for e in expected], abs=ATOL)


def test_concurrent_requests_do_not_share_state(default_models):
    int8, _, tokenizer = default_models
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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_decodes_with_threads_of_its_own(default_models):
    """The step's thread pool lives in the process: a child forked after the parent used it has none of
    its threads and must start its own rather than wait for them."""
    int8, _, _ = default_models
    step = int8.step

    def logits_of(token):
        cache, logits = int8.new_cache(4), torch.empty(int8.config.vocab_size)
        assert step.lib.gpt2_step(step.model, token, 0, cache.k.data_ptr(), cache.v.data_ptr(), cache.max_len,
                                  logits.data_ptr(), 2) == 0  # two threads: the pool, whatever torch says
        return logits

    expected = logits_of(7).numpy().tobytes()  # the parent's pool is running now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its answer through the pipe, then out at once (no pytest teardown here)
        try:  # no PyTorch op runs in the child: PyTorch's OpenMP does not survive a fork
            os.write(write, b"same" if logits_of(7).numpy().tobytes() == expected else b"different")
        finally:
            os._exit(0)
    os.close(write)
    for _ in range(600):  # a minute at most: a child waiting for threads it does not have would hang for good
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's step did not finish within a minute")
    assert os.read(read, 16) == b"same" and os.waitstatus_to_exitcode(status) == 0


def test_speculative_drafts_decode_in_c_and_keep_the_models_tokens(tiny_model):
    model, tokenizer, _ = tiny_model
    draft = speculative_drafts(model)[0]
    assert draft.step is not None and draft.kernel == "C decode step"
    prompt = tokenizer.encode_ordinary("The meaning of life is")
    plain = [e.token_id for e in generate(model, tokenizer, prompt, 30, SamplingParams(temperature=0))]
    fast = [e.token_id for e in generate(model, tokenizer, prompt, 30, SamplingParams(temperature=0), draft=draft)]
    assert fast == plain


def test_load_for_inference_decodes_int8_int4_and_float32_in_c_unless_asked_otherwise(tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint
    for precision in ("int8", "int4", "float32"):
        assert isinstance(load_for_inference(folder, device="cpu", precision=precision)[0].step, native.NativeDecoder)
    assert load_for_inference(folder, device="cpu", precision="bfloat16")[0].step is None
    for kernel in ("pytorch", "onednn"):  # a PyTorch kernel asked for float32: not the C step
        monkeypatch.setenv(KERNEL_ENV, kernel)
        assert load_for_inference(folder, device="cpu", precision="float32")[0].step is None
        assert load_for_inference(folder, device="cpu", precision="int8")[0].step is not None
        assert load_for_inference(folder, device="cpu", precision="int4")[0].step is not None


def test_cli_and_app_decode_int8_in_c(default_models, tiny_checkpoint):
    _, reference, tokenizer = default_models
    folder = str(tiny_checkpoint[0])
    expected = [e.token_id for e in generate(reference, tokenizer, tokenizer.encode_ordinary("Hi"), 12,
                                             SamplingParams(temperature=0))]
    with warnings.catch_warnings(record=True) as caught:  # in a process of its own, a warning line on stderr
        warnings.simplefilter("always")
        run = generate_cli("--model", folder, "--dtype", "int8", "--prompt", "Hi", "--max-new-tokens", "12",
                           "--temperature", "0")
    assert not [w for w in caught if issubclass(w.category, UserWarning)]  # no fallback to PyTorch
    assert run.returncode == 0 and len(run.stderr.splitlines()) == 1, run.stderr  # the speed line
    assert run.stderr.startswith("[12 tokens")
    assert run.stdout == "Hi" + tokenizer.decode(expected) + "\n"
    assert load_engine(folder, None, "cpu", "int8").device == "cpu int8 (C decode step)"


def uncached(monkeypatch, tmp_path):
    """Nothing built yet: an empty cache folder and no library loaded in this process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_load", native._load.__wrapped__)


def test_without_a_compiler_int8_warns_once_and_decodes_with_pytorch(tiny_checkpoint, monkeypatch, tmp_path):
    folder, _ = tiny_checkpoint
    uncached(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(UserWarning, match=r"decoding stays on PyTorch: no C compiler .*'/nonexistent/cc'") as caught:
        base, _, tokenizer = load_for_inference(folder, device="cpu", precision="int8")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert base.step is None and base.kernel == "PyTorch"
    assert len(list(generate(base, tokenizer, [1, 2], 5, SamplingParams(temperature=0)))) == 5


def test_a_compiler_error_is_one_line_and_its_output_goes_to_a_log(monkeypatch, tmp_path):
    uncached(monkeypatch, tmp_path)
    script = tmp_path / "bad-cc"
    script.write_text("#!/bin/sh\necho 'decode_step.c:1: error: something' >&2\necho 'second line' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    with pytest.raises(NativeUnavailable, match=r"bad-cc could not build decode_step.c for generic \(exit status 1; "
                                                r"compiler output in .*\.log\)") as caught:
        native.library("generic")
    message = str(caught.value)
    assert "\n" not in message and "something" not in message
    log = Path(message.rsplit(" in ", 1)[1].rstrip(")"))
    assert "error: something\nsecond line" in log.read_text()
    assert not list(log.parent.glob("*.so*"))  # no library, not even a partial one


def test_the_cli_fallback_warning_is_one_plain_line(tiny_checkpoint, tmp_path):
    env = {**os.environ, "CC": "/nonexistent/cc", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "minigpt.generate", "--model", str(tiny_checkpoint[0]), "--dtype",
                          "int8", "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0
    assert run.stderr.splitlines()[:-1] == ["warning: decoding stays on PyTorch: no C compiler to "
                                            "build decode_step.c: '/nonexistent/cc': No such file or directory"]
    assert run.stderr.splitlines()[-1].startswith("[3 tokens")  # then the speed line


def test_it_is_built_once_into_the_cache_and_then_only_loaded(monkeypatch, tmp_path):
    uncached(monkeypatch, tmp_path)
    first = native.build("generic")
    assert first.parent == tmp_path / "cache" / "minigpt" / "native" and first.name.startswith("decode_step-generic-")
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial file or log left behind
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert native.build("generic") == first
    assert native.library("generic").minigpt_isa() == b"generic"


def test_a_changed_source_is_a_new_build(monkeypatch, tmp_path):
    uncached(monkeypatch, tmp_path)
    first = native.build("generic")
    source = tmp_path / "decode_step.c"
    source.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", source)
    second = native.build("generic")
    assert second != first and second.exists() and first.exists()


def test_the_variant_is_the_cpus_best_unless_asked(monkeypatch):
    monkeypatch.delenv("MINIGPT_ISA", raising=False)
    assert native.choose_isa() == native.cpu_isas()[0]
    monkeypatch.setenv("MINIGPT_ISA", "generic")
    assert native.choose_isa() == "generic"
    assert native.choose_isa(native.cpu_isas()[-2]) == native.cpu_isas()[-2]  # an argument beats the variable
    with pytest.raises(NativeUnavailable, match="unknown instruction set 'sse9'"):
        native.choose_isa("sse9")
    missing = next(isa for isa in ("neon", "avx512", "avx2") if isa not in native.cpu_isas())
    with pytest.raises(NativeUnavailable, match=f"this CPU does not support the {missing} decode step"):
        native.choose_isa(missing)


def test_cpus_get_the_variants_their_flags_allow(monkeypatch):
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    for flags, expected in [({"avx2", "fma", "f16c"}, ["avx2", "generic"]),  # e.g. AMD EPYC before Zen 4
                            (native.X86_NEEDS["avx512"] | {"avx512_vnni"}, ["avx512", "avx2", "generic"]),
                            ({"sse4_2"}, ["generic"])]:
        monkeypatch.setattr(native, "cpu_features", lambda flags=flags: flags)
        assert native.cpu_isas() == expected
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native.cpu_isas() == ["neon", "generic"]
    monkeypatch.setattr(native.platform, "machine", lambda: "riscv64")
    assert native.cpu_isas() == []
    monkeypatch.delenv("MINIGPT_ISA", raising=False)
    with pytest.raises(NativeUnavailable, match=r"no C decode step for this CPU architecture \(riscv64\)"):
        native.choose_isa()


def test_models_it_cannot_serve_are_refused_with_the_reason(tiny_model):
    model, _, _ = tiny_model
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.clone())
    with pytest.raises(NativeUnavailable, match="needs GPT-2's tied token embedding and lm_head"):
        native_step(untied)
    with_lora = copy.deepcopy(model)
    inject_lora(with_lora, ["c_attn"], r=4, alpha=8)
    with pytest.raises(NativeUnavailable, match="int8 .* or plain float32 Linears, got LoRALinear"):
        native_step(with_lora)  # its weight alone is not what it computes
    transposed = copy.deepcopy(model)
    use_input_major_weights(transposed)
    with pytest.raises(NativeUnavailable, match=r"float32 weights in \(out, in\) memory order"):
        native_step(transposed)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(NativeUnavailable, match="float32 CPU tensors, got torch.bfloat16"):
        native_step(bf16)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    quantize_int8(bf16)
    with pytest.raises(NativeUnavailable, match="float32 CPU tensors, got torch.bfloat16"):
        native_step(bf16)
    narrow = GPT(GPTConfig(vocab_size=100, n_positions=16, n_embd=48, n_layer=1, n_head=4))
    quantize_int8(narrow)
    with pytest.raises(NativeUnavailable, match="multiples of 64, got 48"):
        native_step(narrow)


def test_a_full_cache_is_refused(default_models):
    int8, _, _ = default_models
    cache = int8.new_cache(2)
    with torch.inference_mode():
        one_at_a_time(int8, [5, 6], cache)
        with pytest.raises(ValueError, match="KV cache holds 2 tokens; 3 requested"):
            int8(torch.tensor([[7]]), cache)
    assert cache.length == 2


def test_bad_tokens_and_foreign_caches_are_refused_before_c_runs(default_models):
    int8, _, _ = default_models
    with torch.inference_mode():
        for token in (-1, int8.config.vocab_size):
            with pytest.raises(IndexError, match=f"token id {token} is outside the vocabulary of 50257"):
                int8(torch.tensor([[token]]), int8.new_cache(4))
        wider = GPT(GPTConfig(vocab_size=100, n_positions=16, n_embd=64, n_layer=3, n_head=4)).new_cache(4)
        with pytest.raises(ValueError, match=r"this model's float32 cache for one sequence, got \(3, 1, 4, 4, 16\)"):
            int8(torch.tensor([[5]]), wider)
    assert wider.length == 0


# ---- several sequences in one step (step_rows) -------------------------------------------------------

ISA_PRECISIONS = [pytest.param((isa.values[0], precision), marks=isa.marks, id=f"{isa.values[0]}-{precision}")
                  for isa in ISAS for precision in ("float32", "int8", "int4")]


def make_twins(model, isa, precision):
    """(base, tuned) of model, decoding in C in one variant and precision: the tuned model is the base with a
    random update merged into every c_attn (adapters.merge_deltas), sharing every other tensor with it, as a LoRA
    adapter's."""
    base = model.copy_sharing_weights()
    torch.manual_seed(1)
    tuned = merge_deltas(base, {f"transformer.h.{i}.attn.c_attn": 0.02 * torch.randn_like(b.attn.c_attn.weight)
                                for i, b in enumerate(model.transformer.h)})
    if precision in QUANTIZE:
        QUANTIZE[precision](base, tuned)  # together: the weights they share are quantized once, and stay shared
    pair = [Decoder(m, native_step(m, isa), "C decode step") for m in (base, tuned)]
    c_fc, c_attn = (lambda d: d.step.blocks[0].c_fc), (lambda d: d.step.blocks[0].c_attn)
    # read together (the same weights and int8 scales), and apart
    assert (c_fc(pair[0]).weight, c_fc(pair[0]).scale) == (c_fc(pair[1]).weight, c_fc(pair[1]).scale)
    assert c_attn(pair[0]).weight != c_attn(pair[1]).weight
    return pair


@pytest.fixture(scope="module", params=ISA_PRECISIONS)
def twins(request, tiny_model):
    """make_twins of the tiny model."""
    return make_twins(tiny_model[0], *request.param)


@pytest.fixture(scope="module", params=ISA_PRECISIONS)
def wide_twins(request):
    """make_twins of a random model whose Linears span 1 to 5 of decode_step.c's CHUNKs of 256 columns, with a
    part chunk (n_embd 320, mlp 1280; the tiny model's are 64 and 256), and a last block of one weight row
    (vocab 321)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=321, n_positions=32, n_embd=320, n_layer=2, n_head=4))
    for p in model.parameters():  # GPT-2's initialisation (nn.Embedding's own is N(0, 1): logits of ~100)
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    return make_twins(model, *request.param)


def prefilled(decoder, prompt, max_len):
    """A cache of max_len holding prompt, written by the model's PyTorch forward (as a server's prefill)."""
    cache = decoder.new_cache(max_len)
    with torch.inference_mode():
        decoder.model(torch.tensor([prompt]), cache)
    return cache


def alone(decoder, token, cache):
    """Logits (vocab,) of token after cache through the one-sequence C entry point, gpt2_step (extends cache)."""
    step, logits = decoder.step, torch.empty(decoder.config.vocab_size)
    assert step.lib.gpt2_step(step.model, token, cache.length, cache.k.data_ptr(), cache.v.data_ptr(), cache.max_len,
                              logits.data_ptr(), torch.get_num_threads()) == 0
    cache.length += 1
    return logits


def read_and_one_at_a_time(decoder, prompt, max_len):
    """(the last logits and the cache of prompt read in one decoder pass, the same of its tokens decoded one at a
    time through gpt2_step)."""
    cache, copy_ = decoder.new_cache(max_len), decoder.new_cache(max_len)
    with torch.inference_mode():
        ours = decoder(torch.tensor([prompt]), cache, last_only=True)[0, -1]
    for token in prompt:
        expected = alone(decoder, token, copy_)
    return ours, cache, expected, copy_


def rows(decoders):
    return [d.step for d in decoders]


def test_a_batch_of_rows_decodes_each_row_as_it_would_alone(twins):
    base, tuned = twins
    torch.manual_seed(2)
    decoders = [base, tuned, base, base, tuned]  # the two models interleaved
    prompts = [torch.randint(0, 1000, (length,)).tolist() for length in (3, 7, 1, 12, 5)]
    caches = [prefilled(d, p, max_len) for d, p, max_len in zip(decoders, prompts, (16, 24, 8, 13, 16))]
    copies = copy.deepcopy(caches)
    tokens = [5, 50256, 17, 999, 5]
    ours = step_rows(rows(decoders), tokens, caches)
    assert ours.shape == (5, 50257) and ours.dtype == torch.float32
    for r, (decoder, token, cache, copy_) in enumerate(zip(decoders, tokens, caches, copies)):
        assert torch.equal(ours[r], alone(decoder, token, copy_)), f"row {r}"
        assert cache.length == copy_.length == len(prompts[r]) + 1
        assert torch.equal(cache.k, copy_.k) and torch.equal(cache.v, copy_.v)  # the new slot, and nothing else
    assert not torch.equal(ours[0], ours[4])  # the same token after other caches and weights: other logits


def test_tokens_read_in_one_call_are_those_tokens_decoded_one_at_a_time(twins):
    """read_tokens: several tokens of each sequence (a prompt into an empty cache, or a chunk after a cache), one row
    each, in one call with other sequences' (base and tuned mixed): the logits after each sequence's last token, and
    its cache, are bit for bit those of decoding its tokens one at a time."""
    base, tuned = twins
    torch.manual_seed(3)
    decoders = [base, tuned, base]
    caches = [base.new_cache(24), prefilled(tuned, [7, 8, 9, 10], 24), prefilled(base, [11, 12], 24)]
    reads = [torch.randint(0, 1000, (n,)).tolist() for n in (9, 1, 5)]
    copies = copy.deepcopy(caches)
    ours = read_tokens(rows(decoders), reads, caches)
    assert ours.shape == (3, 50257)
    for r, (decoder, tokens, cache, copy_) in enumerate(zip(decoders, reads, caches, copies)):
        for token in tokens:
            expected = alone(decoder, token, copy_)
        assert torch.equal(ours[r], expected), f"sequence {r}"
        assert cache.length == copy_.length and torch.equal(cache.k, copy_.k) and torch.equal(cache.v, copy_.v)


@pytest.mark.parametrize("models", ["btbbtbtb", "bbbbbbbbt", "tbb"])
def test_every_group_size_decodes_each_row_as_alone(wide_twins, models):
    """decode_step.c multiplies each block of weight rows with the input vectors of the rows sharing it several
    at a time (VECS, 4). Base (b) and tuned (t) rows make groups of 5 and 3, 8 and 1, 1 and 2 rows (their own
    c_attn), and of all 8, 9 and 3 rows for a Linear whose weights and scales the models share: whole passes
    and every remainder. Each row's logits are those of its step alone, bit for bit."""
    torch.manual_seed(4)
    decoders = [wide_twins[name == "t"] for name in models]
    caches = [prefilled(d, torch.randint(0, 321, (length,)).tolist(), 24)
              for d, length in zip(decoders, torch.randint(1, 20, (len(models),)).tolist())]
    copies = copy.deepcopy(caches)
    tokens = torch.randint(0, 321, (len(models),)).tolist()
    ours = step_rows(rows(decoders), tokens, caches)
    for r, (decoder, token, copy_) in enumerate(zip(decoders, tokens, copies)):
        assert torch.equal(ours[r], alone(decoder, token, copy_)), f"row {r}"
        assert torch.equal(caches[r].k, copy_.k) and torch.equal(caches[r].v, copy_.v)
    assert len({tuple(row.tolist()) for row in ours}) == len(models)  # each row its own logits


def test_rows_join_and_leave_between_steps(twins):
    base, tuned = twins
    torch.manual_seed(3)
    decoders = {"a": base, "b": tuned, "c": base, "d": tuned}
    prompts = {name: torch.randint(0, 1000, (length,)).tolist() for name, length in zip("abcd", (4, 2, 9, 6))}
    caches = {name: prefilled(decoders[name], prompts[name], 16) for name in "abcd"}
    copies = copy.deepcopy(caches)
    schedule = ["abc", "ca", "dbac"]  # b leaves and comes back, d joins late, the order changes
    for names in schedule:
        tokens = [int(torch.randint(0, 50257, ())) for _ in names]
        ours = step_rows([decoders[name].step for name in names], tokens, [caches[name] for name in names])
        for r, (name, token) in enumerate(zip(names, tokens)):
            assert torch.equal(ours[r], alone(decoders[name], token, copies[name])), (names, name)
    for name in "abcd":
        steps = sum(name in names for names in schedule)
        assert caches[name].length == copies[name].length == len(prompts[name]) + steps
        assert torch.equal(caches[name].k, copies[name].k) and torch.equal(caches[name].v, copies[name].v)


def test_a_bad_row_is_refused_before_any_cache_changes(twins):
    base, tuned = twins
    decoders = [base, tuned, base]
    caches = [prefilled(d, [1, 2, 3], 8) for d in decoders]
    full = prefilled(base, list(range(4)), 4)
    before = copy.deepcopy(caches)

    def unchanged():
        return all(c.length == b.length and torch.equal(c.k, b.k) and torch.equal(c.v, b.v)
                   for c, b in zip(caches, before))

    with pytest.raises(IndexError, match=r"token id 50257 is outside the vocabulary of 50257 \(row 2\)"):
        step_rows(rows(decoders), [1, 2, 50257], caches)
    assert unchanged()
    with pytest.raises(ValueError, match=r"KV cache holds 4 tokens; 5 requested \(row 3\)"):
        step_rows(rows([*decoders, base]), [1, 2, 3, 4], [*caches, full])
    assert unchanged() and full.length == 4
    with pytest.raises(ValueError, match="a cache appears in more than one row"):
        step_rows(rows(decoders), [1, 2, 3], [caches[0], caches[1], caches[0]])
    assert unchanged()
    wider = GPT(GPTConfig(vocab_size=100, n_positions=16, n_embd=64, n_layer=3, n_head=4)).new_cache(4)
    with pytest.raises(ValueError, match=r"float32 cache for one sequence, got \(3, 1, 4, 4, 16\) torch.float32 "
                                         r"\(row 1\)"):
        step_rows(rows(decoders[:2]), [1, 2], [caches[0], wider])
    context = base.config.n_positions
    longer = KVCache(dataclasses.replace(base.config, n_positions=context + 1), context + 1)
    with pytest.raises(ValueError, match=r"float32 cache for one sequence, got .* \(row 1\)"):
        step_rows(rows(decoders[:2]), [1, 2], [caches[0], longer])  # C would read past the position embeddings
    assert unchanged()
    with pytest.raises(ValueError, match="tokens and one cache per step"):
        step_rows(rows(decoders), [1, 2], caches)
    with pytest.raises(ValueError, match="at least one row"):
        step_rows([], [], [])
    assert unchanged()


def test_rows_of_different_libraries_or_shapes_are_refused(tiny_model):
    model = tiny_model[0]
    best, portable = Decoder(model, native_step(model)), Decoder(model, native_step(model, "generic"))
    caches = [prefilled(d, [1, 2], 8) for d in (best, portable)]
    with pytest.raises(ValueError, match=f"one C call decodes with one library: the rows' steps are "
                                         f"{', '.join(sorted({best.step.isa, 'generic'}))} builds"):
        step_rows(rows([best, portable]), [1, 2], caches)
    small = GPT(GPTConfig(vocab_size=50257, n_positions=16, n_embd=64, n_layer=1, n_head=4))
    smaller = Decoder(small, native_step(small))
    with pytest.raises(ValueError, match=r"the rows' models differ in shape"):
        step_rows(rows([best, smaller]), [1, 2], [caches[0], prefilled(smaller, [1], 8)])
    assert [c.length for c in caches] == [2, 2]


# ---- exact int8 dot products, and AMX -----------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
def test_int8_dot_products_are_exact_integers_rounded_once(isa):
    """Every variant computes an int8 Linear's row sums q . xq exactly and rounds each to float32 once, so a
    sum does not depend on how it is split over SIMD lanes, vectors or AMX tiles. Rows of 8256 columns pass
    the columns a SIMD lane sums in int32 (4096 AVX2, 8192 AVX-512); extreme weights and inputs."""
    torch.manual_seed(5)
    rows, cols = 37, 8256
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
    q[0], q[1] = 127, -127  # the largest sums: every product at its bound
    scale = torch.rand(rows) + 0.5
    x = torch.randn(cols) * torch.rand(cols) ** 4
    x[::7] = x.abs().max()  # many inputs at the rounding's bound, 32767
    lib = native.library(isa)
    y = torch.empty(rows)
    lib.linear(native.LinearStruct(q.data_ptr(), scale.data_ptr(), 0, rows, cols, native.KIND_INT8), x.data_ptr(),
               y.data_ptr(), torch.get_num_threads())
    amax = x.abs().max()
    xq = torch.round(x * (32767 / amax)).long()  # float32 arithmetic, as decode_step.c rounds
    assert xq.abs().max() == 32767
    exact = (q.long() * xq).sum(1)
    assert exact.abs().max() > 2 ** 31  # past int32: the sums need the int64 they are added in
    assert torch.equal(y, exact.float() * ((amax / 32767) * scale))


def amx_library():
    """The avx512 library with AMX switched on, or a skip saying why there is none here."""
    if "avx512" not in native.cpu_isas():
        pytest.skip("AMX: this CPU has no avx512 variant")
    lib = native.library("avx512")
    if not native.use_amx(lib):
        pytest.skip("AMX: this CPU has no amx_int8, or Linux refused the tile permission (arch_prctl)")
    return lib


@pytest.fixture(scope="module")
def amx_twins():
    """(int8 base, int8 merged copy) of a wide random model (as wide_twins), decoding in avx512, and their
    dequantized float32 references."""
    amx_library()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=321, n_positions=32, n_embd=320, n_layer=2, n_head=4))
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    twins = make_twins(model, "avx512", "int8")
    return twins, [dequantized_reference(model, twin) for twin in twins]


@pytest.mark.parametrize("n", [*range(1, 17), 20])
def test_amx_rows_are_the_rows_without_amx_and_alone(amx_twins, n):
    """Batches of 1 to 16 and 20 rows (base and merged copy mixed, each at its own position; 20 rows make two
    slices of AMX_VECS vectors) through AMX tiles give each row the bits of the same batch without AMX and of
    its step alone (which never uses AMX), and the dequantized float32 model's logits to the tolerance of
    every step. A group of fewer than AMX_MIN_VECS rows takes dot_rows: the small batches check that too."""
    twins, references = amx_twins
    lib = amx_library()
    torch.manual_seed(10 + n)
    which = torch.randint(0, 2, (n,)).tolist()
    decoders = [twins[t] for t in which]
    prompts = [torch.randint(0, 321, (length,)).tolist() for length in torch.randint(1, 20, (n,)).tolist()]
    caches = [twins[t].new_cache(24) for t in which]
    with torch.inference_mode():  # the prompts read by the references: their logits continue from these caches
        for t, prompt, cache in zip(which, prompts, caches):
            references[t](torch.tensor([prompt]), cache)
    without, apart = copy.deepcopy(caches), copy.deepcopy(caches)
    tokens = torch.randint(0, 321, (n,)).tolist()
    try:
        ours = step_rows(rows(decoders), tokens, caches)
        assert not native.use_amx(lib, False)
        expected = step_rows(rows(decoders), tokens, without)
    finally:
        native.use_amx(lib)
    assert torch.equal(ours, expected)
    for r, (t, prompt, token) in enumerate(zip(which, prompts, tokens)):
        assert torch.equal(ours[r], alone(twins[t], token, apart[r])), f"row {r}"
        assert torch.equal(caches[r].k, apart[r].k) and torch.equal(caches[r].v, without[r].v)
        with torch.inference_mode():
            reference = references[t](torch.tensor([prompt + [token]]))[0, -1]
        torch.testing.assert_close(ours[r], reference, atol=ATOL, rtol=0)


def test_with_amx_an_int8_prompt_is_read_in_c_token_by_token_exactly(amx_twins):
    """Where AMX multiplies the rows, a prompt read into a cache goes through the C step (the decoder's prompt path,
    as the server's prefill): the same bits as decoding it one token at a time. With the step's AMX off, PyTorch
    reads it (its bfloat16 products in AMX tiles)."""
    (base, _), _ = amx_twins
    lib = amx_library()
    prompt = torch.randint(0, 321, (17,), generator=torch.Generator().manual_seed(5)).tolist()
    ours, cache, expected, copy_ = read_and_one_at_a_time(base, prompt, 24)
    assert base.reads_prompts and torch.equal(ours, expected) and torch.equal(cache.k, copy_.k)
    try:
        native.use_amx(lib, False)
        plain = base.new_cache(24)
        with torch.inference_mode():
            assert not base.reads_prompts
            assert torch.equal(base(torch.tensor([prompt]), plain, last_only=True),
                               base.model(torch.tensor([prompt]), base.new_cache(24), last_only=True))
    finally:
        native.use_amx(lib)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("isa", ISAS)
def test_a_prompt_is_read_in_c_token_by_token_exactly(tiny_model, isa, precision):
    """int4 prompts go through the C step in every variant (PyTorch would dequantize every Linear for each
    pass); int8 ones too, unless PyTorch has AMX tiles for its bfloat16 products and the step does not use
    AMX (the test above). Read in C: the same bits as decoding the prompt one token at a time."""
    decoder = c_decoder(tiny_model[0], isa, precision)
    in_c = precision == "int4" or decoder.step.lib.amx or "amx_bf16" not in native.cpu_features()
    assert decoder.reads_prompts == in_c
    if in_c:
        prompt = torch.randint(0, 1000, (13,), generator=torch.Generator().manual_seed(6)).tolist()
        ours, cache, expected, copy_ = read_and_one_at_a_time(decoder, prompt, 16)
        assert torch.equal(ours, expected)
        assert torch.equal(cache.k, copy_.k) and torch.equal(cache.v, copy_.v)


def test_a_compiler_without_amx_builds_the_vector_loop(monkeypatch, tmp_path):
    assert not native.compiler_accepts("no-such-compiler", *native.AMX_FLAGS)
    assert not native.compiler_accepts(os.environ.get("CC", "cc"), "-mno-such-flag")
    if "avx512" not in native.cpu_isas():
        pytest.skip("needs the avx512 variant")
    monkeypatch.setattr(native, "compiler_accepts", lambda compiler, *flags: False)
    lib = ctypes.CDLL(str(native.build("avx512", tmp_path)))
    assert lib.minigpt_amx(1) == 0


def test_minigpt_no_amx_turns_amx_off_at_load():
    run = subprocess.run([sys.executable, "-c", "from minigpt.speed import native; print(native.library().amx)"],
                         env={**os.environ, "MINIGPT_NO_AMX": "1"}, capture_output=True, text=True, cwd=REPO)
    assert run.stdout.split() == ["False"], run.stderr


# ---- aarch64, under emulation -----------------------------------------------------------------------

# A main() around decode_step.c: reads a model and tokens (layout below, native-endian), decodes the
# tokens one step each from an empty cache, writes each step's logits; then the logits of one batched
# step (gpt2_step_rows) of three rows that redo the last three steps.
ARM64_DRIVER = r"""
#include <stdio.h>
#include "decode_step.c"

static FILE *in;
static void *take(size_t bytes) {
    void *p = malloc(bytes);
    if (!p || fread(p, 1, bytes, in) != bytes) { fprintf(stderr, "short input\n"); exit(2); }
    return p;
}
static const float *floats(int64_t n) { return take(n * sizeof(float)); }
static int64_t kind; /* the blocks' Linears: KIND_FLOAT32, KIND_INT8 or KIND_INT4 (whose lm_head is int8) */
static int64_t weight_bytes(int64_t rows, int64_t cols, int64_t k) {
    return k == KIND_INT4 ? rows * cols / 2 : rows * cols * (k == KIND_INT8 ? 1 : sizeof(float));
}
static Linear read_linear(int64_t rows, int64_t cols, int has_bias, int64_t k) {
    Linear l = {take(weight_bytes(rows, cols, k)), NULL, NULL, rows, cols, k};
    if (k == KIND_INT8) l.scale = floats(rows);
    if (k == KIND_INT4) l.scale = take(rows * cols / GROUP * sizeof(uint16_t));
    l.bias = has_bias ? floats(rows) : NULL;
    return l;
}
int main(int argc, char **argv) {
    if (argc != 3 || !(in = fopen(argv[1], "rb"))) return 2;
    const int64_t *h = take(8 * sizeof(int64_t)); /* n_layer n_head n_embd mlp_dim vocab n_positions n_tokens kind */
    const int64_t L = h[0], C = h[2], F = h[3], V = h[4], T = h[6];
    kind = h[7];
    Model m = {L, h[1], C, F, *floats(1), floats(h[5] * C), NULL, NULL};
    m.ln_f_weight = floats(C), m.ln_f_bias = floats(C);
    m.lm_head = read_linear(V, C, 0, kind == KIND_INT4 ? KIND_INT8 : kind);
    Block *blocks = malloc(L * sizeof(Block));
    for (int64_t l = 0; l < L; ++l) {
        blocks[l].ln_1_weight = floats(C), blocks[l].ln_1_bias = floats(C);
        blocks[l].c_attn = read_linear(3 * C, C, 1, kind), blocks[l].attn_proj = read_linear(C, C, 1, kind);
        blocks[l].ln_2_weight = floats(C), blocks[l].ln_2_bias = floats(C);
        blocks[l].c_fc = read_linear(F, C, 1, kind), blocks[l].mlp_proj = read_linear(C, F, 1, kind);
    }
    m.blocks = blocks;
    const int64_t *tokens = take(T * sizeof(int64_t));
    float *k = calloc(L * C * T, sizeof(float)), *v = calloc(L * C * T, sizeof(float)), *logits = malloc(V * 4);
    FILE *out = fopen(argv[2], "wb");
    for (int64_t t = 0; t < T; ++t) {
        if (gpt2_step(&m, tokens[t], t, k, v, T, logits, 2)) return 3;
        fwrite(logits, sizeof(float), V, out);
    }
    /* Then one batched step of three rows, each with its own copy of the cache, redoing the steps of the
       last three tokens; the middle row's model has its own copy of every c_attn weight (a group of its
       own, as a LoRA-merged model's). Each row's logits are its step's above, bit for bit. */
    Model m2 = m;
    Block *blocks2 = malloc(L * sizeof(Block));
    for (int64_t l = 0; l < L; ++l) {
        const size_t bytes = weight_bytes(3 * C, C, kind);
        blocks2[l] = blocks[l];
        blocks2[l].c_attn.weight = memcpy(malloc(bytes), blocks[l].c_attn.weight, bytes);
    }
    m2.blocks = blocks2;
    const Model *models[3] = {&m, &m2, &m};
    int64_t row_tokens[3], positions[3], max_lens[3] = {T, T, T};
    float *ks[3], *vs[3], *batch = malloc(3 * V * sizeof(float));
    for (int r = 0; r < 3; ++r) {
        positions[r] = T - 1 - r, row_tokens[r] = tokens[positions[r]];
        ks[r] = memcpy(malloc(L * C * T * sizeof(float)), k, L * C * T * sizeof(float));
        vs[r] = memcpy(malloc(L * C * T * sizeof(float)), v, L * C * T * sizeof(float));
    }
    if (gpt2_step_rows(models, 3, row_tokens, positions, ks, vs, max_lens, 0, batch, 2)) return 3;
    fwrite(batch, sizeof(float), 3 * V, out);
    fclose(out);
    fprintf(stderr, "%s\n", minigpt_isa());
    return 0;
}
"""
ARM64_TOOLS = ("aarch64-linux-gnu-gcc", "qemu-aarch64")


def write_driver_input(model, tokens, path):
    """The driver's input file for an int8, int4 or float32 model and a token sequence."""
    model = unwrapped(model)
    c, kind = model.config, {nn.Linear: native.KIND_FLOAT32, Int8Linear: native.KIND_INT8,
                             Int4Linear: native.KIND_INT4}[type(model.transformer.h[0].mlp.c_fc)]

    def linear(layer):
        if isinstance(layer, Int8Linear):
            return [layer.weight, layer.scales.float()]
        return [layer.weight, layer.scales] if isinstance(layer, Int4Linear) else [layer.weight]

    parts = [torch.tensor([c.n_layer, c.n_head, c.n_embd, c.mlp_dim, c.vocab_size, c.n_positions, len(tokens), kind]),
             torch.tensor([c.layer_norm_epsilon], dtype=torch.float32), model.transformer.wpe.weight,
             model.transformer.ln_f.weight, model.transformer.ln_f.bias, *linear(model.lm_head)]
    for b in model.transformer.h:
        parts += [b.ln_1.weight, b.ln_1.bias]
        for layer in (b.attn.c_attn, b.attn.c_proj):
            parts += [*linear(layer), layer.bias]
        parts += [b.ln_2.weight, b.ln_2.bias]
        for layer in (b.mlp.c_fc, b.mlp.c_proj):
            parts += [*linear(layer), layer.bias]
    parts.append(torch.tensor(tokens))
    path.write_bytes(b"".join(t.detach().contiguous().numpy().tobytes() for t in parts))


@pytest.fixture(scope="module")
def arm64_driver(tmp_path_factory):
    """The driver for an aarch64 variant, compiled once per variant (the precision is in its input)."""
    built = {}

    def driver(isa: str) -> Path:
        if isa not in built:
            folder = tmp_path_factory.mktemp(f"arm64-{isa}")
            (folder / "driver.c").write_text(ARM64_DRIVER)
            subprocess.run(["aarch64-linux-gnu-gcc", "-O3", "-fopenmp", "-static", *native.ISA_FLAGS[isa],
                            f"-I{native.SOURCE.parent}", str(folder / "driver.c"), "-o", str(folder / "driver"),
                            "-lm"], check=True, capture_output=True, text=True)
            built[isa] = folder / "driver"
        return built[isa]
    return driver


@pytest.mark.skipif(not all(map(shutil.which, ARM64_TOOLS)),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu "
                           "qemu-user libc6-dev-arm64-cross)")
@pytest.mark.parametrize("precision", ["int8", "int4", "float32"])
@pytest.mark.parametrize("isa", ["neon", "generic"])
def test_the_aarch64_variants_match_their_oracle_under_emulation(isa, precision, arm64_driver, tmp_path):
    """int8 and int4: the dequantized float32 model; float32: the model's PyTorch forward. A batched step's rows: their
    single steps' logits exactly."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, n_positions=32, n_embd=128, n_layer=2, n_head=4))
    for p in model.parameters():  # GPT-2's initialisation (nn.Embedding's own is N(0, 1): logits of ~100)
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    served, reference, atol = model, model, FLOAT32_ATOL
    if precision in QUANTIZE:
        served = copy.deepcopy(model)
        QUANTIZE[precision](served)
        reference, atol = dequantized_reference(model, served), ATOL
    tokens = torch.randint(0, 320, (12,)).tolist()
    write_driver_input(served, tokens, tmp_path / "input.bin")
    run = subprocess.run(["qemu-aarch64", str(arm64_driver(isa)), str(tmp_path / "input.bin"),
                          str(tmp_path / "logits.bin")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == f"{isa}\n", run.stderr
    logits = bytearray((tmp_path / "logits.bin").read_bytes())
    ours = torch.frombuffer(logits, dtype=torch.float32).view(len(tokens) + 3, -1)
    ours, batch = ours[:len(tokens)], ours[len(tokens):]
    assert torch.equal(batch, ours.flip(0)[:3])  # rows at positions T-1, T-2, T-3: those steps' logits exactly
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens]))[0]
    assert expected.std() > 0.1  # logits that say something, not all near zero
    torch.testing.assert_close(ours, expected, atol=atol, rtol=0)
    if precision in QUANTIZE:
        assert_close_to_dequantized(ours, model, served, tokens)
