"""Time to first token and decode tokens/s of one chat reply streamed by minigpt.serve.replies.stream_reply,
on the GPT-2 124M shape with random weights, in a precision as the app serves it, greedy or sampled with the
chat's default settings (temperature 0.7, top-k 40, top-p 0.95).

    python -m bench.stream_reply [--reps 5] [--new-tokens 64] [--prompt-tokens 100] [--precision int8] [--sampled]

Prints the median over the repetitions, after one warm-up reply. Speed does not depend on weight values.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from pathlib import Path

import torch

from minigpt import GPT, GPTConfig, SamplingParams
from minigpt.request import ReplyRequest
from minigpt.serve.conversation import BASE, Prompt
from minigpt.serve.replies import stream_reply
from minigpt.inference import with_precision
from minigpt.tokenizer import load_tokenizer
from tests.helpers.checkpoints import write_tokenizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--precision", choices=["float32", "int8", "int4"], default="float32")
    p.add_argument("--sampled", action="store_true", help="the chat's default sampling instead of greedy")
    args = p.parse_args()
    torch.manual_seed(0)
    decoder = with_precision([GPT(GPTConfig()).eval()], args.precision)[0]
    with tempfile.TemporaryDirectory() as folder:  # the real GPT-2 BPE, offline
        write_tokenizer(Path(folder))
        tokenizer = load_tokenizer(folder)
    ids = list(range(1000, 1000 + args.prompt_tokens))
    prompt = Prompt("", ids, 0, ())
    sampling = SamplingParams(0.7, 40, 0.95) if args.sampled else SamplingParams(0.0, 0, 1.0)
    request = ReplyRequest(BASE, sampling, args.new_tokens, 0)
    results = []
    for rep in range(args.reps + 1):
        *_, reply = stream_reply(decoder, tokenizer, prompt, request, threading.Event())
        if rep:
            results.append((reply.first_token_s, reply.tokens_per_s))
    ttft = statistics.median(r[0] for r in results)
    tps = statistics.median(r[1] for r in results)
    how = "sampled (0.7, top-k 40, top-p 0.95)" if args.sampled else "greedy"
    print(f"stream_reply, GPT-2 124M shape, {args.precision}, {how}, {torch.get_num_threads()} threads: first token "
          f"{ttft * 1000:.1f} ms, {tps:.1f} tokens/s (median of {args.reps}; {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens)")


if __name__ == "__main__":
    main()
