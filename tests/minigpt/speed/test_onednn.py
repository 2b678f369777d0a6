"""The oneDNN float32 path: the Linear that multiplies through it, and its swap into a loaded model.

Oracle: F.linear and the unswapped model (itself checked against transformers in test_model.py).
"""
import pytest
import torch

from minigpt.speed.onednn import OneDNNLinear, use_onednn

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")


@needs_onednn
def test_float32_inference_multiplies_through_onednn_and_training_through_autograd():
    torch.manual_seed(0)
    layer, x = OneDNNLinear(96, 200), torch.randn(3, 5, 96)
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias)

    with torch.no_grad(), torch.profiler.profile() as prof:
        fast = layer(x)
    assert "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}
    torch.testing.assert_close(fast, reference.detach(), rtol=1e-5, atol=1e-5)

    trained = layer(x)  # with gradients: F.linear, so autograd works
    trained.square().sum().backward()
    expected = torch.autograd.grad(reference.square().sum(), layer.weight)[0]
    torch.testing.assert_close(layer.weight.grad, expected)


@needs_onednn
@torch.inference_mode()
def test_use_onednn_swaps_every_linear_keeps_tied_weights_and_the_logits(tiny_model):
    model, _, _ = tiny_model
    twin = model.copy_sharing_weights()
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    expected = model(ids)
    use_onednn(twin)
    linears = [m for m in twin.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    assert twin.lm_head.weight is twin.transformer.wte.weight  # still tied
    assert all(m.weight.t().is_contiguous() for m in linears)  # (in, out) memory order, shapes unchanged
    torch.testing.assert_close(twin(ids), expected, rtol=1e-5, atol=1e-5)
