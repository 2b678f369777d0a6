"""How soon the "look inside" views are ready after a reply ends: the reply's numbers (logit lens, the
sampler's stages, every head's attention, entropy, head similarity, timeline) computed once, for a
128-token reply on the GPT-2 124M shape (random weights), against one plain forward pass over the same
tokens measured in the same run; and how many bytes they take on the way to the browser.

    python -m bench.inspect_numbers               # 5 repetitions, medians
    python -m bench.inspect_numbers --reps 1      # a smoke test, not a measurement

The model loads as the app loads it (load_engine: float32 through oneDNN on CPU). Target: the numbers
ready within 1 s of the reply's end on 2 cores. Nothing here runs while a reply streams.
"""
from __future__ import annotations

import argparse
import gzip
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from minigpt.serve.conversation import BASE, Prompt, read_request
from minigpt.serve.engine import load_engine
from minigpt.serve.replies import stream_reply
from minigpt.serve.reply_numbers import as_json, reply_numbers
from tests.helpers.checkpoints import make_checkpoint

PROMPT = ("The history of the city goes back to the Roman era, when a small settlement grew on the river banks "
          "and traders from the south brought wine, oil and new ideas about building, farming and law")
TARGET_S = 1.0


def median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="reply length")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, _ = make_checkpoint(Path(tmp) / "gpt2-random", n_embd=768, n_layer=12, n_head=12, n_positions=1024)
        engine = load_engine(str(folder), None, "cpu", "float32", background=True)
    model, tokenizer = engine.models[BASE], engine.tokenizer
    ids = tokenizer.encode_ordinary(PROMPT)[:32]
    request = read_request(BASE, 0.7, 40, 0.95, args.tokens, 1, 1.0, context=1024)[0]
    stop = threading.Event()
    reply = list(stream_reply(model, tokenizer, Prompt(PROMPT, ids, 0, ()), request, stop))[-1]
    sequence = torch.tensor([reply.prompt_ids + reply.token_ids])
    print(f"reply: {len(reply.token_ids)} tokens after a {len(ids)}-token prompt; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    forward = median_s(lambda: model(sequence, None), args.reps)
    numbers = median_s(lambda: reply_numbers(model, tokenizer, reply), args.reps)
    computed = reply_numbers(model, tokenizer, reply)
    encode = median_s(lambda: as_json(computed), args.reps)
    text = as_json(computed)
    print(f"one forward pass over the {sequence.size(1)} tokens (peer): {forward * 1000:8.1f} ms")
    print(f"the reply's numbers, once:                    {numbers * 1000:8.1f} ms  "
          f"({numbers / forward:.2f}x the forward pass; target {TARGET_S:g} s: "
          f"{'met' if numbers <= TARGET_S else 'NOT met'})")
    print(f"  as JSON for the browser: {len(text) / 1024:,.0f} KiB ({len(gzip.compress(text.encode())) / 1024:,.0f} KiB "
          f"gzipped); encoding it {encode * 1000:.0f} ms")


if __name__ == "__main__":
    main()
