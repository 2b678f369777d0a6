"""Int8 weight-only quantization, checked against independent computations.

Oracle: plain float32 PyTorch on the dequantized weights (q * scale, built here from the stored int8
tensors), and the float32 model for end-to-end closeness. Tolerances are stated where they are used.
"""
import copy

import pytest
import torch
import torch.nn as nn

from minigpt.generation import generate
from minigpt.model import GPT
from minigpt.sampling import SamplingParams
from minigpt.speed.quantize import Int8Embedding, Int8Linear, quantize_int8


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["rest-float32", "rest-bfloat16"])
def float_and_int8(tiny_model, request):
    """(float32 model, its int8 copy with LayerNorms/embeddings/cache in the given dtype, tokenizer)."""
    model, tokenizer, _ = tiny_model
    qmodel = copy.deepcopy(model).to(request.param)
    quantize_int8(qmodel)
    return model, qmodel, tokenizer


def test_per_channel_rounding_is_exact_to_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(48, 20)
    with torch.no_grad():
        linear.weight[3] *= 100  # one loud row must not cost the other rows their precision
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (20, 48)
    assert q.weight.abs().max() <= 127
    step = q.scales.float()[:, None]
    assert torch.all((q.dequantize() - linear.weight).abs() <= step / 2 + 1e-6)
    # each row's largest weight uses the full int8 range (to within the bfloat16 rounding of its scale)
    assert torch.all(q.weight.abs().amax(dim=1) >= 126)


@pytest.mark.parametrize("rows", [1, 3, 40])  # the int8 kernel path and the dequantize path
def test_int8_linear_matches_float_matmul_on_dequantized_weights(rows):
    torch.manual_seed(1)
    linear = nn.Linear(64, 96)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(2, rows, 64)
    # Oracle: the same weights in float32; the module's only other rounding is its bfloat16 input and
    # bfloat16 output (relative 2^-8 each), so allow 1.5% of the output scale.
    expected = x.to(torch.bfloat16).float() @ q.dequantize().t() + linear.bias
    got = q(x)
    assert got.shape == (2, rows, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.015 * expected.abs().max().item(), rtol=0)


def test_every_linear_and_the_tied_embedding_become_int8(float_and_int8):
    model, qmodel, _ = float_and_int8
    linears = [m for m in qmodel.modules() if isinstance(m, nn.Linear)]
    assert linears == []
    n_int8 = sum(isinstance(m, Int8Linear) for m in qmodel.modules())
    assert n_int8 == 4 * model.config.n_layer + 1  # c_attn, attn c_proj, c_fc, mlp c_proj per block + lm_head
    assert isinstance(qmodel.transformer.wte, Int8Embedding)
    assert qmodel.transformer.wte.weight is qmodel.lm_head.weight  # still tied: one int8 copy
    weights = {k: v for k, v in qmodel.state_dict().items() if k.endswith(".weight") and "ln_" not in k
               and "wpe" not in k}
    assert weights and all(v.dtype == torch.int8 for v in weights.values())


def test_embedding_rows_are_the_dequantized_lm_head_rows(float_and_int8):
    model, qmodel, _ = float_and_int8
    idx = torch.tensor([[0, 5, 50256]])
    expected = qmodel.lm_head.dequantize()[idx]
    torch.testing.assert_close(qmodel.transformer.wte(idx).float(), expected, atol=0.01 * expected.abs().max().item(),
                               rtol=0)
    # and close to the float32 embedding: within half a quantization step per element, plus bf16 rounding
    step = qmodel.lm_head.scales.float()[idx, None]
    assert torch.all((qmodel.transformer.wte(idx).float() - model.transformer.wte(idx)).abs() <= step / 2 + 0.01 * step * 127)


@torch.inference_mode()
def test_int8_logits_close_to_float32_and_greedy_agrees_where_it_must(float_and_int8):
    model, qmodel, tokenizer = float_and_int8
    for text in ["The quick brown fox", "Hello, my name is", "1 2 3 4", "In the beginning"]:
        prompt = tokenizer.encode_ordinary(text)
        cont = [e.token_id for e in generate(model, tokenizer, prompt, 12, SamplingParams(temperature=0))]
        ids = torch.tensor([prompt + cont])
        ref, got = model(ids)[0], qmodel(ids)[0].float()
        # Stated tolerance: 10% of the float32 logits' standard deviation (measured: about 6.5%).
        tol = 0.1 * ref.std().item()
        assert (got - ref).abs().max() <= tol
        # Wherever float32's best token leads the runner-up by more than 2 tol, no error within tol can
        # change the greedy choice: int8 must agree there.
        top2 = ref.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
        assert clear.any()
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


@torch.inference_mode()
def test_cached_decode_equals_full_recompute_in_int8(float_and_int8):
    _, qmodel, _ = float_and_int8
    ids = torch.randint(0, 50257, (1, 10), generator=torch.Generator().manual_seed(0))
    full = qmodel(ids)[0, -1].float()
    cache = qmodel.new_cache(16)
    assert cache.k.dtype == qmodel.transformer.ln_f.weight.dtype  # the compute dtype, not int8
    qmodel(ids[:, :6], cache)
    for t in range(6, 10):
        step = qmodel(ids[:, t:t + 1], cache)[0, -1].float()
    torch.testing.assert_close(step, full, atol=0.05 * full.std().item(), rtol=0)


def test_shared_weights_are_quantized_once(tiny_model):
    """A LoRA-tuned model shares its base's weights except the merged c_attn: quantized together, their
    int8 tensors are shared too, whether the sharing is of modules or only of Parameters."""
    model, _, _ = tiny_model
    base = copy.deepcopy(model)
    tuned = GPT(base.config)
    tuned.transformer.wte, tuned.transformer.wpe, tuned.transformer.ln_f = (
        base.transformer.wte, base.transformer.wpe, base.transformer.ln_f)
    tuned.lm_head = base.lm_head
    for t, b in zip(tuned.transformer.h, base.transformer.h):
        t.ln_1, t.ln_2, t.attn.c_proj = b.ln_1, b.ln_2, b.attn.c_proj  # shared modules
        t.mlp.c_fc.weight, t.mlp.c_fc.bias = b.mlp.c_fc.weight, b.mlp.c_fc.bias  # shared Parameters only
        t.mlp.c_proj = b.mlp.c_proj
        t.attn.c_attn = copy.deepcopy(b.attn.c_attn)  # "merged": weights of its own
    quantize_int8(base, tuned)
    for t, b in zip(tuned.transformer.h, base.transformer.h):
        assert t.attn.c_proj is b.attn.c_proj and t.mlp.c_fc is b.mlp.c_fc and t.mlp.c_proj is b.mlp.c_proj
        assert t.attn.c_attn is not b.attn.c_attn
    assert tuned.lm_head is base.lm_head and tuned.transformer.wte.weight is base.transformer.wte.weight


@torch.inference_mode()
def test_quantized_lora_tuned_model_shares_base_int8_weights(tiny_model, tmp_path):
    from lora import AdapterConfig, load_tuned_model, save_adapter
    from lora.layer import inject_lora
    model, _, _ = tiny_model
    trained = copy.deepcopy(model)
    inject_lora(trained, ["c_attn"], r=4, alpha=8)
    torch.manual_seed(3)
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.5)  # a non-zero update, so tuned differs from base
    folder = save_adapter(trained, tmp_path / "adapter", AdapterConfig(4, 8, 0.0, ["c_attn"]))
    base = copy.deepcopy(model)
    tuned = load_tuned_model(base, folder)
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    float_base, float_tuned = base(ids), tuned(ids)
    quantize_int8(base, tuned)
    for b, t in zip(base.transformer.h, tuned.transformer.h):
        assert t.mlp.c_fc is b.mlp.c_fc and t.attn.c_proj is b.attn.c_proj  # one int8 copy, shared
        assert t.attn.c_attn is not b.attn.c_attn  # the merged target has its own
    assert tuned.lm_head is base.lm_head
    for got, ref in [(base(ids), float_base), (tuned(ids), float_tuned)]:
        assert (got - ref).abs().max() <= 0.1 * ref.std()  # the tolerance used above
    assert (float_tuned - float_base).abs().max() > 0.1 * float_base.std()  # and the adapter still shows


def test_an_unmerged_lora_layer_is_refused_not_silently_dropped(tiny_model):
    from lora.layer import inject_lora
    model = copy.deepcopy(tiny_model[0])
    inject_lora(model, ["c_attn"], r=2, alpha=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="LoRALinear 'c_attn'.*merge"):
        quantize_int8(model)
    after = model.state_dict()  # nothing was half-quantized
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_loading_int8_leaves_the_freed_float32_memory_to_the_system(tmp_path):
    """A second int8 load in a process (the first warms up torch, the tokenizer and the C step) grows resident
    memory by well under its float32 weights' size (194 MB here). Measured: +65 MB with
    inference.return_freed_memory, +171 to +249 MB without (glibc kept the freed float32 blocks)."""
    import subprocess
    import sys

    from tests.helpers import REPO
    from tests.helpers.checkpoints import make_checkpoint
    folder = make_checkpoint(tmp_path / "model", n_embd=512, n_layer=8, n_head=8, n_positions=128)[0]
    float32_mb = 4 * (50257 * 512 + 128 * 512 + 8 * 12 * 512 * 512) / 2**20
    load = f"load_for_inference({str(folder)!r}, device='cpu', precision='int8')"
    probe = (f"import ctypes, gc, psutil; from minigpt.inference import load_for_inference; "
             f"rss = lambda: psutil.Process().memory_info().rss / 2**20; warm = {load}; del warm; gc.collect(); "
             f"ctypes.CDLL(None).malloc_trim(0); before = rss(); model = {load}; print(rss() - before)")
    grew = float(subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split()[-1])
    assert grew < 0.5 * float32_mb, f"int8 loading kept {grew:.0f} MB of {float32_mb:.0f} MB float32 weights"
