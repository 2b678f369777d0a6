"""Two builds of the C decode step taking turns in one process: this checkout's decode_step.c against another
checkout's, on the same model in memory, blocks of single-token steps alternating.

    git worktree add /tmp/before HEAD~1
    python -m bench.builds --other /tmp/before [--shape gpt2] [--precision int4] [--tokens 64] [--blocks 12]

On a machine whose speed drifts from minute to minute (other jobs, a busy host), two runs in separate
processes minutes apart differ by more than most changes to the step; blocks taking turns see the same
drift. Random weights of the shape, quantized, in huge pages as the app keeps them. The other checkout's
native.py builds and loads its own library; the two share the model's tensors, so their C structs (which
this file's native.py fills) must have one layout.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time

import torch

from bench.decode import SHAPES, machine_info
from minigpt.config import GPTConfig
from minigpt.inference import QUANTIZERS, return_freed_memory
from minigpt.model import GPT
from minigpt.speed import native
from minigpt.speed.hugepages import move_to_huge_pages


def random_model(shape: str, precision: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape]))
    QUANTIZERS[precision](model)
    return_freed_memory()
    move_to_huge_pages(model)
    return model


def other_library(checkout: str, isa: str):
    """The other checkout's decode_step.c, built and loaded by its own native.py (whose imports of the rest of
    the package come from this checkout)."""
    spec = importlib.util.spec_from_file_location("minigpt.speed.other_native", f"{checkout}/minigpt/speed/native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.library(isa)


def tokens_per_s(model: GPT, step: native.NativeDecoder, tokens: int) -> float:
    cache = model.new_cache(tokens)
    native.step_rows([step], [1], [cache])  # the first step: the cache's first touch, not timed
    start = time.perf_counter()
    for token in range(2, tokens + 1):
        native.step_rows([step], [token], [cache])
    return (tokens - 1) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.builds", description=__doc__.splitlines()[0])
    p.add_argument("--other", required=True, help="another checkout (a git worktree) of MiniGPT")
    p.add_argument("--shape", default="gpt2", choices=SHAPES)
    p.add_argument("--precision", default="int4", choices=sorted(QUANTIZERS))
    p.add_argument("--tokens", type=int, default=64, help="steps in a block")
    p.add_argument("--blocks", type=int, default=12, help="blocks of each build")
    args = p.parse_args()
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, {' '.join(info['simd'])}; torch threads {torch.get_num_threads()}")
    model = random_model(args.shape, args.precision)
    this = native.native_step(model)
    other = copy.copy(this)
    other.lib = other_library(args.other, this.isa)
    rates: dict[str, list[float]] = {"this checkout": [], args.other: []}
    for block in range(2 * args.blocks):
        name, step = (args.other, other) if block % 2 else ("this checkout", this)
        rates[name].append(tokens_per_s(model, step, args.tokens))
    for name, r in rates.items():
        print(f"{args.shape} {args.precision} {name}: median {statistics.median(r):.2f} tok/s ({min(r):.1f}-{max(r):.1f})")
    print(f"this / other: {statistics.median(rates['this checkout']) / statistics.median(rates[args.other]):.3f}")


if __name__ == "__main__":
    main()
