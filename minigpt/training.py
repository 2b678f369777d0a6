"""The training loop shared by LoRA fine-tuning (python -m lora.train) and pre-training (python -m minigpt.pretrain).

A caller builds a `Task` (the model, the tensors to train, its batches, how to save the result) and
hands it to `run_training`, which owns everything else: AdamW with warm-up and cosine decay,
gradient accumulation, clipping, held-out evaluation, atomic checkpoints and --resume, the plan
printed before the first step, the time budget, and data-parallel training under torchrun.

Data parallel: `torchrun --nproc_per_node N` starts N processes (ranks). Each reads only its share
of every global batch; DistributedDataParallel sums the gradients. The loss of each micro-batch is
divided by the number of scored tokens in the whole global step, so N ranks of batch B train
exactly like one process of batch N x B. Only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .atomic import DiskFull, is_disk_full
from .cli import INTERRUPTED
from .errors import CheckpointError
from .model import GPT
from .plot import plot_losses
from .run_lock import only_run_in
from .train_state import STATE_FILE, TrainingState, load_state, save_state
from .weights import resolve_device

IGNORE = -100  # F.cross_entropy's default ignore_index: targets that are not scored
LOG_FILE, PLOT_FILE = "log.jsonl", "loss.png"
PROBE_STEPS = 2  # forward + backward passes timed (without an optimizer step) for the plan's estimate


@dataclass
class MicroBatch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next-token ids, IGNORE where not scored (prompt, padding)
    n_tokens: int  # real tokens read (padding excluded), for tokens/s


@dataclass
class Task:
    """What is trained, on what, and what a finished (or checkpointed) run leaves behind."""
    model: GPT
    params: dict[str, nn.Parameter]  # the trained tensors by name: what checkpoints hold
    steps: Callable[[int], Iterator[list[MicroBatch]]]  # from a step on: this rank's micro-batches, step by step
    val_batches: list[MicroBatch]  # this rank's share of the held-out set
    steps_per_epoch: int
    tokens_per_step: float  # mean tokens read per optimizer step, all ranks together
    save_result: Callable[[], None]  # write the usable output (adapter, model folder) into --out
    title: str  # of the loss plot


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, line: str) -> None:
        """A progress line on stderr, from rank 0 only (N ranks would print it N times)."""
        if self.main:
            print(line, file=sys.stderr)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all ranks."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def from_main(self, value: float) -> float:
        """Rank 0's value, on every rank (decisions that must agree: plan length, stopping)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.item()


def start_ranks(device: str | None) -> Ranks:
    """Join the torchrun job if there is one (gloo on CPU, NCCL on CUDA); otherwise one process."""
    chosen = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, chosen)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
        torch.cuda.set_device(chosen)
    elif chosen.type != "cpu":
        raise ValueError(f"torchrun training runs on cuda (NCCL) or cpu (gloo), not {chosen.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), chosen)


def stop_ranks(ranks: Ranks) -> None:
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def train_cli(train: Callable[[argparse.Namespace, Ranks, float], object], args: argparse.Namespace,
              started: float) -> int:
    """What both training commands do around `train(args, ranks, started)`: join the torchrun job (or run
    alone) and leave it; a bad option, file or checkpoint, a full disk or an --out another run is using is one
    `error:` line and status 2; Ctrl-C is one line saying how to go on, status 130. Only rank 0 prints them."""
    ranks = None
    try:
        ranks = start_ranks(args.device)
        with only_run_in(args.out) if ranks.main else nullcontext():
            train(args, ranks, started)
    except (CheckpointError, ValueError) as e:
        if ranks is None or ranks.main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_disk_full(e):
            raise
        if ranks is None or ranks.main:  # every write is atomic: the last checkpoint is whole
            go_on = (f"continue from the last checkpoint with --resume --out {args.out}"
                     if (args.out / STATE_FILE).is_file() else "run again (no checkpoint was written yet)")
            full = e if isinstance(e, DiskFull) else f"the disk is full ({e.strerror})"
            print(f"error: {full}; nothing half-written was kept: free some space, then {go_on}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = (args.out / STATE_FILE).is_file()
        if ranks is None or ranks.main:
            print("\ninterrupted; " + (f"continue from the last checkpoint with --resume --out {args.out}" if saved
                                        else "no checkpoint was written yet"), file=sys.stderr)
        return INTERRUPTED
    finally:
        if ranks is not None:
            stop_ranks(ranks)
    return 0


def add_training_arguments(p: argparse.ArgumentParser, *, batch_size: int, lr: float, eval_every: int) -> None:
    """The options of the shared loop, for both training commands."""
    p.add_argument("--epochs", type=float, default=None, help="length of the run in epochs (1)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--time-budget", type=parse_duration, default=None, metavar="DURATION",
                   help="stop cleanly after this long (90s, 20m, 1.5h), fitting the LR schedule to it")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=batch_size, help="sequences per micro-batch, per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--eval-every", type=int, default=eval_every,
                   help="held-out evaluation every N steps (and at the end)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, ~1/3 more compute")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '20m', '1.5h'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 20m or 1.5h, got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over `warmup` steps, then cosine down to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def lm_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the scored (non-IGNORE) targets."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def accumulate_gradients(model: nn.Module, micro: list[MicroBatch], ranks: Ranks) -> tuple[float, int]:
    """Backpropagate the mean loss over every scored token of the global step; return it and the tokens read.

    Weighting by tokens, not by micro-batch or rank, makes the gradient the same as one big batch's.
    DDP averages gradients over ranks, hence the factor ranks.world. Only the last micro-batch
    synchronises gradients across ranks.
    """
    n_targets, n_tokens = ranks.sum(sum(int((m.targets != IGNORE).sum()) for m in micro),
                                    sum(m.n_tokens for m in micro))
    total = 0.0
    for i, m in enumerate(micro):
        quiet = ranks.world > 1 and i < len(micro) - 1
        with model.no_sync() if quiet else nullcontext():
            with autocast(ranks.device):
                loss = lm_loss_sum(model, m.inputs.to(ranks.device), m.targets.to(ranks.device)) / n_targets
            (loss * ranks.world).backward()
        total += loss.item()
    return ranks.sum(total)[0], int(n_tokens)


@torch.no_grad()
def evaluate(model: GPT, batches: list[MicroBatch], ranks: Ranks) -> float:
    """Mean loss per scored token over every rank's share of the held-out set."""
    model.eval()
    total, count = 0.0, 0
    for m in batches:
        with autocast(ranks.device):
            total += lm_loss_sum(model, m.inputs.to(ranks.device), m.targets.to(ranks.device)).item()
        count += int((m.targets != IGNORE).sum())
    model.train()
    total, count = ranks.sum(total, count)
    return total / count


def check_resume(out: Path, resume: bool, run: dict) -> TrainingState | None:
    """The checkpoint to continue from (with --resume), after refusing anything that would lose work."""
    state_path = out / STATE_FILE
    if not resume:
        if state_path.exists():
            raise ValueError(f"{out} already holds a training run: pass --resume to continue it, or another --out")
        return None
    if not state_path.is_file():
        raise ValueError(f"--resume: no checkpoint ({STATE_FILE}) in {out}")
    resumed = load_state(state_path)
    if resumed.run != run:
        changed = ", ".join(f"--{k.replace('_', '-')} {resumed.run.get(k)!r} -> {v!r}"
                            for k, v in run.items() if resumed.run.get(k) != v)
        raise ValueError(f"--resume: the checkpoint in {out} was made with other options ({changed})")
    return resumed


def measure_step_seconds(model: nn.Module, task: Task, step: int, ranks: Ranks) -> float:
    """Seconds per optimizer step, measured on this run's own next batches (gradients discarded)."""
    micro = next(task.steps(step))
    seconds = []
    for _ in range(PROBE_STEPS):
        started = time.perf_counter()
        _, n_tokens = accumulate_gradients(model, micro, ranks)
        seconds.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    # the last pass (the first pays one-off costs), scaled from this batch's length to the mean step's
    return ranks.from_main(seconds[-1] * task.tokens_per_step / max(1, n_tokens))


def plan_length(task: Task, args: argparse.Namespace, resumed: TrainingState | None, step_s: float,
                started: float) -> tuple[int, str]:
    """(steps the schedule is planned for, one line saying why): --max-steps, else epochs fitted to the budget."""
    if resumed is not None:
        return resumed.total, "as planned when the run started"
    if args.max_steps:
        return args.max_steps, "--max-steps"
    epochs = args.epochs or 1.0
    full = max(1, math.ceil(epochs * task.steps_per_epoch))
    if args.time_budget is None:
        return full, f"{epochs:g} epoch(s)"
    fit = max(1, int((args.time_budget - (time.monotonic() - started)) / step_s))
    if fit >= full:
        return full, f"{epochs:g} epoch(s), within the time budget"
    return fit, (f"what fits the {format_duration(args.time_budget)} time budget, out of {full} steps for "
                 f"{epochs:g} epoch(s) (about {format_duration(full * step_s)}; run without --time-budget for all)")


def run_training(task: Task, args: argparse.Namespace, run: dict, resumed: TrainingState | None,
                 ranks: Ranks, started: float) -> list[dict]:
    """Train (or continue) to the planned step or the time budget; returns the log records of the whole run.

    started: time.monotonic() when the command began; the time budget counts from it.
    """
    out: Path = args.out
    model = task.model
    model.grad_checkpoint = args.grad_checkpoint
    model.train()
    trained = DistributedDataParallel(model, device_ids=[ranks.device] if ranks.device.type == "cuda" else None) \
        if ranks.world > 1 else model
    optimizer = torch.optim.AdamW(task.params.values(), lr=args.lr, weight_decay=args.weight_decay)
    step, log = 0, []
    if resumed is not None:
        with torch.no_grad():
            for name, p in task.params.items():
                p.copy_(resumed.params[name])
        step = resumed.step
        log = [r for r in read_log(out / LOG_FILE) if r["step"] <= step]  # drop steps done after the checkpoint

    step_s = measure_step_seconds(trained, task, step, ranks)
    total, why = plan_length(task, args, resumed, step_s, started)
    total = int(ranks.from_main(total))
    warmup = args.warmup_steps if args.warmup_steps is not None else round(0.05 * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
    if resumed is not None:  # after the scheduler is made: making it resets the optimizer's learning rate
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
    say = print if ranks.main else (lambda *a, **k: None)
    global_batch = f"{ranks.world} process(es) x {args.batch_size} sequences x {args.grad_accum} micro-batch(es)"
    say(f"plan: steps {step + 1}-{total} ({why}); global batch {global_batch}; about "
        f"{task.tokens_per_step * (total - step):,.0f} tokens; measured {step_s:.2f} s per step, so about "
        f"{format_duration(step_s * (total - step))}", file=sys.stderr)

    def checkpoint() -> None:
        if ranks.main:  # the state first: if the result does not fit on the disk, --resume can still continue
            save_state(out / STATE_FILE, TrainingState(step, total, run, {k: p.detach() for k, p in task.params.items()},
                                                       optimizer.state_dict(), scheduler.state_dict()))
            task.save_result()

    def out_of_time() -> bool:
        return args.time_budget is not None and bool(ranks.from_main(time.monotonic() - started >= args.time_budget))

    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        write_log(out / LOG_FILE, log)
    log_file = (out / LOG_FILE).open("a") if ranks.main else None

    def record(entry: dict) -> None:
        log.append(entry)
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr, disable=not ranks.main)

    def note(line: str) -> None:  # tqdm.write is a class method: it would print on every rank
        if ranks.main:
            bar.write(line, file=sys.stderr)

    batches = task.steps(step)
    has_val = ranks.sum(len(task.val_batches))[0] > 0  # every rank must join each evaluation's sum
    stop = step >= total
    if stop and ranks.main:  # resumed at its end: the result may be missing (the disk filled up after the state)
        task.save_result()
    try:
        while not stop:
            step_started = time.perf_counter()
            torch.manual_seed(args.seed * 1_000_003 + ranks.rank * 7_919 + step)  # dropout: a function of the step
            loss, n_tokens = accumulate_gradients(trained, next(batches), ranks)
            torch.nn.utils.clip_grad_norm_(task.params.values(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_per_s = n_tokens / (time.perf_counter() - step_started)
            record({"step": step, "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1),
                    "elapsed_s": round(time.monotonic() - started, 3)})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            bar.update()
            stop = step >= total or out_of_time()
            if stop and step < total:
                record({"step": step, "stopped": "time budget"})
                note(f"step {step}: time budget of {format_duration(args.time_budget)} reached, stopping")
            if has_val and (step % args.eval_every == 0 or stop):
                val_loss = evaluate(model, task.val_batches, ranks)
                record({"step": step, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700))})
                note(f"step {step}: held-out loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 700)):.2f}")
            if step % args.save_every == 0 or stop:
                checkpoint()
    finally:
        bar.close()
        if log_file:
            log_file.close()
    if ranks.main:
        plot_losses(log, out / PLOT_FILE, task.title)
    return log


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_log(path: Path, log: list[dict]) -> None:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in log))
