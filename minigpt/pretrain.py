"""Train a GPT-2-architecture model from random initialisation on your own UTF-8 text.

    python -m minigpt.pretrain --text book.txt --out checkpoints/my-gpt --time-budget 30m
    torchrun --nproc_per_node 4 -m minigpt.pretrain --text corpus.txt --out checkpoints/my-gpt --max-steps 5000

The text is tokenized with GPT-2's BPE (the full 50,257-token vocabulary); its last --val-fraction
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
    MicroBatch,
    Ranks,
    Task,
    add_training_arguments,
    check_positive,
    check_resume,
    run_training,
    train_cli,
)
from .weights import HUB_ALIASES, TOKENIZER_FILES, save_pretrained

# Options that shape the run's trajectory: --resume refuses to continue with different values.
RUN_OPTIONS = ("text", "n_layer", "n_head", "n_embd", "block_size", "epochs", "max_steps", "lr", "warmup_steps",
               "weight_decay", "batch_size", "grad_accum", "val_fraction", "seed")
EVAL_WINDOWS = 100  # held-out loss over at most this many windows, so an evaluation stays cheap on a big text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minigpt.pretrain", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write (Hub layout)")
    p.add_argument("--tokenizer", default="gpt2",
                   help="folder or Hub repo with GPT-2's vocab.json and merges.txt (default: %(default)s)")
    p.add_argument("--n-layer", type=int, default=6, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=6, help="attention heads per block")
    p.add_argument("--n-embd", type=int, default=384, help="width of the residual stream (a multiple of --n-head)")
    p.add_argument("--block-size", type=int, default=256, help="context window, and tokens per training window")
    add_training_arguments(p, batch_size=16, lr=1e-3, eval_every=100)
    args = p.parse_args(argv)
    check_positive(p, args, ["n_layer", "n_head", "n_embd", "block_size", "epochs", "max_steps", "batch_size",
                             "grad_accum", "eval_every", "save_every"])
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    return train_cli(train, parse_args(argv), started)


def read_tokens(path: Path, tokenizer) -> torch.Tensor:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --text {path}: {e}") from None
    return torch.tensor(tokenizer.encode_ordinary(text), dtype=torch.long)


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


def windows(tokens: torch.Tensor, starts: torch.Tensor, block: int) -> MicroBatch:
    """Rows tokens[s : s + block] as inputs, each shifted by one as targets."""
    rows = tokens[starts[:, None] + torch.arange(block + 1)]
    return MicroBatch(rows[:, :-1], rows[:, 1:], n_tokens=rows.size(0) * block)


def held_out_batches(val: torch.Tensor, block: int, batch_size: int, ranks: Ranks) -> list[MicroBatch]:
    """This rank's share of up to EVAL_WINDOWS consecutive, non-overlapping held-out windows."""
    if len(val) < 2:
        return []
    block = min(block, len(val) - 1)
    starts = torch.arange(0, len(val) - block, block)[:EVAL_WINDOWS]
    batches = [windows(val, starts[i:i + batch_size], block) for i in range(0, len(starts), batch_size)]
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


def train(args: argparse.Namespace, ranks: Ranks, started: float) -> list[dict]:
    """Run (or resume) pre-training; returns the log records of the whole run."""
    say = ranks.say
    run = {name: getattr(args, name) for name in RUN_OPTIONS} | {"nproc_per_node": ranks.world}
    resumed = check_resume(args.out, args.resume, run)
    with ctrl_c_exits_now("interrupted while loading; nothing was trained yet"):
        tokenizer_folder = fetch(HUB_ALIASES.get(args.tokenizer, args.tokenizer), TOKENIZER_FILES, "tokenizer")
    tokenizer = load_tokenizer(tokenizer_folder)
    config = GPTConfig(vocab_size=tokenizer.n_vocab, n_positions=args.block_size, n_embd=args.n_embd,
                       n_layer=args.n_layer, n_head=args.n_head)
    block = args.block_size
    train_tokens, val_tokens = split_tokens(read_tokens(Path(args.text), tokenizer), args.val_fraction, block)
    say(f"data: {len(train_tokens) + len(val_tokens):,} tokens in {args.text}; {len(train_tokens):,} for training, "
        f"{len(val_tokens):,} held out")

    torch.manual_seed(args.seed)
    model = GPT(config)
    init_weights(model)
    model.to(ranks.device)
    params = dict(model.named_parameters())  # the tied lm_head appears once, as transformer.wte.weight
    say(f"parameters: {sum(p.numel() for p in params.values()):,} ({config.n_layer} layers, {config.n_head} heads, "
        f"width {config.n_embd}, context {block})")

    global_batch = args.batch_size * ranks.world
    share = slice(ranks.rank * args.batch_size, (ranks.rank + 1) * args.batch_size)

    def steps(start: int) -> Iterator[list[MicroBatch]]:
        """Random windows, a pure function of (seed, step, micro-batch), so a resumed run reads the same."""
        for step in itertools.count(start):
            micro = []
            for m in range(args.grad_accum):
                generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * args.grad_accum + m)
                starts = torch.randint(0, len(train_tokens) - block, (global_batch,), generator=generator)
                micro.append(windows(train_tokens, starts[share], block))
            yield micro

    tokens_per_step = block * global_batch * args.grad_accum
    task = Task(model=model, params=params, steps=steps,
                val_batches=held_out_batches(val_tokens, block, args.batch_size, ranks),
                steps_per_epoch=max(1, math.ceil(len(train_tokens) / tokens_per_step)),
                tokens_per_step=tokens_per_step,
                save_result=lambda: save_pretrained(model, args.out, tokenizer_folder), title="pre-training")
    log = run_training(task, args, run, resumed, ranks, started)
    say(f"model written to {args.out}: try python -m minigpt.generate --model {args.out} --prompt \"...\"")
    return log


def cli() -> None:
    """The installed command (pyproject.toml: [project.scripts])."""
    exit_cli(main())


if __name__ == "__main__":
    cli()
