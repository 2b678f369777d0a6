"""Command line: the perplexity of a text file under GPT-2, or under GPT-2 with a LoRA adapter at a scale.

    python -m minigpt.perplexity --model gpt2 --file notes.txt [--adapter A] [--lora-scale 0.5] \
        [--stride 512] [--max-length 1024] [--precision int8] [--kl-base float32] [--json]

Sliding windows as in transformers' perplexity guide: windows of --max-length tokens moved by
--stride, every token but the first scored once (docs/compare.md). --kl-base P also loads the same
model in precision P and reports, over the same positions, the KL divergence of this precision's
next-token distributions from P's (mean, 99th percentile, maximum; nats) and how often both pick the
same top-1 token: what a quantization costs (docs/speed.md).
"""
from __future__ import annotations

import argparse
import json
import sys

from .cli import add_precision_arguments, exit_cli, warn_if_compile
from .errors import CheckpointError
from .inference import PRECISIONS, load_with_scale
from .scoring import DEFAULT_STRIDE, divergence_ids, score_ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minigpt.perplexity", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Hub repo id, or a local folder")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter for this base: local folder or Hub repo id")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="adapter scale: 0 = the base model, 1 = the adapter as trained (default), up to 2")
    p.add_argument("--file", required=True, help="the text to score, read as UTF-8")
    p.add_argument("--max-length", type=int, default=None, help="window length in tokens (default: the context)")
    p.add_argument("--stride", type=int, default=None, help="tokens a window moves by (default: 512, or max-length if less)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    add_precision_arguments(p)
    p.add_argument("--kl-base", choices=PRECISIONS, default=None,
                   help="also measure the KL divergence and top-1 agreement against this precision (e.g. float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warn_if_compile(args)
    try:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {args.file} as UTF-8 text: {e}") from None
        if args.lora_scale != 1 and not args.adapter:
            raise ValueError("--lora-scale scales an adapter: pass --adapter too")
        model, tokenizer = load(args, args.precision)
        max_length = args.max_length or model.config.n_positions
        stride = args.stride if args.stride is not None else min(DEFAULT_STRIDE, max_length)
        ids = tokenizer.encode_ordinary(text)
        result = score_ids(model, ids, max_length, stride)
        divergence = None
        if args.kl_base:
            divergence = divergence_ids(model, load(args, args.kl_base)[0], ids, max_length, stride)
    except (CheckpointError, ValueError) as e:  # ScoringError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"perplexity": result.perplexity, "nll": result.mean_nll, "tokens": result.tokens,
               "max_length": result.max_length, "stride": result.stride, "lora_scale": args.lora_scale
               if args.adapter else None, "precision": args.precision}
    if divergence is not None:
        summary |= {"kl_base": args.kl_base, "kl_mean": divergence.mean_kl, "kl_p99": divergence.kl_quantile(0.99),
                    "kl_max": max(divergence.kl), "top1_agreement": divergence.top1_agreement}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"perplexity {result.perplexity:.4f} · mean NLL {result.mean_nll:.4f} nats · "
          f"{result.tokens} tokens scored (windows of {result.max_length}, stride {result.stride})")
    if divergence is not None:
        print(f"{args.precision} vs {args.kl_base}: KL divergence mean {divergence.mean_kl:.6f} nats · 99% "
              f"{summary['kl_p99']:.6f} · max {summary['kl_max']:.6f} · same top-1 token "
              f"{100 * divergence.top1_agreement:.2f}%")
    return 0


def load(args: argparse.Namespace, precision: str):
    """The model to score in this precision (at --lora-scale with an adapter), and the tokenizer."""
    base, lora, tokenizer = load_with_scale(args.model, args.adapter, args.device, precision)
    return (lora.decoder(args.lora_scale) if lora is not None else base), tokenizer


def cli() -> None:
    """The installed command (pyproject.toml: [project.scripts])."""
    exit_cli(main())


if __name__ == "__main__":
    cli()
