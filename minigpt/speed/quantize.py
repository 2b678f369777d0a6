"""Int8 weight-only quantization: every Linear (and the tied lm_head / token embedding) stored as int8.

Symmetric, one scale per output channel: W[o, :] ~= q[o, :] * scale[o] with q in [-127, 127] and
scale[o] = max|W[o, :]| / 127. Activations are not quantized: they keep the model's dtype (float32
is the faster choice on CPU, where small bfloat16 ops cost more per call) and are rounded to
bfloat16 only as they enter the matmul, the one input precision for which PyTorch's CPU int8
kernel (`torch._weight_int8pack_mm`) is fast. Decoding one token reads every weight once, so a
quarter of float32's bytes is most of the speed-up.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT
from .onednn import OneDNNLinear

SCALE_DTYPE = torch.bfloat16  # the CPU kernel wants its scales (and input) in this dtype
# Up to this many rows (decode steps, short prompts) the int8 kernel wins; above, dequantizing to
# bfloat16 and using the regular matmul does (GPT-2 124M layer shapes, 1 thread: even at 16 rows,
# dequantizing 1.4x faster at 32, 1.7x at 128).
INT8_KERNEL_MAX_ROWS = 16
ALREADY_INT8 = "the model is already int8 or int4: a draft speeds up float32, bfloat16 or float16 models"


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
        q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        bias = None if linear.bias is None else linear.bias.detach()  # shared with the float model, not copied
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


def quantize_int8(*models: GPT) -> None:
    """Quantize models in place: every nn.Linear becomes an Int8Linear and wte an Int8Embedding.

    Everything else (LayerNorms, position embeddings, biases, the KV cache) keeps the model's dtype.
    Pass together the models that share weights (a base model and the LoRA-tuned one built from it):
    a Linear weight they share is quantized once and the int8 copy is shared too. Build the tuned
    model first: a LoRA update merges into float weights, not int8 ones.
    """
    quantize_linears(models, lambda name, linear: Int8Linear.from_linear(linear))


def quantize_linears(models: tuple[GPT, ...], quantize: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace every nn.Linear of models by quantize(its name in the model, it), and wte by an Int8Embedding
    reading the quantized lm_head (which must be an Int8Linear): a Linear the models share is quantized once
    and its copy shared. Every Linear is checked before anything changes."""
    linears = [(f"{parent_name}.{name}".lstrip("."), parent, name, child) for model in models
               for parent_name, parent in model.named_modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for _, _, name, child in linears:
        if type(child) not in (nn.Linear, OneDNNLinear):  # e.g. a LoRALinear: quantizing it would drop the adapter
            raise TypeError(f"cannot quantize {type(child).__name__} {name!r}: merge it into a plain Linear "
                            "first (adapters.load_tuned_model does)")
    quantized: dict[tuple[int, int], tuple[nn.Linear, nn.Module]] = {}
    for path, parent, name, child in linears:
        key = (id(child.weight), id(child.bias))
        if key not in quantized:  # the float Linear stays referenced so these ids are not reused
            quantized[key] = (child, quantize(path, child))
        setattr(parent, name, quantized[key][1])
    for model in models:
        model.transformer.wte = Int8Embedding(model.lm_head, model.transformer.ln_f.weight.dtype)


def int8_drafts(*models: GPT) -> list[GPT]:
    """Int8 copies of float models, for generate(draft=...): proposals at int8 speed, checked by the
    float model. The copies share the biases, LayerNorms and position embeddings with their models,
    and with each other the int8 weights of the Linears their models share (quantize_int8)."""
    for model in models:
        if any(isinstance(m, Int8Linear) for m in model.modules()):
            raise ValueError(ALREADY_INT8)
    drafts = [model.copy_sharing_weights() for model in models]
    quantize_int8(*drafts)
    return drafts
