"""Int8 weight-only quantization: every Linear (and the tied lm_head / token embedding) stored as int8.

Symmetric, one scale per output channel: W[o, :] ~= q[o, :] * scale[o] with q in [-127, 127] and
scale[o] = max|W[o, :]| / 127. Activations are not quantized; the matmul runs in bfloat16, the only
precision for which PyTorch's CPU int8 kernel (`torch._weight_int8pack_mm`) is fast here.
Decoding one token reads every weight once, so a quarter of float32's bytes is most of the speed-up.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import GPT

SCALE_DTYPE = torch.bfloat16  # the CPU kernel wants its scales (and input) in this dtype


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights (out, in), bfloat16 per-row scales (out,) and the float bias."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach().float()
        # Round the scale to its stored dtype first, so q * scale is exactly the weight we meant.
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales, bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight this module actually multiplies by (for tests and error analysis)."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(SCALE_DTYPE)
        if x.device.type == "cpu" and x2.size(0) <= INT8_KERNEL_MAX_ROWS:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        else:  # long prefills and other devices: dequantize and use the regular bfloat16 matmul
            y = F.linear(x2, self.weight.to(SCALE_DTYPE)) * self.scales
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """Token embedding that reads the rows of an int8 lm_head: GPT-2 ties the two, and so do we."""

    def __init__(self, lm_head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.lm_head = lm_head
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head.weight[idx].to(self.dtype) * self.lm_head.scales[idx, None].to(self.dtype)


def quantize_int8(model: GPT, memo: dict[tuple[int, int], tuple[nn.Linear, Int8Linear]] | None = None) -> GPT:
    """Quantize model in place and return it: every nn.Linear becomes an Int8Linear, wte an Int8Embedding.

    Everything else (LayerNorms, position embeddings, biases, the KV cache) keeps the model's dtype.
    Pass the same `memo` dict when quantizing models that share Linear weights (a base model and a
    LoRA-tuned one built from it): a shared weight is quantized once and its int8 copy shared too.
    """
    memo = {} if memo is None else memo
    dtype = model.transformer.ln_f.weight.dtype
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                key = (id(child.weight), id(child.bias))
                if key not in memo:  # the float Linear is kept in memo so these ids cannot be reused
                    memo[key] = (child, Int8Linear.from_linear(child))
                setattr(parent, name, memo[key][1])
    model.transformer.wte = Int8Embedding(model.lm_head, dtype)
    return model


# Above this many rows (a long prefill) dequantize-then-matmul beats the int8 matrix-vector kernel.
INT8_KERNEL_MAX_ROWS = 16
