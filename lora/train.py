"""Fine-tune a LoRA adapter (or, with --full, all the weights) on Alpaca-style instructions.

    python -m lora.train --model gpt2 --out checkpoints/alpaca-lora
    python -m lora.train --model gpt2 --full --out checkpoints/alpaca-full   # a whole model folder
    torchrun --nproc_per_node 4 -m lora.train --model gpt2-xl --epochs 1 ...   # data parallel

Writes to --out: adapter_config.json + adapter_model.safetensors (PEFT format, also refreshed at
every checkpoint; with --full a model folder in the Hub layout instead), best/ (the same at the best
held-out loss), training_state.safetensors (for --resume), log.jsonl and loss.png. The loop itself
(optimizer, schedule, evaluation, checkpoints, time budget, DDP) is minigpt.training's.
"""
from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from minigpt.adapters import AdapterConfig
from minigpt.cli import HelpWithDefaults, ctrl_c_exits_now, exit_cli
from minigpt.training import (
    LOOP_POSITIVE,
    MicroBatch,
    Ranks,
    Task,
    add_training_arguments,
    check_positive,
    check_resume,
    micro_rows,
    parse_duration,
    process_started,
    run_training,
    train_cli,
)
from minigpt.weights import load_pretrained, resolve_snapshot, save_pretrained

from .alpaca import DEFAULT_DATA, Record, load_records
from .batches import (
    Example,
    batch_stream,
    epoch_batches,
    eval_batches,
    micro_batch,
    split,
    tokenize,
)
from .layer import inject_lora, lora_parameters
from .save import save_adapter

# Options that shape the run's trajectory: --resume refuses to continue with different values.
# The length (--epochs, --max-steps, --time-budget) may grow: that extends the run.
RUN_OPTIONS = ("model", "data", "samples", "full", "lr", "warmup_steps", "weight_decay", "betas", "max_grad_norm",
               "rank", "alpha", "dropout", "targets", "batch_size", "grad_accum", "max_len", "val_fraction", "seed")
LR = {False: 3e-4, True: 3e-5}  # default peak learning rate: LoRA, --full
CPU_DEFAULT_BUDGET = "20m"  # a CPU run given no size: what 2 cores train in a coffee break


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora.train", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--model", default="gpt2", help="base model: gpt2[-medium|-large|-xl], Hub repo id or folder")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="local .json/.jsonl, or a Hub dataset: owner/name[/file.json] (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("checkpoints/alpaca-lora"))
    p.add_argument("--samples", type=int, default=None, help="use only the first N valid records")
    p.add_argument("--full", action="store_true",
                   help="fine-tune all the weights (writes a model folder) instead of a LoRA adapter")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16, help="LoRA scale: the update is multiplied by alpha / rank")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--targets", default="c_attn", help="comma-separated module names (c_attn, c_proj, c_fc)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example, prompt + response")
    add_training_arguments(p, batch_size=8, lr=None, eval_every=100)
    next(a for a in p._actions if a.dest == "lr").help += f" (default: {LR[False]} for LoRA, {LR[True]} with --full)"
    args = p.parse_args(argv)
    check_positive(p, args, ["samples", "rank", *LOOP_POSITIVE])
    if args.lr is None:
        args.lr = LR[args.full]
    return args


def main(argv: list[str] | None = None) -> int:
    # the time budget counts from the command's start: the process's (imports included), or this call's when
    # called with arguments from Python
    started = process_started() if argv is None else time.monotonic()
    return train_cli(train, parse_args(argv), started)


def read_data(args: argparse.Namespace, say) -> list[Record]:
    records, problems = load_records(args.data)
    for line in problems:
        say(f"skipped {line}")
    using = f", using the first {args.samples}" if args.samples and args.samples < len(records) else ""
    say(f"data: {len(records) + len(problems)} records, {len(problems)} malformed and skipped{using}")
    return records[:args.samples]


def make_splits(records: list[Record], tokenizer, args: argparse.Namespace, say) -> tuple[list[Example], list[Example]]:
    examples, report = tokenize(records, tokenizer, args.max_len)
    train_set, val_set = split(examples, args.val_fraction, args.seed)
    say(f"tokens: {report}; {len(train_set)} for training, {len(val_set)} held out")
    if not train_set:
        raise ValueError("no training examples left (see the counts above)")
    return train_set, val_set


def size_for_cpu(args: argparse.Namespace, ranks: Ranks, say) -> None:
    """A CPU run given no size would take about a day on the full set: train for CPU_DEFAULT_BUDGET instead."""
    if ranks.device.type == "cpu" and not args.resume and all(getattr(args, name) is None for name in
                                          ("samples", "epochs", "max_steps", "time_budget")):
        args.time_budget = parse_duration(CPU_DEFAULT_BUDGET)
        say(f"note: on a CPU without --samples, --epochs, --max-steps or --time-budget, this run trains for "
            f"{CPU_DEFAULT_BUDGET} (--time-budget {CPU_DEFAULT_BUDGET}); to train on the whole set pass --epochs 1 "
            f"(the plan below says about how long that takes here)")


def train(args: argparse.Namespace, ranks: Ranks, started: float) -> list[dict]:
    """Run (or resume) training; returns the log records of the whole run."""
    say = ranks.say
    run = {name: getattr(args, name) for name in RUN_OPTIONS} | {"nproc_per_node": ranks.world}
    resumed = check_resume(args.out, args.resume, run)
    with ctrl_c_exits_now("interrupted while loading; nothing was trained yet"):
        records = read_data(args, say)
        size_for_cpu(args, ranks, say)
        model, tokenizer = load_pretrained(args.model, device=ranks.device, dtype=torch.float32)
    if args.max_len > model.config.n_positions:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's context of {model.config.n_positions}")
    train_set, val_set = make_splits(records, tokenizer, args, say)

    torch.manual_seed(args.seed)
    params, save_result = trained_weights(model, args)
    n_trainable = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in model.parameters())
    say(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.2f}%)")

    step_batch = args.batch_size * ranks.world * args.grad_accum  # every example of one optimizer step

    def steps(start: int) -> Iterator[list[MicroBatch]]:
        """Each step's batch, split into this rank's micro-batches; row positions key the dropout masks."""
        for batch in itertools.islice(batch_stream(train_set, step_batch, args.seed), start, None):
            yield [micro_batch([batch[i] for i in rows], list(rows))
                   for rows in micro_rows(len(batch), ranks, args.batch_size, args.grad_accum)]

    def val_batches(n: int) -> list[MicroBatch]:
        return [micro_batch(b, list(range(len(b))))
                for b in eval_batches(val_set[:n], args.batch_size)[ranks.rank::ranks.world]]

    steps_per_epoch = len(epoch_batches(train_set, step_batch, args.seed, 0))
    task = Task(model=model, params=params, steps=steps, val_batches=val_batches, val_size=len(val_set),
                val_tokens=sum(len(e.ids) - 1 for e in val_set) / max(1, len(val_set)),
                steps_per_epoch=steps_per_epoch,
                tokens_per_step=sum(len(e.ids) - 1 for e in train_set) / steps_per_epoch,
                save_result=save_result, title="full fine-tuning" if args.full else "LoRA fine-tuning")
    log = run_training(task, args, run, resumed, ranks, started)
    best = f"the best held-out: {args.out / 'best'}; " if val_set else ""
    say(f"{'model' if args.full else 'adapter'} written to {args.out} ({best}log: log.jsonl, curve: loss.png)")
    return log


def trained_weights(model, args: argparse.Namespace) -> tuple[dict, Callable[[Path], object]]:
    """(the tensors to train, how to write them into a folder): a LoRA adapter, or with --full every weight and
    a model folder in the Hub layout (the base model's tokenizer files copied beside it)."""
    if args.full:
        model.requires_grad_(True)
        tokenizer_folder = resolve_snapshot(args.model)
        return dict(model.named_parameters()), lambda folder: save_pretrained(model, folder, tokenizer_folder)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    adapter_config = AdapterConfig(args.rank, args.alpha, args.dropout, targets, str(args.model))
    inject_lora(model, targets, args.rank, args.alpha, args.dropout)
    return lora_parameters(model), lambda folder: save_adapter(model, folder, adapter_config)


def cli() -> None:
    """The installed command (pyproject.toml: [project.scripts])."""
    exit_cli(main())


if __name__ == "__main__":
    cli()
