"""Train a GPT-2-architecture model on your own UTF-8 text, from random initialisation or from existing weights.

    python -m minigpt.pretrain --text book.txt --out checkpoints/my-gpt --time-budget 30m
    python -m minigpt.pretrain --text book.txt --init-from gpt2 --out checkpoints/gpt2-book   # continued
    torchrun --nproc_per_node 4 -m minigpt.pretrain --text corpus.txt --out checkpoints/my-gpt --max-steps 5000

The text is tokenized with GPT-2's BPE (the full 50,257-token vocabulary) once, into a memory-mapped
token cache that later runs and every rank share (minigpt.token_cache); its last --val-fraction
is held out. Training reads random windows of --block-size tokens. --out ends up in the Hub layout
(config.json, model.safetensors, vocab.json, merges.txt), so it loads wherever a model name does:
`minigpt.generate --model DIR`, `app.py --model DIR`, `lora.train --model DIR`, transformers'
GPT2LMHeadModel.from_pretrained(DIR). It also holds training_state.safetensors (for --resume),
log.jsonl (with held-out loss and perplexity) and loss.png. The loop is minigpt.training's.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn

from .cli import HelpWithDefaults, ctrl_c_exits_now, exit_cli
from .config import GPTConfig
from .hub import fetch
from .model import GPT
from .tokenizer import load_tokenizer
from .training import (
    LOOP_POSITIVE,
    MicroBatch,
    Ranks,
    Task,
    add_training_arguments,
    check_positive,
    check_resume,
    micro_rows,
    process_started,
    run_training,
    train_cli,
)
from .token_cache import cached_tokens
from .weights import HUB_ALIASES, TOKENIZER_FILES, load_pretrained, resolve_snapshot, save_pretrained

# Options that shape the run's trajectory: --resume refuses to continue with different values.
SHAPE = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}  # a new model's default shape
# The length (--epochs, --max-steps, --time-budget) may grow: that extends the run.
RUN_OPTIONS = ("text", "init_from", "n_layer", "n_head", "n_embd", "block_size", "lr", "warmup_steps", "weight_decay",
               "betas", "max_grad_norm", "batch_size", "grad_accum", "val_fraction", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minigpt.pretrain", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write (Hub layout)")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="continue pre-training these weights (gpt2[-medium|-large|-xl], a Hub repo id or a folder) "
                        "instead of starting from random ones; the shape and tokenizer are the model's")
    p.add_argument("--tokenizer", default=None,
                   help="folder or Hub repo with GPT-2's vocab.json and merges.txt (default: gpt2's)")
    p.add_argument("--n-layer", type=int, default=None, help=f"transformer blocks (default: {SHAPE['n_layer']})")
    p.add_argument("--n-head", type=int, default=None, help=f"attention heads per block (default: {SHAPE['n_head']})")
    p.add_argument("--n-embd", type=int, default=None,
                   help=f"width of the residual stream, a multiple of --n-head (default: {SHAPE['n_embd']})")
    p.add_argument("--block-size", type=int, default=None,
                   help=f"tokens per training window, and the context of a new model (default: {SHAPE['block_size']}, "
                        "or the --init-from model's context if shorter)")
    add_training_arguments(p, batch_size=16, lr=1e-3, eval_every=100)
    args = p.parse_args(argv)
    check_positive(p, args, ["n_layer", "n_head", "n_embd", "block_size", *LOOP_POSITIVE])
    if args.init_from:
        given = [f"--{name.replace('_', '-')}" for name in ("tokenizer", "n_layer", "n_head", "n_embd")
                 if getattr(args, name) is not None]
        if given:
            p.error(f"{', '.join(given)}: the shape and tokenizer come from --init-from {args.init_from}")
    else:
        for name, default in SHAPE.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> int:
    # the time budget counts from the command's start: the process's (imports included), or this call's when
    # called with arguments from Python
    started = process_started() if argv is None else time.monotonic()
    return train_cli(train, parse_args(argv), started)


def split_tokens(tokens: torch.Tensor, val_fraction: float, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the text's last val_fraction, so no window straddles both."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = round(val_fraction * len(tokens))
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    if len(train) <= block:
        raise ValueError(f"the text has {len(tokens):,} tokens, {len(train):,} of them for training: too few for "
                         f"--block-size {block} (training needs more than {block})")
    return train, val


def windows(tokens: torch.Tensor, starts: torch.Tensor, block: int, positions: list[int]) -> MicroBatch:
    """Rows tokens[s : s + block] as inputs, each shifted by one as targets."""
    rows = tokens[starts[:, None] + torch.arange(block + 1)].long()
    return MicroBatch(rows[:, :-1], rows[:, 1:], n_tokens=rows.size(0) * block, positions=positions)


def held_out_windows(val: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """(start offsets, length) of the consecutive, non-overlapping held-out windows (shorter than --block-size
    where the held-out text is)."""
    if len(val) < 2:
        return torch.zeros(0, dtype=torch.long), block
    block = min(block, len(val) - 1)
    return torch.arange(0, len(val) - block, block), block


def held_out_batches(val: torch.Tensor, block: int, batch_size: int, ranks: Ranks, n: int) -> list[MicroBatch]:
    """This rank's share of the first n held-out windows."""
    starts, block = held_out_windows(val, block)
    starts = starts[:n]
    batches = [windows(val, starts[i:i + batch_size], block, list(range(len(starts[i:i + batch_size]))))
               for i in range(0, len(starts), batch_size)]
    return batches[ranks.rank::ranks.world]


def init_weights(model: GPT) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights, zero biases, and the two projections that add into
    the residual stream scaled by 1/sqrt(2 n_layer), so its variance does not grow with depth."""
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = residual_std if name.endswith("c_proj") else 0.02
            nn.init.normal_(module.weight, 0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def starting_model(args: argparse.Namespace) -> tuple[GPT, object, Path]:
    """(the model to train, its tokenizer, the folder of the tokenizer's files): --init-from's weights, or a new
    model of the asked shape with GPT-2's initialisation."""
    if args.init_from:
        folder = resolve_snapshot(args.init_from)
        model, tokenizer = load_pretrained(folder, device="cpu", dtype=torch.float32)
        if args.block_size is None:
            args.block_size = min(SHAPE["block_size"], model.config.n_positions)
        return model, tokenizer, folder
    name = args.tokenizer or "gpt2"
    folder = fetch(HUB_ALIASES.get(name, name), TOKENIZER_FILES, "tokenizer")
    tokenizer = load_tokenizer(folder)
    model = GPT(GPTConfig(vocab_size=tokenizer.n_vocab, n_positions=args.block_size, n_embd=args.n_embd,
                          n_layer=args.n_layer, n_head=args.n_head))
    init_weights(model)
    return model, tokenizer, folder


def train(args: argparse.Namespace, ranks: Ranks, started: float) -> list[dict]:
    """Run (or resume) pre-training; returns the log records of the whole run."""
    say = ranks.say
    run = {name: getattr(args, name) for name in RUN_OPTIONS} | {"nproc_per_node": ranks.world}
    resumed = check_resume(args.out, args.resume, run)
    torch.manual_seed(args.seed)
    with ctrl_c_exits_now("interrupted while loading; nothing was trained yet"):
        model, tokenizer, tokenizer_folder = starting_model(args)
    model.to(ranks.device).train()
    config, block = model.config, args.block_size
    if block > config.n_positions:
        raise ValueError(f"--block-size {block} exceeds the --init-from model's context of {config.n_positions}")
    tokens, tokenized = cached_tokens(Path(args.text), tokenizer, tokenizer_folder, build=ranks.main,
                                      wait=ranks.barrier)
    train_tokens, val_tokens = split_tokens(tokens, args.val_fraction, block)
    say(f"data: {len(tokens):,} tokens in {args.text} ({'tokenized into' if tokenized else 'read from'} the token "
        f"cache); {len(train_tokens):,} for training, {len(val_tokens):,} held out")
    params = dict(model.named_parameters())  # the tied lm_head appears once, as transformer.wte.weight
    say(f"parameters: {sum(p.numel() for p in params.values()):,} ({config.n_layer} layers, {config.n_head} heads, "
        f"width {config.n_embd}, context {block})" + (f", from {args.init_from}" if args.init_from else ""))

    step_batch = args.batch_size * ranks.world * args.grad_accum  # windows per optimizer step, all ranks

    def steps(start: int) -> Iterator[list[MicroBatch]]:
        """Random windows, a pure function of (seed, step), so a resumed run reads the same, and however the
        step is split over processes and micro-batches."""
        for step in itertools.count(start):
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            starts = torch.randint(0, len(train_tokens) - block, (step_batch,), generator=generator)
            yield [windows(train_tokens, starts[rows.start:rows.stop], block, list(rows))
                   for rows in micro_rows(step_batch, ranks, args.batch_size, args.grad_accum)]

    tokens_per_step = block * step_batch
    task = Task(model=model, params=params, steps=steps,
                val_batches=lambda n: held_out_batches(val_tokens, block, args.batch_size, ranks, n),
                val_size=len(held_out_windows(val_tokens, block)[0]), val_tokens=held_out_windows(val_tokens, block)[1],
                steps_per_epoch=max(1, math.ceil(len(train_tokens) / tokens_per_step)),
                tokens_per_step=tokens_per_step,
                save_result=lambda folder: save_pretrained(model, folder, tokenizer_folder), title="pre-training")
    log = run_training(task, args, run, resumed, ranks, started)
    say(f"model written to {args.out}: try python -m minigpt.generate --model {args.out} --prompt \"...\"")
    return log


def cli() -> None:
    """The installed command (pyproject.toml: [project.scripts])."""
    exit_cli(main())


if __name__ == "__main__":
    cli()
