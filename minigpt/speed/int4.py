"""Int4 weight-only quantization: the blocks' Linears as 4-bit codes in groups of 32 columns, one float16
scale per group; the tied lm_head / token embedding stays int8 (quantize.py).

Symmetric, llama.cpp's q4_0 rounding: in each group of GROUP weights, the one largest in magnitude, m,
sets the scale s = m / -8, so it is exactly -8 * s and the others round to the nearest of -8 ... 7 times
s (a weight as large but of the other sign is clamped to 7 * s). Stored as codes u = q + 8 in 0..15, two
per byte, and the scales in float16 (rounded before the codes are computed, so u and s are exactly what
is multiplied): 4.5 bits a weight, q4_0's size.

Why these choices (docs/speed.md has the table): on the GPT-2 124M shape over a 4096-token text, against
float32, symmetric groups of 32 and asymmetric groups of 64 (a float16 minimum per group too, the same
4.5 bits) had the same KL divergence (0.0081 vs 0.0080 nats) and top-1 agreement; symmetric needs no
per-group offset term in the C step's inner loop. Groups of 64 or 128 lost 18% / 29% in KL. Keeping
the lm_head in int8 rather than int4 lowers the KL by 17% for 17 MB more (of 87 MB).

Packing, per weight row: the columns in the order of positions() (below), then per 64 positions byte j
(0..31) holds position j's code in its low 4 bits and position j + 32's in its high 4 bits, so one vector
load, a mask and a shift give 64 codes as int16 (decode_step.c's unpack64). The order is for the C step's
inner loop: each chunk of 256 columns (a row's last 64-column blocks: each its own chunk of 64) is
summed in one vector of 16 int32 lanes, two lanes per group of 32 columns (a chunk of 64: eight),
converted to float32 and multiplied by its groups' scales once per chunk. A lane of vpdpwssd sums the
products of int16 pairs 2l, 2l + 1 of each 32 it is given, so positions 32i + e of a chunk hold
columns of group e / (16 / n) for n blocks of 64 (positions(); the C step permutes each activation
vector the same way, so the products are the same). The codes' offset 8 is taken out of the loop in
the same way: each lane starts at -8 times the sum of its activations.

The PyTorch path (machines without the C step, other devices, passes of every position such as the
panels' and scoring) dequantizes each Linear's weight to the activations' dtype for each call: correct
everywhere, but slow; decoding and prompts go through the C step (native.NativeDecoder.reads_prompts).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import GPT
from .quantize import Int8Linear, quantize_linears

GROUP = 32  # columns per scale; decode_step.c's GROUP
SCALE_DTYPE = torch.float16


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales) of a float weight (out, in): q int8 in -8..7 (out, in), scales float16 (out, in / GROUP),
    w ~= q * scales repeated over each group."""
    out_features, in_features = w.shape
    if in_features % (2 * GROUP):
        raise ValueError(f"int4 needs input widths that are multiples of {2 * GROUP}, got {in_features}")
    groups = w.float().reshape(out_features, in_features // GROUP, GROUP)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))  # signed: the largest magnitude
    scales = (extreme / -8).to(SCALE_DTYPE)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # an all-zero group: any scale
    q = torch.round(groups / scales.float()).clamp(-8, 7).to(torch.int8)
    return q.reshape(out_features, in_features), scales[..., 0]


CHUNK = 256  # columns summed in one vector of lanes; decode_step.c's CHUNK


def positions(cols: int) -> torch.Tensor:
    """The column at each position of a packed row of cols (a multiple of 64) columns: chunks of CHUNK columns,
    then chunks of 64; in a chunk of n blocks of 64, position 32i + e holds column 32 (e / m) + m i + e % m,
    m = 16 / n (so each lane of 16 int32 sums columns of one group; decode_step.c's int4_order)."""
    order, c = [], 0
    while c < cols:
        n = CHUNK // 64 if cols - c >= CHUNK else 1
        m, p = 16 // n, torch.arange(64 * n)
        order.append(c + 32 * (p % 32 // m) + m * (p // 32) + p % 32 % m)
        c += 64 * n
    return torch.cat(order)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Codes q (out, in) in -8..7 as bytes (out, in / 2), two per byte in the layout above."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)[:, positions(q.size(1))].reshape(q.size(0), -1, 2, 32)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(q.size(0), -1).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """pack's inverse: int8 codes (out, in) in -8..7."""
    b = packed.reshape(packed.size(0), -1, 1, 32)
    u = (torch.cat([b & 15, b >> 4], dim=2).to(torch.int8) - 8).reshape(packed.size(0), -1)
    q = torch.empty_like(u)
    q[:, positions(u.size(1))] = u
    return q


class Int4Linear(nn.Module):
    """A frozen nn.Linear with packed int4 weights (out, in / 2) uint8, float16 group scales (out, in / GROUP)
    and the float bias."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.size(0), 2 * weight.size(1)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        q, scales = quantize_groups(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()  # shared with the float model, not copied
        return cls(pack(q), scales.contiguous(), bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight this module actually multiplies by (for tests and error analysis)."""
        q = unpack(self.weight).float().view(self.out_features, -1, GROUP)
        return (q * self.scales.float()[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)


def quantize_int4(*models: GPT) -> None:
    """Quantize models in place: the blocks' Linears become Int4Linears, the tied lm_head an Int8Linear and
    wte its Int8Embedding. Pass together the models that share weights, after any LoRA merge (as
    quantize.quantize_int8)."""
    quantize_linears(models, lambda name, linear: Int8Linear.from_linear(linear) if name == "lm_head"
                     else Int4Linear.from_linear(linear))
