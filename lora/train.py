"""Fine-tune a LoRA adapter on Alpaca-style instructions.

    python -m lora.train --model gpt2 --out checkpoints/alpaca-lora

Writes to --out: adapter_config.json + adapter_model.safetensors (PEFT format, also refreshed at
every checkpoint), training_state.safetensors (for --resume), log.jsonl and loss.png.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minigpt.adapters import AdapterConfig
from minigpt.cli import INTERRUPTED, HelpWithDefaults, ctrl_c_exits_now, exit_cli
from minigpt.errors import CheckpointError
from minigpt.model import GPT
from minigpt.weights import load_pretrained, resolve_device

from .alpaca import DEFAULT_DATA, Record, load_records
from .batches import (
    IGNORE,
    Example,
    batch_stream,
    collate,
    epoch_batches,
    eval_batches,
    split,
    tokenize,
)
from .layer import inject_lora, lora_parameters
from .plot import plot_losses
from .save import save_adapter
from .state import (
    STATE_FILE,
    TrainingState,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)

LOG_FILE, PLOT_FILE = "log.jsonl", "loss.png"
# Options that shape the run's trajectory: --resume refuses to continue with different values.
RUN_OPTIONS = ("model", "data", "samples", "epochs", "max_steps", "lr", "warmup_steps", "weight_decay", "rank",
               "alpha", "dropout", "targets", "batch_size", "grad_accum", "max_len", "val_fraction", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora.train", description=__doc__.splitlines()[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("--model", default="gpt2", help="base model: gpt2[-medium|-large|-xl], Hub repo id or folder")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="local .json/.jsonl, or a Hub dataset: owner/name[/file.json]")
    p.add_argument("--out", type=Path, default=Path("checkpoints/alpaca-lora"), help="where the adapter goes")
    p.add_argument("--samples", type=int, default=None, help="use only the first N valid records")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training records")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the LoRA weights")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16, help="LoRA scale: the update is multiplied by alpha / rank")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--targets", default="c_attn", help="comma-separated module names (c_attn, c_proj, c_fc)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example, prompt + response")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the examples held out for evaluation")
    p.add_argument("--seed", type=int, default=0, help="data order, split, dropout and initialisation")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every N steps (and at the end)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    args = p.parse_args(argv)
    for name in ("samples", "max_steps", "rank", "batch_size", "grad_accum", "eval_every", "save_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over `warmup` steps, then cosine down to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def lm_loss_sum(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the non-IGNORE targets (response tokens only)."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def accumulate_gradients(model: GPT, micro_batches: list[list[Example]], device: torch.device) -> float:
    """Backpropagate the mean loss over every response token of all micro-batches; return that loss.

    Weighting by tokens, not by micro-batch, makes the gradient the same as one big batch's.
    """
    micro = [collate(batch) for batch in micro_batches]
    n_targets = sum(int((targets != IGNORE).sum()) for _, targets in micro)
    total = 0.0
    for inputs, targets in micro:
        with autocast(device):
            loss = lm_loss_sum(model, inputs.to(device), targets.to(device)) / n_targets
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def evaluate(model: GPT, batches, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        inputs, targets = (t.to(device) for t in collate(batch))
        with autocast(device):
            total += lm_loss_sum(model, inputs, targets).item()
        count += int((targets != IGNORE).sum())
    model.train()
    return total / count


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = (args.out / STATE_FILE).is_file()
        print("\ninterrupted; " + (f"continue from the last checkpoint with --resume --out {args.out}" if saved else
                                    "no checkpoint was written yet"), file=sys.stderr)
        return INTERRUPTED
    return 0


def check_resume(args: argparse.Namespace, run: dict) -> TrainingState | None:
    """The checkpoint to continue from (with --resume), after refusing anything that would lose work."""
    state_path = args.out / STATE_FILE
    if not args.resume:
        if state_path.exists():
            raise ValueError(f"{args.out} already holds a training run: pass --resume to continue it, or another --out")
        return None
    if not state_path.is_file():
        raise ValueError(f"--resume: no checkpoint ({STATE_FILE}) in {args.out}")
    resumed = load_state(state_path)
    if resumed.run != run:
        changed = ", ".join(f"--{k.replace('_', '-')} {resumed.run.get(k)!r} -> {v!r}"
                            for k, v in run.items() if resumed.run.get(k) != v)
        raise ValueError(f"--resume: the checkpoint in {args.out} was made with other options ({changed})")
    return resumed


def read_data(args: argparse.Namespace) -> list[Record]:
    records, problems = load_records(args.data)
    for line in problems:
        print(f"skipped {line}", file=sys.stderr)
    using = f", using the first {args.samples}" if args.samples and args.samples < len(records) else ""
    print(f"data: {len(records) + len(problems)} records, {len(problems)} malformed and skipped{using}",
          file=sys.stderr)
    return records[:args.samples]


def make_splits(records: list[Record], tokenizer, args: argparse.Namespace) -> tuple[list[Example], list[Example]]:
    examples, report = tokenize(records, tokenizer, args.max_len)
    train_set, val_set = split(examples, args.val_fraction, args.seed)
    print(f"tokens: {report}; {len(train_set)} for training, {len(val_set)} held out", file=sys.stderr)
    if not train_set:
        raise ValueError("no training examples left (see the counts above)")
    return train_set, val_set


def train(args: argparse.Namespace) -> list[dict]:
    """Run (or resume) training; returns the log records of the whole run."""
    out: Path = args.out
    run = {name: getattr(args, name) for name in RUN_OPTIONS}
    resumed = check_resume(args, run)
    device = resolve_device(args.device)
    with ctrl_c_exits_now("interrupted while loading; nothing was trained yet"):
        records = read_data(args)
        model, tokenizer = load_pretrained(args.model, device=device, dtype=torch.float32)
    if args.max_len > model.config.n_positions:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's context of {model.config.n_positions}")
    train_set, val_set = make_splits(records, tokenizer, args)

    torch.manual_seed(args.seed)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    adapter_config = AdapterConfig(args.rank, args.alpha, args.dropout, targets, str(args.model))
    inject_lora(model, targets, args.rank, args.alpha, args.dropout)
    params = lora_parameters(model)
    n_trainable = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {n_trainable:,} of {n_total:,} ({100 * n_trainable / n_total:.2f}%)",
          file=sys.stderr)

    steps_per_epoch = math.ceil(len(epoch_batches(train_set, args.batch_size, args.seed, 0)) / args.grad_accum)
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    warmup = args.warmup_steps if args.warmup_steps is not None else round(0.05 * total)
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    log: list[dict] = []
    step = 0
    if resumed is not None:
        restore(resumed, params, optimizer, scheduler, device)
        step = resumed.step
        log = [r for r in read_log(out / LOG_FILE) if r["step"] <= step]  # drop steps done after the checkpoint
    out.mkdir(parents=True, exist_ok=True)
    write_log(out / LOG_FILE, log)

    def checkpoint() -> None:
        save_adapter(model, out, adapter_config)
        state = TrainingState(step, run, {k: p.detach() for k, p in params.items()}, optimizer.state_dict(),
                              scheduler.state_dict(), rng_state(device))
        save_state(out / STATE_FILE, state)

    batches = itertools.islice(batch_stream(train_set, args.batch_size, args.seed), step * args.grad_accum, None)
    model.train()
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    with (out / LOG_FILE).open("a") as log_file, bar:  # the bar closes before an error or Ctrl-C line is printed
        def record(entry: dict) -> None:
            log.append(entry)
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

        while step < total:
            started = time.perf_counter()
            micro_batches = [next(batches) for _ in range(args.grad_accum)]
            n_tokens = sum(len(e.ids) - 1 for batch in micro_batches for e in batch)  # padding not counted
            loss = accumulate_gradients(model, micro_batches, device)
            torch.nn.utils.clip_grad_norm_(params.values(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_per_s = n_tokens / (time.perf_counter() - started)
            record({"step": step, "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1)})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            bar.update()
            if val_set and (step % args.eval_every == 0 or step == total):
                val_loss = evaluate(model, eval_batches(val_set, args.batch_size), device)
                record({"step": step, "val_loss": val_loss})
                bar.write(f"step {step}: held-out loss {val_loss:.4f}", file=sys.stderr)
            if step % args.save_every == 0 or step == total:
                checkpoint()
    plot_losses(log, out / PLOT_FILE)
    print(f"adapter written to {out} (log: {LOG_FILE}, curve: {PLOT_FILE})", file=sys.stderr)
    return log


def restore(state: TrainingState, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state.lora[name])
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    set_rng_state(state.rng, device)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_log(path: Path, log: list[dict]) -> None:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in log))


if __name__ == "__main__":
    exit_cli(main())
