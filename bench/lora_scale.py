"""The cost of serving a LoRA scale other than 0 and 1: build time, extra memory, decode speed.

    python -m bench.lora_scale [--precision float32 int8] [--reps 3]

GPT-2 124M shape with random weights and a random r=8 c_attn adapter (the shape lora.train makes), loaded
as the app loads it (minigpt.inference.with_adapter). For each precision: the time the first request at a
new scale waits for its model, the bytes that model adds (tensors it does not share with the base) and,
for int8, the float32 targeted weights kept for all scales; then time to first token and tokens/s of
stream_reply at scale 1 and at 0.5 (medians).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from minigpt import GPT, GPTConfig, SamplingParams
from minigpt.adapters import lora_delta, match_targets
from minigpt.inference import with_adapter
from minigpt.request import ReplyRequest
from minigpt.serve.conversation import TUNED, Prompt
from minigpt.serve.replies import stream_reply
from minigpt.tokenizer import load_tokenizer
from tests.helpers.checkpoints import write_tokenizer


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def own_tensors(model: GPT, base: GPT) -> list[torch.Tensor]:
    """The tensors of model not shared with base."""
    shared = {t.data_ptr() for t in base.state_dict().values()}
    seen, own = set(), []
    for t in model.state_dict().values():
        if t.data_ptr() not in shared and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            own.append(t)
    return own


def stream_speed(decoder, tokenizer, reps: int) -> tuple[float, float]:
    prompt = Prompt("", list(range(1000, 1100)), 0, ())
    request = ReplyRequest(TUNED, SamplingParams(0.0, 0, 1.0), 64, 0)
    runs = []
    for rep in range(reps + 1):
        *_, reply = stream_reply(decoder, tokenizer, prompt, request, threading.Event())
        if rep:
            runs.append((reply.first_token_s, reply.tokens_per_s))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--precision", nargs="+", default=["float32", "int8"])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder))
        tokenizer = load_tokenizer(folder)
    for precision in args.precision:
        torch.manual_seed(0)
        base = GPT(GPTConfig()).eval()
        deltas = {name: lora_delta(torch.randn(8, 768) * 0.02, torch.randn(3 * 768, 8) * 0.02, 2.0)
                  for name in match_targets(base, ["c_attn"])}
        base_decoder, lora = with_adapter(base, deltas, precision)
        kept = tensor_bytes(l.weight for l in lora.float_targets.values()) if precision == "int8" else 0
        builds = []
        for s in (0.3, 0.5, 0.7):
            start = time.perf_counter()
            half = lora.decoder(s)
            builds.append(time.perf_counter() - start)
        extra = tensor_bytes(own_tensors(half.model, base_decoder.model))
        at_one, at_half = stream_speed(lora.tuned, tokenizer, args.reps), stream_speed(half, tokenizer, args.reps)
        print(f"{precision}: first request at a new scale waits {statistics.median(builds) * 1000:.0f} ms "
              f"(median of 3 scales); each cached scale adds {extra / 2**20:.1f} MiB; kept float targets "
              f"{kept / 2**20:.1f} MiB; scale 1: first token {at_one[0] * 1000:.1f} ms, {at_one[1]:.1f} tokens/s; "
              f"scale 0.5: first token {at_half[0] * 1000:.1f} ms, {at_half[1]:.1f} tokens/s ({half.kernel})")


if __name__ == "__main__":
    main()
