"""The weight reads behind one decode step: each matmul kernel on the GPT-2 124M weights, alone.

    python -m bench.matmul              # 1 and 7 rows (one decode step; a speculative check of 6 proposals)
    python -m bench.matmul --rows 1,2,4,8 --threads 1

Decoding a token multiplies a few activation rows by every weight matrix, reading each weight once,
so the speed of these products bounds the speed of decoding. For the 48 block matrices (340 MB in
float32; far more than the L3 cache, so every call reads DRAM) and the 50257 x 768 lm_head, it times:
F.linear (what nn.Linear runs), oneDNN's matmul (torch.ops.mkldnn._linear_pointwise, what
minigpt.speed.onednn runs for float32 inference), each with row-major (out, in) weights and with the
Hub's (in, out) memory order; bfloat16 F.linear; the int8 kernel of minigpt/speed/quantize.py (PyTorch's);
and the float32 and int8 matrix-vector loops of minigpt/speed/decode_step.c (the C decode step's), one row
per call, in each variant this CPU runs (avx512, avx2, the portable C loop; native.cpu_isas()).
Medians of --reps, as milliseconds per step and GB/s of weights read.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minigpt.speed import native

BLOCK_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12  # (out, in): c_attn, c_proj, c_fc, mlp.c_proj
LM_HEAD = [(50257, 768)]


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def int8_kernel(x: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, *w)


def c_loop(x: torch.Tensor, w: tuple) -> None:
    _, _, linear, y, lib = w
    for row in x:  # the C loop takes one activation row
        lib.linear(ctypes.byref(linear), row.data_ptr(), y.data_ptr(), torch.get_num_threads())


def c_weights(weight: torch.Tensor, scales: torch.Tensor | None, isa: str | None = None) -> tuple:
    """(weight, float32 scales or None, the C struct pointing at them, an output buffer, the variant's
    library): an int8 weight with its scales, or a float32 weight (scales None)."""
    scales = None if scales is None else scales.float()
    linear = native.LinearStruct(weight.data_ptr(), None if scales is None else scales.data_ptr(), None, *weight.shape)
    return weight, scales, linear, torch.empty(weight.size(0)), native.library(isa)


def kernels(shapes: list[tuple[int, int]]) -> dict[str, tuple[Callable, list, torch.dtype, int]]:
    """name -> (kernel, weights, input dtype, bytes per weight element)."""
    rowmajor = [torch.randn(shape) for shape in shapes]
    in_out = [w.t().contiguous().t() for w in rowmajor]  # same shape and values, (in, out) in memory
    int8 = [(torch.randint(-127, 128, w.shape, dtype=torch.int8), torch.rand(w.size(0)).bfloat16()) for w in rowmajor]
    return {
        "F.linear float32, (out, in)": (F.linear, rowmajor, torch.float32, 4),
        "F.linear float32, (in, out)": (F.linear, in_out, torch.float32, 4),
        "oneDNN float32, (out, in)": (onednn, rowmajor, torch.float32, 4),
        "oneDNN float32, (in, out)": (onednn, in_out, torch.float32, 4),
        "F.linear bfloat16, (out, in)": (F.linear, [w.bfloat16() for w in rowmajor], torch.bfloat16, 2),
        "int8 kernel (quantize.py)": (int8_kernel, int8, torch.bfloat16, 1),
    } | {f"C float32 ({isa})": (c_loop, [c_weights(w, None, isa) for w in rowmajor], torch.float32, 4)
         for isa in native.cpu_isas()} | {f"C int8 ({isa})": (c_loop, [c_weights(*w, isa) for w in int8], torch.float32, 1)
                                          for isa in native.cpu_isas()}


def time_step(kernel: Callable, weights: list, rows: int, dtype: torch.dtype, reps: int) -> float:
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {768, 3072}}
    in_features = [(w[0] if isinstance(w, tuple) else w).size(1) for w in weights]

    def step():
        for w, n in zip(weights, in_features):
            kernel(inputs[n], w)

    step()  # warm-up: oneDNN builds its primitives on first use
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,7", help="activation rows per product, comma-separated")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--only", default="", help="time only the kernels whose name contains this text")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    for label, shapes in (("48 block matrices", BLOCK_SHAPES), ("lm_head", LM_HEAD)):
        elements, candidates = sum(o * i for o, i in shapes), kernels(shapes)
        for rows in map(int, args.rows.split(",")):
            print(f"\n{label}, {rows} row{'s' if rows > 1 else ''}:")
            for name, (kernel, weights, dtype, size) in candidates.items():
                if args.only not in name:
                    continue
                seconds = time_step(kernel, weights, rows, dtype, args.reps)
                print(f"  {name:<30}{1e3 * seconds:>8.2f} ms{elements * size / seconds / 1e9:>8.1f} GB/s")


if __name__ == "__main__":
    main()
