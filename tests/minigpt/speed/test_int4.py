"""Int4 weight-only quantization (minigpt/speed/int4.py), checked against hand-computed groups and plain float32
PyTorch on the dequantized weights. The C step's int4 arithmetic is checked in test_native.py (every variant,
single and batched rows, aarch64 under emulation), against the same dequantized reference."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from minigpt.adapters import merge_deltas
from minigpt.generation import generate
from minigpt.inference import load_for_inference
from minigpt.sampling import SamplingParams
from minigpt.serve.engine import load_engine
from minigpt.speed.int4 import GROUP, Int4Linear, pack, quantize_groups, quantize_int4, unpack
from minigpt.speed.quantize import Int8Embedding, Int8Linear
from tests.helpers import REPO


def test_a_group_is_rounded_as_computed_by_hand():
    """Two groups of 32: the weight largest in magnitude sets the scale (it / -8), the rest round to the nearest
    step (halves to even) and clamp to -8..7. Scales here are exact in float16."""
    w = torch.zeros(1, 64)
    # group 0: extreme -2.0 -> scale 0.25
    w[0, :9] = torch.tensor([-2.0, 0.25, 0.3, 0.375, 0.625, 1.75, 1.9, 2.0, -0.1])
    # group 1: extreme +4.0 -> scale -0.5 (codes flip sign)
    w[0, 32:36] = torch.tensor([4.0, 1.0, -3.0, -4.0])
    q, scales = quantize_groups(w)
    assert scales.dtype == torch.float16 and scales.tolist() == [[0.25, -0.5]]
    assert q[0, :9].tolist() == [-8, 1, 1, 2, 2, 7, 7, 7, 0]  # 0.3/0.25 = 1.2; 1.5 -> 2, 2.5 -> 2; 7.6, 8 -> 7
    assert q[0, 32:36].tolist() == [-8, -2, 6, 7]  # -4.0 / -0.5 = 8: clamped to 7, so -3.5
    assert q[0, 9:32].eq(0).all() and q[0, 36:].eq(0).all()
    layer = Int4Linear.from_linear(linear_with(w))
    expected = torch.zeros(1, 64)
    expected[0, :9] = torch.tensor([-2.0, 0.25, 0.25, 0.5, 0.5, 1.75, 1.75, 1.75, 0.0])
    expected[0, 32:36] = torch.tensor([4.0, 1.0, -3.0, -3.5])
    assert torch.equal(layer.dequantize(), expected)


def linear_with(weight: torch.Tensor, bias: bool = False) -> nn.Linear:
    layer = nn.Linear(weight.size(1), weight.size(0), bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_codes_are_packed_two_per_byte_in_the_c_steps_lane_order():
    """A row of 320 columns: a chunk of 256, where position 32i + e holds column 32 (e / 4) + 4i + e % 4, then a
    chunk of 64, where it holds column 32 (e / 16) + 16i + e % 16; byte b of each 64 positions holds position b in
    its low half and b + 32 in its high half."""
    q = torch.full((2, 320), -8, dtype=torch.int8)  # code u = q + 8 = 0
    q[0, 0], q[0, 4], q[0, 32] = 7, -7, -1  # u 15, 1, 7: byte 0 (positions 0, 32: columns 0, 4), byte 4 (column 32)
    q[0, 9], q[0, 13] = 3, 4  # block 1, byte 1: positions 65 (i = 2, e = 1) and 97 (i = 3, e = 1)
    q[1, 256], q[1, 272], q[1, 288], q[1, 319] = 0, 1, 2, 6  # the chunk of 64 (bytes 128 ...)
    packed = pack(q)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 160)
    assert packed[0, 0] == 15 | (1 << 4) and packed[0, 4] == 7 and packed[0, 32 + 1] == 11 | (12 << 4)
    assert packed[1, 128] == 8 | (9 << 4) and packed[1, 128 + 16] == 10 and packed[1, 128 + 31] == 14 << 4
    assert packed[0].count_nonzero() == 3 and packed[1].count_nonzero() == 3
    assert torch.equal(unpack(packed), q)
    for cols in (64, 192, 256, 768):
        codes = torch.randint(-8, 8, (5, cols), dtype=torch.int8)
        assert torch.equal(unpack(pack(codes)), codes)


def test_the_error_is_at_most_half_a_step_but_the_clamped_side():
    torch.manual_seed(0)
    w = torch.randn(16, 256) * 0.02
    layer = Int4Linear.from_linear(linear_with(w))
    step = layer.scales.float().abs().repeat_interleave(GROUP, dim=1)
    error = (layer.dequantize() - w).abs()
    clamped = unpack(layer.weight) == 7  # a weight of the extreme's size and the other sign: up to a whole step
    assert torch.all(error[~clamped] <= step[~clamped] / 2 * (1 + 1e-3))
    assert torch.all(error[clamped] <= step[clamped] * (1 + 1e-3))
    assert layer.weight.numel() + 2 * layer.scales.numel() == w.numel() * 4.5 / 8  # bytes: 4.5 bits a weight


@pytest.mark.parametrize("rows", [1, 5])
def test_the_pytorch_path_is_the_float_matmul_of_the_dequantized_weight(rows):
    torch.manual_seed(1)
    linear = nn.Linear(128, 96)
    layer = Int4Linear.from_linear(linear)
    x = torch.randn(2, rows, 128)
    expected = x @ layer.dequantize().t() + linear.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    assert layer.bias.data_ptr() == linear.bias.data_ptr()  # shared with the float model, not copied


def test_blocks_become_int4_and_the_tied_lm_head_int8(tiny_model):
    model = copy.deepcopy(tiny_model[0])
    quantize_int4(model)
    blocks = [type(m) for m in model.transformer.h.modules() if isinstance(m, (nn.Linear, Int4Linear, Int8Linear))]
    assert blocks == [Int4Linear] * 4 * model.config.n_layer and type(model.lm_head) is Int8Linear
    assert isinstance(model.transformer.wte, Int8Embedding) and model.transformer.wte.lm_head is model.lm_head


def test_shared_weights_are_quantized_once(tiny_model):
    base = tiny_model[0].copy_sharing_weights()
    tuned = merge_deltas(base, {"transformer.h.0.attn.c_attn": 0.02 * torch.randn_like(
        base.transformer.h[0].attn.c_attn.weight)})
    quantize_int4(base, tuned)
    assert tuned.transformer.h[0].mlp.c_fc is base.transformer.h[0].mlp.c_fc
    assert tuned.lm_head is base.lm_head
    assert tuned.transformer.h[0].attn.c_attn is not base.transformer.h[0].attn.c_attn


def test_a_width_that_is_not_a_multiple_of_64_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="int4 needs input widths that are multiples of 64, got 96"):
        Int4Linear.from_linear(nn.Linear(96, 8))


def test_the_cli_generates_in_int4_as_the_loaded_model_does(tiny_checkpoint):
    folder = tiny_checkpoint[0]
    model, _, tokenizer = load_for_inference(folder, device="cpu", precision="int4")
    assert model.kernel == "C decode step"
    expected = [e.token_id for e in generate(model, tokenizer, tokenizer.encode_ordinary("Hi"), 12,
                                             SamplingParams(temperature=0))]
    run = subprocess.run([sys.executable, "-m", "minigpt.generate", "--model", str(folder), "--precision", "int4",
                          "--prompt", "Hi", "--max-new-tokens", "12", "--temperature", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "Hi" + tokenizer.decode(expected) + "\n"
    assert load_engine(folder, None, "cpu", "int4").device == "cpu int4 (C decode step)"  # the app's status line
