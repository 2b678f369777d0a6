"""Command line: stream a GPT-2 continuation to the terminal.

    python -m minigpt.generate --model gpt2 --prompt "Once upon a time" --max-new-tokens 60 \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1
"""
from __future__ import annotations

import argparse
import sys
import warnings

from lora import alpaca_prompt

from .errors import CheckpointError
from .generation import generate
from .inference import PRECISIONS, load_for_inference, speculative_drafts
from .quantize import ALREADY_INT8
from .sampling import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minigpt.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hub repo id, or a local folder")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal, one per line")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default="float32", choices=PRECISIONS,
                   help="float32 is exact; int8 (int8 weights) is the fastest on CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: for int8 (1.07x after a warm-up); float32 loses (README, speed)")
    p.add_argument("--speculative", action="store_true",
                   help="an int8 copy proposes tokens, the model checks several per pass: same model, faster on CPU")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter for this base: local folder or Hub repo id")
    p.add_argument("--alpaca", action="store_true", help="wrap each prompt in the Alpaca instruction template")
    return p.parse_args(argv)


def as_sent(prompt: str, args: argparse.Namespace) -> str:
    return alpaca_prompt(prompt) if args.alpaca else prompt


def stream(model, tokenizer, prompt: str, args: argparse.Namespace, params: SamplingParams, draft=None) -> None:
    events = generate(model, tokenizer, tokenizer.encode_ordinary(as_sent(prompt, args)), args.max_new_tokens, params,
                      seed=args.seed, stop=args.stop, draft=draft)
    for event in events:
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the CLI's errors are printed: one plain line, no source location."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.formatwarning = one_line_warning
    try:
        if args.speculative and args.dtype == "int8":  # refused before loading: no load-time warning first
            raise ValueError(ALREADY_INT8)
        params = SamplingParams(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        base, tuned, tokenizer = load_for_inference(args.model, args.adapter, args.device, args.dtype, args.compile)
        model = tuned if tuned is not None else base
        draft = speculative_drafts(model)[0] if args.speculative else None
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.interactive:
        sys.stdout.write(as_sent(args.prompt, args))
        stream(model, tokenizer, args.prompt, args, params, draft)
        return 0
    print("Type a prompt and press Enter; Ctrl-C stops a reply, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        try:
            stream(model, tokenizer, prompt, args, params, draft)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
