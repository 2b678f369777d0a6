"""Where a decode step's time goes: generate() vs the bare model loop vs the weight matmuls alone.

    python -m bench.decode_profile --precision int8            # three rates, 3 rounds
    python -m bench.decode_profile --precision int8 --c-step   # the same through the C decode step
    python -m bench.decode_profile --precision float32 --table # plus torch.profiler's top ops

The GPT-2 124M shape with random weights. "matmuls alone" runs only the Linear layers' products
of one decode step (the weights each token must read), so it is the ceiling for that precision.
"""
from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt import GPT, GPTConfig, SamplingParams, generate
from minigpt.speed.decoder import Decoder
from minigpt.speed.native import library, native_step
from minigpt.speed.onednn import OneDNNLinear
from minigpt.speed.quantize import Int8Linear, quantize_int8
from minigpt.tokenizer import load_tokenizer
from tests.helpers.checkpoints import write_tokenizer  # the real GPT-2 BPE files


def build(precision: str, transposed: bool, c_step: bool) -> Decoder:
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    if precision == "bfloat16":
        model.to(torch.bfloat16)
    if precision == "float32":  # what load_for_inference runs, less the (in, out) order unless asked for
        for m in model.modules():
            if type(m) is torch.nn.Linear:
                m.__class__ = OneDNNLinear
    if transposed:  # same shapes and values, (in, out) memory order: the layout of transformers' Conv1D
        for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.data = linear.weight.detach().t().contiguous().t()  # lm_head: also the tied wte
    if precision == "int8":
        quantize_int8(model)
    return Decoder(model, native_step(model), "C decode step") if c_step else Decoder(model)


def tokens_per_s(model: Decoder, tokenizer, prompt: list[int], n: int) -> tuple[float, float]:
    """(generate() tokens/s, bare greedy model loop tokens/s), both timed after the first token."""
    times = [time.perf_counter() for _ in generate(model, tokenizer, prompt, n, SamplingParams(temperature=0))]
    with torch.inference_mode():
        cache = model.new_cache(len(prompt) + n)
        token = model(torch.tensor([prompt]), cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(n - 1):
            token = model(token, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return (len(times) - 1) / (times[-1] - times[0]), (n - 1) / (time.perf_counter() - start)


def steps_per_s(one_step: Callable[[], None], rounds: int) -> float:
    one_step()  # warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        one_step()
    return rounds / (time.perf_counter() - start)


def c_matmuls_per_s(model: Decoder, rounds: int = 20) -> float:
    """matmuls_per_s for a model decoding in C: its own matrix-vector loop over the same weights."""
    step = model.step
    linears = [getattr(b, name) for b in step.blocks for name in ("c_attn", "attn_proj", "c_fc", "mlp_proj")]
    linears.append(step.model.lm_head)
    buffers = [(torch.randn(m.cols), torch.empty(m.rows)) for m in linears]

    def one_step():
        for m, (x, y) in zip(linears, buffers):
            library().linear(ctypes.byref(m), x.data_ptr(), y.data_ptr(), torch.get_num_threads())

    return steps_per_s(one_step, rounds)


@torch.inference_mode()
def matmuls_per_s(model: Decoder, rounds: int = 20) -> float:
    """How many times a second the Linear products of one decode step run, with nothing else."""
    if model.step is not None:
        return c_matmuls_per_s(model, rounds)
    layers = [m for m in model.model.modules() if isinstance(m, (Int8Linear, torch.nn.Linear))]
    dtype = model.model.transformer.ln_f.weight.dtype
    x = {n: torch.randn(1, n, dtype=torch.bfloat16 if isinstance(layers[0], Int8Linear) else dtype)
         for n in {m.in_features for m in layers}}

    def one_step():
        for m in layers:
            if isinstance(m, Int8Linear):
                torch._weight_int8pack_mm(x[m.in_features], m.weight, m.scales)
            else:
                m(x[m.in_features])  # what the model runs: oneDNN for float32

    return steps_per_s(one_step, rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="int8", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--transposed-weights", action="store_true",
                   help="experiment: store Linear weights in (in, out) memory order before measuring")
    p.add_argument("--c-step", action="store_true", help="int8: decode through the C step (minigpt/speed/native.py)")
    p.add_argument("--table", action="store_true", help="also print torch.profiler's top ops over one generate()")
    args = p.parse_args()
    if args.c_step and args.precision != "int8":
        p.error("--c-step is for --precision int8")
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder))
        tokenizer = load_tokenizer(folder)
    model = build(args.precision, args.transposed_weights, args.c_step)
    prompt = torch.randint(0, 50000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens_per_s(model, tokenizer, prompt, 8)  # warm-up
    print(f"{args.precision}{', C step' if args.c_step else ''}"
          f"{', transposed weights' if args.transposed_weights else ''}, "
          f"{torch.get_num_threads()} threads")
    for _ in range(3):
        gen, bare = tokens_per_s(model, tokenizer, prompt, args.new_tokens)
        print(f"generate() {gen:6.1f} tok/s   bare model loop {bare:6.1f} tok/s   "
              f"matmuls alone {matmuls_per_s(model):6.1f} steps/s")
    if args.table:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in generate(model, tokenizer, prompt, 64, SamplingParams(temperature=0)):
                pass
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
