"""LoRA scale: 0 is the base model, 1 the merged tuned one, 0.5 and 2 peft with the scaling scaled;
models for other scales share the base's weights, are cached per scale and built without reload."""
import threading

import pytest
import torch

from minigpt.adapters import load_tuned_model
from minigpt.inference import load_with_scale
from minigpt.speed.int4 import Int4Linear
from minigpt.speed.quantize import Int8Linear
from tests.helpers.app_server import make_adapter
from tests.lora.test_layer import tokens
from tests.minigpt.test_scoring import peft_model


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    return make_adapter(tiny_checkpoint[0], tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def lora(tiny_checkpoint, adapter):
    return load_with_scale(tiny_checkpoint[0], adapter, "cpu", "float32")[1]


def logits(model, idx):
    with torch.no_grad():
        return model(idx)


def test_lora_scale_0_is_base_and_1_is_the_merged_model_exactly(tiny_model, tiny_checkpoint, adapter, lora):
    idx = tokens(seed=3)
    base, _, hf_model = tiny_model
    merged = load_tuned_model(base, adapter)
    assert lora.decoder(0) is lora.base and lora.decoder(1.0) is lora.tuned
    # the path that builds other scales, run at 0 and 1, gives the same logits too
    at_zero, at_one = (lora.finish(lora.merged(s)) for s in (0.0, 1.0))
    expected_base = hf_model(idx).logits.detach()
    for model in (lora.decoder(0), at_zero):
        torch.testing.assert_close(logits(model, idx), expected_base, rtol=0, atol=1e-5)
    for model in (lora.decoder(1), at_one):
        torch.testing.assert_close(logits(model, idx), logits(merged, idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 2.0, 1.35])
def test_other_scales_equal_peft_with_its_scaling_scaled(tiny_checkpoint, adapter, lora, scale):
    idx = tokens(seed=4)
    expected = peft_model(tiny_checkpoint, adapter, scale)(input_ids=idx).logits.detach()
    torch.testing.assert_close(logits(lora.decoder(scale), idx), expected, rtol=0, atol=1e-5)


def test_a_scale_model_shares_all_but_the_targets_and_is_cached(lora):
    half = lora.decoder(0.5)
    assert lora.decoder(0.5) is half and lora.decoder(0.50001) is half  # rounded to 1e-4
    base = lora.base.model.state_dict()
    for key, tensor in half.model.state_dict().items():
        assert (tensor.data_ptr() == base[key].data_ptr()) != key.endswith("attn.c_attn.weight"), key
    assert half.model.lm_head.weight is half.model.transformer.wte.weight


def test_the_cache_is_bounded_and_sessions_at_once_get_their_own_scale(tiny_checkpoint, adapter):
    lora = load_with_scale(tiny_checkpoint[0], adapter, "cpu", "float32")[1]
    idx = tokens(batch=1, seed=5)
    results = {}

    def serve(s):
        results[s] = logits(lora.decoder(s), idx)

    threads = [threading.Thread(target=serve, args=(s,)) for s in (0.25, 0.75, 1.5, 1.75, 2.0, 0.25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lora.cache) == lora.capacity == 4
    for s, got in results.items():  # each got its own scale, whoever was building at the time
        torch.testing.assert_close(got, logits(lora.finish(lora.merged(s)), idx), rtol=0, atol=0)
    assert not torch.allclose(results[0.25], results[0.75])


@pytest.mark.parametrize("precision, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_scales_are_quantized_from_float_weights(tiny_checkpoint, adapter, precision, layer):
    _, float_scale, _ = load_with_scale(tiny_checkpoint[0], adapter, "cpu", "float32")
    _, int8_scale, _ = load_with_scale(tiny_checkpoint[0], adapter, "cpu", precision)
    half = int8_scale.decoder(0.5)
    assert half.kernel == int8_scale.tuned.kernel
    assert half.model.transformer.h[0].mlp.c_fc.weight is int8_scale.base.model.transformer.h[0].mlp.c_fc.weight
    c_attn = half.model.transformer.h[0].attn.c_attn
    float_half = float_scale.decoder(0.5).model.transformer.h[0].attn.c_attn
    expected = layer.from_linear(float_half)  # what quantizing the float32 scale-0.5 model gives
    assert isinstance(c_attn, layer)
    assert torch.equal(c_attn.weight, expected.weight) and torch.equal(c_attn.scales, expected.scales)


@pytest.mark.parametrize("bad", [-0.1, 2.01, float("nan"), "strong"])
def test_a_scale_outside_0_to_2_is_refused(lora, bad):
    with pytest.raises(ValueError, match="LoRA scale must be"):
        lora.decoder(bad)
