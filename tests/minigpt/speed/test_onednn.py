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


@needs_onednn
def test_loading_keeps_the_faster_float32_kernel_and_the_environment_can_choose(tiny_checkpoint, monkeypatch):
    """Which kernel is faster depends on the CPU, so loading measures; either way the logits are the model's."""
    from minigpt.inference import load_for_inference
    from minigpt.speed.onednn import KERNEL_ENV, onednn_is_faster

    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    logits = {}
    for kernel in ("onednn", "pytorch"):
        monkeypatch.setenv(KERNEL_ENV, kernel)
        decoder = load_for_inference(str(tiny_checkpoint[0]), device="cpu", precision="float32")[0]
        uses_onednn = any(type(m) is OneDNNLinear for m in decoder.model.modules())
        assert uses_onednn == (kernel == "onednn")
        with torch.inference_mode():
            logits[kernel] = decoder.model(ids)
    torch.testing.assert_close(logits["onednn"], logits["pytorch"], rtol=1e-5, atol=1e-5)

    monkeypatch.delenv(KERNEL_ENV)
    model = load_for_inference(str(tiny_checkpoint[0]), device="cpu", precision="float32")[0].model
    assert isinstance(onednn_is_faster(model), bool)  # measured: the answer is this machine's
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.warns(UserWarning, match="is not 'c', 'onednn' or 'pytorch'"):
        onednn_is_faster(model)
