"""Command line: stream a GPT-2 continuation to the terminal.

    python -m minigpt.generate --model gpt2 --prompt "Once upon a time" --max-new-tokens 60 \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from .cli import (
    INTERRUPTED,
    HelpWithDefaults,
    add_precision_arguments,
    ctrl_c_exits_now,
    exit_cli,
    warn_if_compile,
)
from .errors import CheckpointError
from .generation import generate
from .inference import load_with_scale, speculative_drafts
from .prompts import alpaca_prompt
from .request import Mode, ReplyRequest
from .sampling import SamplingParams
from .speed.quantize import ALREADY_INT8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minigpt.generate", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hub repo id, or a local folder")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal, one per line")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    add_precision_arguments(p)
    p.add_argument("--speculative", action="store_true",
                   help="an int8 copy proposes tokens, the model checks several per pass: same model, faster on CPU")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter for this base: local folder or Hub repo id")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="the adapter's update multiplied by this: 0 = the base model, 1 = as trained, up to 2")
    p.add_argument("--alpaca", action="store_true", help="wrap each prompt in the Alpaca instruction template")
    return p.parse_args(argv)


def as_sent(prompt: str, args: argparse.Namespace) -> str:
    return alpaca_prompt(prompt) if args.alpaca else prompt


def stream(model, tokenizer, prompt: str, args: argparse.Namespace, request: ReplyRequest, draft=None) -> None:
    """Print the continuation as it comes, then one line of speed on stderr (also when Ctrl-C stops it)."""
    started, first, n = time.perf_counter(), None, 0
    events = generate(model, tokenizer, tokenizer.encode_ordinary(as_sent(prompt, args)), request.max_new_tokens,
                      request.params, seed=request.seed, stop=args.stop, draft=draft)
    try:
        for event in events:
            n += 1
            first = first or time.perf_counter()
            sys.stdout.write(event.text)
            sys.stdout.flush()
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(speed_line(n, started, first, time.perf_counter()), file=sys.stderr)


def speed_line(n: int, started: float, first: float | None, finished: float) -> str:
    """"[12 tokens · first after 0.08 s · 41.3 tokens/s]": the rate counts the tokens after the first, over
    the time after it, so the prompt's processing (in the time to the first token) does not dilute it."""
    if first is None:
        return "[0 tokens]"
    rate = f" · {(n - 1) / (finished - first):.1f} tokens/s" if n > 1 and finished > first else ""
    return f"[{n} token{'s' * (n != 1)} · first after {first - started:.2f} s{rate}]"


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the CLI's errors are printed: one plain line, no source location."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warn_if_compile(args)
    warnings.formatwarning = one_line_warning
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED


def read_request(args: argparse.Namespace) -> ReplyRequest:
    """The flags as a ReplyRequest, validated as the app's and the API's requests are; a refusal names the flag
    ('--top-k must be ...')."""
    try:
        return ReplyRequest(Mode.TUNED if args.adapter else Mode.BASE,
                            SamplingParams(args.temperature, args.top_k, args.top_p), args.max_new_tokens, args.seed,
                            args.lora_scale)
    except ValueError as e:
        field, _, rest = str(e).partition(" ")
        raise ValueError(f"--{field.replace('_', '-')} {rest}" if field.islower() else str(e)) from None


def run(args: argparse.Namespace) -> int:
    try:
        if args.speculative and args.precision in ("int8", "int4"):  # refused before loading: no load-time warning first
            raise ValueError(ALREADY_INT8)
        if args.lora_scale != 1 and not args.adapter:
            raise ValueError("--lora-scale scales an adapter: pass --adapter too")
        request = read_request(args)
        with ctrl_c_exits_now():
            base, lora, tokenizer = load_with_scale(args.model, args.adapter, args.device, args.precision)
        model = lora.decoder(request.scale) if lora is not None else base
        draft = speculative_drafts(model)[0] if args.speculative else None
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.interactive:
        sys.stdout.write(as_sent(args.prompt, args))
        stream(model, tokenizer, args.prompt, args, request, draft)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
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
            stream(model, tokenizer, prompt, args, request, draft)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)


def cli() -> None:
    """The installed command (pyproject.toml: [project.scripts])."""
    exit_cli(main())


if __name__ == "__main__":
    cli()
