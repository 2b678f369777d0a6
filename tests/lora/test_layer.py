"""The LoRA layer against Hugging Face peft on transformers' GPT-2 (the oracle), plus merge and counts."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from lora import LoRALinear, inject_lora, lora_parameters
from minigpt import GPT, GPTConfig
from minigpt.adapters import PEFT_PREFIX

TARGET_SETS = [["c_attn"], ["c_attn", "c_proj", "c_fc"]]


def peft_twin(tiny_model, targets, r=4, alpha=8, seed=1):
    """(our injected model, peft model) with the same non-zero random A and B."""
    model, _, hf_model = tiny_model
    ours = copy.deepcopy(model)
    inject_lora(ours, targets, r, alpha)
    theirs = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        theirs_state = get_peft_model_state_dict(theirs)
        ours_params = lora_parameters(ours)
        assert {PEFT_PREFIX + k for k in ours_params} == set(theirs_state)
        for name, p in ours_params.items():
            p.copy_(theirs_state[PEFT_PREFIX + name])
    return ours, theirs


def tokens(batch=2, length=12, seed=0):
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_logits_equal_peft(tiny_model, targets):
    ours, theirs = peft_twin(tiny_model, targets)
    idx = tokens()
    with torch.no_grad():
        expected = theirs(input_ids=idx).logits
        base = tiny_model[0](idx)
        got = ours(idx)
    assert (expected - base).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_gradients_equal_peft(tiny_model, targets):
    ours, theirs = peft_twin(tiny_model, targets)
    idx, labels = tokens(seed=2), tokens(seed=3)
    theirs_loss = torch.nn.functional.cross_entropy(theirs(input_ids=idx).logits.flatten(0, 1), labels.flatten())
    ours_loss = torch.nn.functional.cross_entropy(ours(idx).flatten(0, 1), labels.flatten())
    theirs_loss.backward()
    ours_loss.backward()
    theirs_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {PEFT_PREFIX + n: p.grad for n, p in lora_parameters(ours).items()}
    assert theirs_grads.keys() == ours_grads.keys()
    for name, grad in ours_grads.items():
        assert theirs_grads[name].abs().max() > 0
        torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # only the adapter trains
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora_" not in n)


def test_fresh_adapter_is_the_identity(tiny_model):
    model = tiny_model[0]
    ours = copy.deepcopy(model)
    inject_lora(ours, ["c_attn", "c_proj", "c_fc"], r=8, alpha=16)
    assert all(p.abs().sum() > 0 for n, p in lora_parameters(ours).items() if "lora_A" in n)
    with torch.no_grad():
        assert torch.equal(ours(tokens()), model(tokens()))


def test_merge_unmerge_restores_weights_and_outputs_agree(tiny_model):
    ours, _ = peft_twin(tiny_model, ["c_attn", "c_fc"])
    layers = [m for m in ours.modules() if isinstance(m, LoRALinear)]
    before = [m.weight.detach().clone() for m in layers]
    idx = tokens()
    with torch.no_grad():
        unmerged = ours(idx)
        for m in layers:
            m.merge()
            m.merge()  # idempotent
        merged = ours(idx)
        for m, w in zip(layers, before):
            torch.testing.assert_close(m.weight, w + m.delta_weight(), rtol=0, atol=1e-6)
        for m in layers:
            m.unmerge()
        restored = ours(idx)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    # fp32 round trip (w + d) - d: off by at most a few ulps of |w| + |d|
    for m, w in zip(layers, before):
        torch.testing.assert_close(m.weight, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(restored, unmerged, rtol=0, atol=1e-5)


def test_injection_shares_and_freezes_base_weights(tiny_model):
    model = copy.deepcopy(tiny_model[0])
    c_attn = model.transformer.h[0].attn.c_attn
    names = inject_lora(model, ["c_attn"], r=2, alpha=4)
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.weight is c_attn.weight and layer.bias is c_attn.bias
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}.weight" for name in names for ab in "AB"}


def test_trainable_count_on_124m_shape_is_294912():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    inject_lora(model, ["c_attn"], r=8, alpha=16)
    # per layer: A 8 x 768 + B 2304 x 8; 12 layers
    assert sum(p.numel() for p in lora_parameters(model).values()) == 12 * (8 * 768 + 2304 * 8) == 294_912


def test_unknown_target_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="no Linear module matches.*'q_proj'"):
        inject_lora(copy.deepcopy(tiny_model[0]), ["q_proj"], r=2, alpha=4)


def test_dropout_applies_only_to_the_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, r=4, alpha=4, dropout=0.5)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), layer(x))  # zero B: the branch adds nothing, dropout or not
    torch.nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # training mode: dropout is live
    layer.eval()
    expected = x @ layer.weight.T + layer.bias + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected)
