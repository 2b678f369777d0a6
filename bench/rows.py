"""The batched C decode step alone: ms per step and aggregate tokens/s for n rows, and what a batch that
mixes the base model with a LoRA-merged copy costs (docs/serving.md).

    python -m bench.rows [--rows 1,2,4,8,16] [--reps 12] [--precisions float32,int8] [--prefix 64]

GPT-2 124M shape, random weights, a --prefix-token prefix in every row's cache (attention's share grows with it), torch's thread count. Per
precision and n it times native.step_rows for n rows of the base model, then for n rows alternating
between the base and a merged copy whose c_attn differs (an r=8 update on every c_attn, as a LoRA
adapter merges): the weights the two share are read once per step, each copy's c_attn once more.
Medians of --reps steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench.decode import machine_info
from minigpt.adapters import merge_deltas
from minigpt.config import GPTConfig
from minigpt.model import GPT
from minigpt.speed import native
from minigpt.speed.quantize import quantize_int8

def base_and_tuned(precision: str) -> tuple[GPT, GPT]:
    """(base, a merged copy sharing every tensor but c_attn) in this precision."""
    torch.manual_seed(0)
    base = GPT(GPTConfig())
    for p in base.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    width = base.config.n_embd
    deltas = {f"transformer.h.{i}.attn.c_attn": torch.randn(3 * width, 8) @ torch.randn(8, width) * 1e-3
              for i in range(base.config.n_layer)}
    tuned = merge_deltas(base, deltas)
    if precision == "int8":
        quantize_int8(base, tuned)  # together: the weights they share are quantized once, and stay shared
    return base, tuned


def ms_per_step(rows: list[GPT], steps: dict[int, native.NativeDecoder], reps: int, prefix: int) -> float:
    """Median ms of one step_rows call decoding one token for each row (a model per row)."""
    caches = [model.new_cache(prefix + reps + 2) for model in rows]
    for cache in caches:
        cache.length = prefix
    tokens = [100 + i for i in range(len(rows))]
    times = []
    for _ in range(reps + 1):
        started = time.perf_counter()
        native.step_rows([steps[id(model)] for model in rows], tokens, caches)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.rows", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--precisions", default="float32,int8")
    p.add_argument("--prefix", type=int, default=64, help="tokens already in each row's cache")
    args = p.parse_args()
    info = machine_info()
    print(f"CPU: {info['cpu']}, {info['cores']} cores; SIMD flags: {' '.join(info['simd'])}; "
          f"{torch.get_num_threads()} threads; {args.prefix} tokens in each cache")
    print("| precision | rows | ms/step, base only | tokens/s | ms/step, base + merged copy | cost of the copy |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        base, tuned = base_and_tuned(precision)
        steps = {id(m): native.native_step(m) for m in (base, tuned)}
        for n in map(int, args.rows.split(",")):
            alone = ms_per_step([base] * n, steps, args.reps, args.prefix)
            mixed = ms_per_step([(base, tuned)[i % 2] for i in range(n)], steps, args.reps, args.prefix) if n > 1 else alone
            print(f"| {precision} | {n} | {alone:.2f} | {n / alone * 1e3:.0f} | {mixed:.2f} | "
                  f"{(mixed / alone - 1) * 100:+.0f}% |", flush=True)


if __name__ == "__main__":
    main()
