"""Float32 Linears on CPU through oneDNN, with weights in (in, out) memory order.

PyTorch's bundled oneDNN multiplies float32 activations by a weight matrix about twice as fast as
the BLAS (MKL) that F.linear calls for float32 on CPU: one weight read serves one to a few rows at
34-47 GB/s there, against 20-29 GB/s through F.linear (python -m bench.matmul; docs/speed.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT

AVAILABLE = torch.backends.mkldnn.is_available()


class OneDNNLinear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) that multiplies through oneDNN for float32
    inference on CPU. Gradients, other dtypes and devices go through F.linear (theirs is already
    oneDNN or cuBLAS)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_grad_enabled()):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def use_onednn(model: GPT) -> None:
    """Make every plain nn.Linear of a float32 CPU model an OneDNNLinear, in place (a class swap: the
    parameters are the same objects), and give each weight (in, out) memory order."""
    if not AVAILABLE or model.device.type != "cpu" or model.transformer.ln_f.weight.dtype != torch.float32:
        return
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
    use_input_major_weights(model)


@torch.no_grad()
def use_input_major_weights(model: GPT) -> None:
    """Give every Linear weight (in, out) memory order, as the Hub's Conv1D has; shapes stay (out, in).
    PyTorch's CPU float32 matrix-vector product reads this order about 15% faster
    (python -m bench.decode_profile --transposed-weights); in bfloat16 it is slower, so only float32 gets it."""
    done: set[int] = set()
    for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
        w = linear.weight
        if id(w) in done or w.t().is_contiguous():
            continue
        w.data = w.data.t().contiguous().t()  # lm_head: also the tied wte, the same Parameter
        done.add(id(w))
