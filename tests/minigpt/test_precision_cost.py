"""What a precision costs, as the Model card says it: the weights' bytes against the checkpoint's own tensors,
and the divergence from float32 against transformers' float32 model over the same built-in text."""
import pytest
import torch
from safetensors import safe_open

from minigpt.inference import load_with_scale
from minigpt.precision_cost import PROBE_TEXT, measure_cost, weight_bytes
from minigpt.tokenizer import load_tokenizer
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory):
    """A tiny checkpoint with large weights: confident next-token distributions, so that precisions differ
    by far more than float32's own rounding (the shared tiny model's are nearly uniform)."""
    return make_checkpoint(tmp_path_factory.mktemp("sharp"), initializer_range=0.3)


def checkpoint_bytes(folder) -> int:
    """The float32 bytes of the checkpoint's weights: its tensors without GPT-2's causal-mask buffers."""
    with safe_open(folder / "model.safetensors", "pt") as f:
        return sum(f.get_tensor(k).float().nbytes for k in f.keys() if not k.endswith(".attn.bias"))


@pytest.mark.parametrize("precision", ["bfloat16", "int8", "int4"])
def test_the_cost_is_measured_against_float32(sharp_checkpoint, precision):
    folder, hf = sharp_checkpoint
    served, _, tokenizer = load_with_scale(str(folder), None, "cpu", precision)
    cost = measure_cost(str(folder), served, tokenizer)

    ids = torch.tensor([load_tokenizer(folder).encode_ordinary(PROBE_TEXT)])
    with torch.no_grad():
        reference = hf(ids).logits[0].double().log_softmax(-1)
        ours = served(ids)[0].double().log_softmax(-1)
    kl = (reference.exp() * (reference - ours)).sum(-1)
    assert cost.precision == precision and cost.float32_bytes == checkpoint_bytes(folder)
    assert len(cost.divergence.kl) == ids.shape[1]
    assert cost.divergence.mean_kl == pytest.approx(kl.mean().item(), rel=0.02)
    assert cost.divergence.top1_agreement == pytest.approx(
        (reference.argmax(-1) == ours.argmax(-1)).double().mean().item(), abs=1.5 / ids.shape[1])
    assert f"{100 * cost.divergence.top1_agreement:.1f}%" in cost.describe() and precision in cost.describe()


def test_quantized_weights_are_counted_in_their_own_bytes(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    float32, _, _ = load_with_scale(str(folder), None, "cpu", "float32")
    int8, _, tokenizer = load_with_scale(str(folder), None, "cpu", "int8")
    assert weight_bytes(float32.model) == checkpoint_bytes(folder)  # the tied lm_head once
    # each int8 matrix once (the lm_head and the embedding share theirs), with its scales
    quantized = {m.weight.data_ptr(): m for m in int8.model.modules() if hasattr(m, "scales")}.values()
    assert quantized and all(m.weight.dtype == torch.int8 for m in quantized)
    saved = sum(3 * m.weight.numel() - m.scales.numel() * m.scales.element_size() for m in quantized)
    assert weight_bytes(float32.model) - weight_bytes(int8.model) == saved  # 1 byte a weight where float32 had 4
    cost = measure_cost(str(folder), float32, tokenizer)
    assert cost.divergence is None and "the reference precision" in cost.describe()
