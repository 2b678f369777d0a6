"""Float32 Linears on CPU through oneDNN, with weights in (in, out) memory order, where that is faster.

On some CPUs PyTorch's bundled oneDNN multiplies float32 activations by a weight matrix about twice as
fast as the BLAS (MKL) that F.linear calls: on an AMD EPYC with AVX-512 one weight read served one to a
few rows at 34-47 GB/s, against 20-29 GB/s through F.linear. On others it is slower: on an Intel Sapphire
Rapids VM, 14 GB/s against F.linear's 19 (python -m bench.matmul; docs/speed.md). So loading measures
both on the model's own weights and keeps the faster (`onednn_is_faster`).
"""
from __future__ import annotations

import math
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT

AVAILABLE = torch.backends.mkldnn.is_available()
# "onednn" or "pytorch": decode float32 with that PyTorch kernel, not the C step, and skip the measurement;
# "c" (the default): the C step where it builds (inference.decoders_for), else the measured faster kernel.
KERNEL_ENV = "MINIGPT_FLOAT32_KERNEL"
SAMPLE_BYTES = 64 * 2**20  # weights timed: more than a CPU cache holds, so they stream from memory as in decoding


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


@torch.no_grad()
def onednn_is_faster(model: GPT, reps: int = 5) -> bool:
    """Whether a float32 CPU model decodes faster through oneDNN with (in, out) weights than through
    F.linear with (out, in) weights, on this CPU: one activation row times the first blocks' weights
    (at least SAMPLE_BYTES of them, copied in the other order), the best of `reps` passes each, the two
    kernels taking turns. About 0.1 s at load time. $MINIGPT_FLOAT32_KERNEL decides instead when set."""
    chosen = os.environ.get(KERNEL_ENV)
    if chosen in ("onednn", "pytorch"):
        return chosen == "onednn"
    if chosen and chosen != "c":
        warnings.warn(f"{KERNEL_ENV}={chosen!r} is not 'c', 'onednn' or 'pytorch': measuring which is faster",
                      stacklevel=2)
    if not AVAILABLE or model.device.type != "cpu" or model.transformer.ln_f.weight.dtype != torch.float32:
        return False
    weights: list[torch.Tensor] = []
    for block in model.transformer.h:
        weights += [m.weight for m in block.modules() if isinstance(m, nn.Linear)]
        if sum(w.numel() * 4 for w in weights) >= SAMPLE_BYTES:
            break
    input_major = [w.t().contiguous().t() for w in weights]
    rows = {n: torch.randn(1, n) for n in {w.size(1) for w in weights}}
    kernels = {
        "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(rows[w.size(1)], w, None, "none", [], "")
                           for w in input_major],
        "pytorch": lambda: [F.linear(rows[w.size(1)], w) for w in weights],
    }
    best = dict.fromkeys(kernels, math.inf)
    for _ in range(reps):
        for name, run in kernels.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best["onednn"] < best["pytorch"]
