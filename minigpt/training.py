"""The training loop shared by LoRA fine-tuning (python -m lora.train) and pre-training (python -m minigpt.pretrain).

A caller builds a `Task` (the model, the tensors to train, its batches, how to save the result) and
hands it to `run_training`, which owns everything else: AdamW with warm-up and cosine decay (in
segments, so a finished run can be extended), gradient accumulation, clipping, capped held-out
evaluation with the best output kept, atomic checkpoints and --resume, the plan printed before the
first step with every cost measured, the time budget, a checkpoint on Ctrl-C or SIGTERM, and
data-parallel training under torchrun.

One step, however split: each optimizer step reads one global batch (processes x batch x
accumulation), cut into micro-batches and each process's share (`micro_rows`). The loss of each
micro-batch is divided by the number of scored tokens in the whole step, and dropout masks are keyed
by each example's place in the step (minigpt.dropout), so N ranks of batch B, one process of batch
N x B and batch B x accumulation N all train the same weights. Under torchrun
(`--nproc_per_node N`) DistributedDataParallel sums the gradients; only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
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
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from .atomic import DiskFull, is_disk_full
from .cli import INTERRUPTED
from .dropout import example_keys, set_example_keys
from .errors import CheckpointError
from .model import GPT
from .plan import EVAL_SHARE, RunCosts, fit_steps
from .plot import plot_losses
from .run_lock import only_run_in
from .run_log import LOG_FILE, Recorder, read_log
from .schedule import Schedule
from .train_state import STATE_FILE, TrainingState, load_state, save_state
from .weights import resolve_device

IGNORE = -100  # F.cross_entropy's default ignore_index: targets that are not scored
PLOT_FILE, BEST_DIR = "loss.png", "best"
PROBE_STEPS = 2  # forward + backward passes timed for the plan's estimate; the last one's gradients are kept
CHECKPOINT_FACTOR = 4  # a checkpoint writes the output, then the trained tensors again and AdamW's two moments


@dataclass
class MicroBatch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next-token ids, IGNORE where not scored (prompt, padding)
    n_tokens: int  # real tokens read (padding excluded), for tokens/s
    positions: list[int]  # each row's place in its step's global batch: the key of its dropout masks


@dataclass
class Task:
    """What is trained, on what, and what a finished (or checkpointed) run leaves behind."""
    model: GPT
    params: dict[str, nn.Parameter]  # the trained tensors by name: what checkpoints hold
    steps: Callable[[int], Iterator[list[MicroBatch]]]  # from a step on: this rank's micro-batches, step by step
    val_batches: Callable[[int], list[MicroBatch]]  # this rank's share of the first n held-out examples
    val_size: int  # held-out examples (pre-training: windows) available
    val_tokens: float  # mean tokens per held-out example
    steps_per_epoch: int
    tokens_per_step: float  # mean tokens read per optimizer step, all ranks together
    save_result: Callable[[Path], None]  # write the usable output (adapter, model folder) into a folder
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

    def barrier(self) -> None:
        """Wait here until every rank arrives (rank 0 writing a file the others then read)."""
        if self.world > 1:
            dist.barrier()

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


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run after a step; its checkpoint is written."""

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


def train_cli(train: Callable[[argparse.Namespace, Ranks, float], object], args: argparse.Namespace,
              started: float) -> int:
    """What both training commands do around `train(args, ranks, started)`: join the torchrun job (or run
    alone) and leave it; a bad option, file or checkpoint, a full disk or an --out another run is using is one
    `error:` line and status 2; Ctrl-C or SIGTERM during training writes a checkpoint, says how to go on,
    status 130. Only rank 0 prints."""
    ranks = None
    try:
        ranks = start_ranks(args.device)
        with only_run_in(args.out) if ranks.main else nullcontext():
            train(args, ranks, started)
    except (CheckpointError, ValueError) as e:
        if ranks is None or ranks.main:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if ranks is None or ranks.main:
            print(f"\ninterrupted at step {e.step}, checkpoint written; continue with --resume --out {args.out}",
                  file=sys.stderr)
        return INTERRUPTED
    except OSError as e:
        if not is_disk_full(e):
            raise
        if ranks is None or ranks.main:  # every write is atomic: the last checkpoint is whole
            go_on = (f"continue from the last checkpoint with --resume --out {args.out}"
                     if (args.out / STATE_FILE).is_file() else "run again (no checkpoint was written yet)")
            full = e if isinstance(e, DiskFull) else f"the disk is full ({e.strerror})"
            print(f"error: {full}; nothing half-written was kept: free some space, then {go_on}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        saved = (args.out / STATE_FILE).is_file()
        if ranks is None or ranks.main:
            print("\ninterrupted; " + (f"continue from the last checkpoint with --resume --out {args.out}" if saved
                                        else "no checkpoint was written yet"), file=sys.stderr)
        return INTERRUPTED
    finally:
        if ranks is not None:
            stop_ranks(ranks)
    return 0


def add_training_arguments(p: argparse.ArgumentParser, *, batch_size: int, lr: float | None, eval_every: int) -> None:
    """The options of the shared loop, for both training commands."""
    p.add_argument("--epochs", type=float, default=None, help="length of the run in epochs (1)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--time-budget", type=parse_duration, default=None, metavar="DURATION",
                   help="end the whole command within this long (90s, 20m, 1.5h), fitting the LR schedule to it")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay, on weight matrices only (not biases or LayerNorm)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("BETA1", "BETA2"),
                   help="AdamW betas (nanoGPT uses 0.9 0.95)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="sequences per micro-batch, per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--eval-every", type=int, default=eval_every,
                   help="held-out evaluation every N steps (and at the end)")
    p.add_argument("--eval-examples", type=int, default=None,
                   help="held-out examples per evaluation (default: as many as keep evaluation within "
                        f"{EVAL_SHARE:.0%}% of the training time; printed)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many evaluations without a better held-out loss")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, ~1/3 more compute")
    p.add_argument("--log", choices=["tensorboard"], default=None,
                   help="also write TensorBoard scalars into OUT/tensorboard")
    p.add_argument("--resume", action="store_true",
                   help="continue the run checkpointed in --out (with a larger --max-steps, --epochs or "
                        "--time-budget: extend it)")


LOOP_POSITIVE = ["epochs", "max_steps", "batch_size", "grad_accum", "eval_every", "eval_examples", "patience",
                 "save_every", "max_grad_norm"]  # the shared options that must be > 0


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


def process_started() -> float:
    """time.monotonic() when this process started, so that a --time-budget also covers Python's start and imports
    (Linux: from /proc; elsewhere, now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def micro_rows(n_rows: int, ranks: Ranks, batch_size: int, grad_accum: int) -> list[range]:
    """The rows of a step's global batch (n_rows, up to processes x batch_size x grad_accum) that this rank
    reads, micro-batch by micro-batch. A step's rows are the same however they are split, so N processes x
    batch B x accumulation k train like one process with one micro-batch of N x B x k."""
    per_micro = ranks.world * batch_size
    return [range(min(n_rows, m * per_micro + ranks.rank * batch_size),
                  min(n_rows, m * per_micro + (ranks.rank + 1) * batch_size)) for m in range(grad_accum)]


def lm_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the scored (non-IGNORE) targets."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def accumulate_gradients(model: nn.Module, micro: list[MicroBatch], ranks: Ranks, seed: int = 0,
                         step: int = 0) -> tuple[float, int]:
    """Backpropagate the mean loss over every scored token of the global step; return it and the tokens read.

    Weighting by tokens, not by micro-batch or rank, makes the gradient the same as one big batch's.
    DDP averages gradients over ranks, hence the factor ranks.world. Only the last micro-batch
    synchronises gradients across ranks. Dropout masks are keyed by (seed, step, row position).
    """
    n_targets, n_tokens = ranks.sum(sum(int((m.targets != IGNORE).sum()) for m in micro),
                                    sum(m.n_tokens for m in micro))
    total = 0.0
    for i, m in enumerate(micro):
        quiet = ranks.world > 1 and i < len(micro) - 1
        set_example_keys(model, example_keys(seed, step, m.positions))
        with model.no_sync() if quiet else nullcontext():
            with autocast(ranks.device):
                loss = lm_loss_sum(model, m.inputs.to(ranks.device), m.targets.to(ranks.device)) / n_targets
            (loss * ranks.world).backward()
        total += loss.item()
    set_example_keys(model, None)
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


def make_optimizer(params: dict[str, nn.Parameter], args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (Linear weights, embeddings) only, nanoGPT's rule: decaying biases
    and LayerNorm gains towards 0 only fights their job."""
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=tuple(args.betas))


def check_resume(out: Path, resume: bool, run: dict) -> TrainingState | None:
    """The checkpoint to continue from (with --resume), after refusing anything that would lose work."""
    state_path = out / STATE_FILE
    if not resume:
        if state_path.exists():
            raise ValueError(f"{out} already holds a training run: pass --resume to continue (or extend) it, "
                             "or another --out")
        return None
    if not state_path.is_file():
        raise ValueError(f"--resume: no checkpoint ({STATE_FILE}) in {out}")
    resumed = load_state(state_path)
    changed = ", ".join(f"--{k.replace('_', '-')} {resumed.run[k]!r} -> {v!r}"
                        for k, v in run.items() if k in resumed.run and resumed.run[k] != v)
    if changed:
        raise ValueError(f"--resume: the checkpoint in {out} was made with other options ({changed})")
    return resumed


def measure_costs(model: nn.Module, task: Task, step: int, ranks: Ranks, args: argparse.Namespace,
                  log: list[dict]) -> tuple[RunCosts, tuple[float, int, float]]:
    """Seconds per optimizer step, per held-out example, per checkpoint and for the plot, each measured on this
    run's own batches and files; and (loss, tokens, seconds) of the next step's gradients, which the last timed
    pass leaves in place for that step to use (the first pass pays one-off costs and is discarded)."""
    micro = next(task.steps(step))
    for _ in range(PROBE_STEPS):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        loss, n_tokens = accumulate_gradients(model, micro, ranks, args.seed, step)
        seconds = time.perf_counter() - started
    step_s = seconds * task.tokens_per_step / max(1, n_tokens)  # scaled from this batch's length to the mean step's
    eval_s = 0.0
    sample = task.val_batches(min(args.batch_size * ranks.world, task.val_size))[:1]
    if sample:
        task.model.eval()
        with torch.no_grad(), autocast(ranks.device):
            for _ in range(PROBE_STEPS):  # what evaluate() does: the forward pass and the loss over the vocabulary
                started = time.perf_counter()
                lm_loss_sum(task.model, sample[0].inputs.to(ranks.device), sample[0].targets.to(ranks.device)).item()
                eval_s = time.perf_counter() - started
        task.model.train()
        eval_s *= task.val_tokens / max(1, sample[0].n_tokens)  # per example of the mean held-out length
    save_s = plot_s = 0.0
    if ranks.main:
        save_s = CHECKPOINT_FACTOR * seconds_to_write(task.params, args.out)
        probe = args.out / f".plot-probe-{os.getpid()}.png"
        started = time.perf_counter()
        try:
            plot_losses(log, probe, task.title)
            plot_s = time.perf_counter() - started
        finally:
            probe.unlink(missing_ok=True)
    return RunCosts(*(ranks.from_main(v) for v in (step_s, eval_s, save_s, plot_s))), (loss, n_tokens, seconds)


def seconds_to_write(params: dict[str, nn.Parameter], folder: Path) -> float:
    """Seconds to write the trained tensors to a file in folder and fsync it (the file is then removed); 0 where
    the disk has no room for them: the first checkpoint will say so."""
    probe = folder / f".write-probe-{os.getpid()}.safetensors"
    started = time.perf_counter()
    try:
        save_file({k: p.detach().contiguous() for k, p in params.items()}, probe)
        with open(probe, "rb+") as f:
            os.fsync(f.fileno())
        return time.perf_counter() - started
    except (OSError, SafetensorError) as e:
        if not is_disk_full(e):
            raise
        return 0.0
    finally:
        probe.unlink(missing_ok=True)


def requested_steps(task: Task, args: argparse.Namespace) -> tuple[int | None, str]:
    if args.max_steps:
        return args.max_steps, "--max-steps"
    if args.epochs:
        return max(1, math.ceil(args.epochs * task.steps_per_epoch)), f"{args.epochs:g} epoch(s)"
    return None, ""


@dataclass
class Plan:
    schedule: Schedule
    eval_examples: int
    why: str  # why the run is this long, in words


def make_plan(task: Task, args: argparse.Namespace, resumed: TrainingState | None, costs: RunCosts,
              started: float) -> Plan:
    """The schedule (a new run's, a resumed one's, or one extended by a new segment), and the held-out examples
    per evaluation, both fitted to the time budget where there is one."""
    step = resumed.step if resumed else 0
    available = task.val_size

    def eval_examples(end: int) -> int:
        if args.eval_examples:
            return min(args.eval_examples, available)
        if resumed and resumed.evaluation.get("examples"):  # keep the held-out curve comparable
            return min(resumed.evaluation["examples"], available)
        return costs.default_eval_examples(step, end, args.eval_every, available, min(available, args.batch_size))

    def seconds(end: int) -> float:
        return costs.seconds(step, end, args.eval_every, args.save_every, eval_examples(end)).total

    def fitted(upper: int) -> int:  # the last step that fits the budget, if below `upper`
        if args.time_budget is None:
            return upper
        return step + fit_steps(lambda n: seconds(step + n), args.time_budget - (time.monotonic() - started),
                                upper - step)

    wanted, wanted_why = requested_steps(task, args)
    budget = f"the {format_duration(args.time_budget)} time budget" if args.time_budget else ""
    if resumed is None:
        full, why = (wanted, wanted_why) if wanted else (task.steps_per_epoch, "1 epoch(s)")
        end = fitted(full)
        if end < full:
            why = (f"what fits {budget}, out of {full} steps for {why} (about {format_duration(seconds(full))}; "
                   "run without --time-budget for all)")
        elif budget:
            why += ", within the time budget"
        schedule = Schedule.new(end, args.warmup_steps)
    elif wanted is not None and wanted != resumed.schedule.total:
        if wanted <= step:
            raise ValueError(f"--resume: the run in {args.out} is at step {step} already; to extend it ask for more "
                             f"than {step} steps")
        end = fitted(wanted)
        why = f"extending the run to step {wanted} ({wanted_why})" + (f", cut to what fits {budget}"
                                                                      if end < wanted else "")
        schedule = resumed.schedule.extended(step, end, args.warmup_steps)
    elif step < resumed.schedule.total:
        schedule, why = resumed.schedule, "as planned when the run started"
    elif args.time_budget is not None:
        schedule = resumed.schedule.extended(step, fitted(step + 10 ** 9), args.warmup_steps)
        why = f"extending the run by what fits {budget}"
    else:
        raise ValueError(f"the run in {args.out} is finished (step {step} of {step}): to train on, pass --resume with "
                         "a larger --max-steps or --epochs, or a --time-budget")
    return Plan(schedule, eval_examples(schedule.total), why)


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM during training ask the loop to stop after the current step and write a
    checkpoint; a second one stops at once (KeyboardInterrupt), losing only the steps since the last one."""

    def __init__(self, note: Callable[[str], None]):
        self.requested = False
        self.note = note
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.note("stopping after this step to write a checkpoint (Ctrl-C again to quit at once)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_training(task: Task, args: argparse.Namespace, run: dict, resumed: TrainingState | None,
                 ranks: Ranks, started: float) -> list[dict]:
    """Train (or continue, or extend) to the planned step or the time budget; returns the whole run's log records.

    started: time.monotonic() when the command began; the time budget counts from it and covers everything
    after it: loading, the measurements, steps, evaluations, checkpoints and the plot.
    """
    out: Path = args.out
    model = task.model
    model.grad_checkpoint = args.grad_checkpoint
    model.train()
    trained = DistributedDataParallel(model, device_ids=[ranks.device] if ranks.device.type == "cuda" else None) \
        if ranks.world > 1 else model
    optimizer = make_optimizer(task.params, args)
    step, log, evaluation = 0, [], {}
    if resumed is not None:
        with torch.no_grad():
            for name, p in task.params.items():
                p.copy_(resumed.params[name])
        optimizer.load_state_dict(resumed.optimizer)
        step, evaluation = resumed.step, dict(resumed.evaluation)
        log = [r for r in read_log(out / LOG_FILE) if r["step"] <= step]  # drop steps done after the checkpoint
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)

    if resumed is not None and step >= resumed.schedule.total and ranks.main:
        task.save_result(out)  # resumed at its end: the result may be missing (the disk filled up after the state)
    costs, measured_step = measure_costs(trained, task, step, ranks, args, log)  # its gradients: the next step's
    plan = make_plan(task, args, resumed, costs, started)
    schedule, end = plan.schedule, int(ranks.from_main(plan.schedule.total))
    evaluation["examples"] = n_eval = int(ranks.from_main(plan.eval_examples))
    val_batches = task.val_batches(n_eval)
    parts = costs.seconds(step, end, args.eval_every, args.save_every, n_eval)
    global_batch = f"{ranks.world} process(es) x {args.batch_size} sequences x {args.grad_accum} micro-batch(es)"
    ranks.say(f"plan: steps {step + 1}-{end} ({plan.why}); global batch {global_batch}; about "
              f"{task.tokens_per_step * (end - step):,.0f} tokens; measured {costs.step_s:.2f} s per step; about "
              f"{format_duration(parts.total)} in all: training {format_duration(parts.training)}, evaluation "
              f"{format_duration(parts.evaluation)} ({parts.n_evals} x {n_eval} held-out examples), checkpoints "
              f"{format_duration(parts.saving)} ({parts.n_saves}), plot {format_duration(parts.plot)}; "
              f"{schedule.describe(step, args.lr)}")
    left = args.time_budget - (time.monotonic() - started) if args.time_budget else math.inf
    if parts.total > left:
        ranks.say(f"note: loading and measuring left {format_duration(max(0.0, left))} of the time budget, less than "
                  f"one step and the final evaluation and checkpoint need: the run saves what it has and exits; give "
                  f"it a larger --time-budget")
    if task.val_size:
        ranks.say(f"evaluation: {n_eval} of {task.val_size} held-out examples each time" +
                  (" (--eval-examples)" if args.eval_examples else
                   f" (default: evaluation within {EVAL_SHARE:.0%} of the training time; --eval-examples to change)"))

    recorder = Recorder(out, log, ranks.main, args.log == "tensorboard")
    bar = tqdm(total=end, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr, disable=not ranks.main)

    def note(line: str) -> None:  # tqdm.write is a class method: it would print on every rank
        if ranks.main:
            bar.write(line, file=sys.stderr)

    saved_at = evaluated_at = None
    step_seconds: list[float] = []

    def checkpoint() -> None:
        nonlocal saved_at
        began = time.perf_counter()
        if ranks.main:  # the state first: if the result does not fit on the disk, --resume can still continue
            save_state(out / STATE_FILE, TrainingState(step, schedule, run,
                                                       {k: p.detach() for k, p in task.params.items()},
                                                       optimizer.state_dict(), evaluation))
            task.save_result(out)
        costs.save_s = time.perf_counter() - began
        saved_at = step

    def held_out() -> None:
        nonlocal evaluated_at
        began = time.perf_counter()
        val_loss = evaluate(model, val_batches, ranks)
        costs.eval_example_s = (time.perf_counter() - began) / max(1, n_eval)
        entry = {"step": step, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700)),
                 "eval_s": round(time.perf_counter() - began, 3)}
        if val_loss < evaluation.get("best_loss", math.inf):
            evaluation.update(best_loss=val_loss, best_step=step, since_best=0)
            entry["best"] = True
            if ranks.main:
                task.save_result(out / BEST_DIR)
        else:
            evaluation["since_best"] += 1
        recorder(entry)
        note(f"step {step}: held-out loss {val_loss:.4f}, perplexity {entry['val_perplexity']:.2f}"
             + (" (best so far)" if "best" in entry else ""))
        evaluated_at = step

    def no_time_for_a_step() -> bool:
        """Would one more step, then the final evaluation, checkpoint and plot, overrun the budget?"""
        if args.time_budget is None:
            return False
        step_s = max(step_seconds, default=costs.step_s)  # the slowest so far: a busy machine's steps vary
        best_copy = costs.save_s / CHECKPOINT_FACTOR if has_val else 0.0  # the final evaluation may be the best
        finish = step_s + n_eval * costs.eval_example_s + costs.save_s + best_copy + costs.plot_s
        return time.monotonic() - started + finish > args.time_budget

    has_val = n_eval > 0
    interrupted = False
    try:
        with StopSignals(note) as signals:
            batches = task.steps(step)
            while step < end:
                asked, late = ranks.sum(float(signals.requested), float(ranks.main and no_time_for_a_step()))
                if asked:
                    interrupted = True
                    recorder({"step": step, "stopped": "interrupted"})
                    break
                if late:
                    recorder({"step": step, "stopped": "time budget"})
                    note(f"step {step}: stopping within the {format_duration(args.time_budget)} time budget "
                         "(time left for the final evaluation and checkpoint)")
                    break
                began = time.perf_counter()
                micro = next(batches)
                if measured_step is not None:  # the measurement's last pass computed this step's gradients
                    (loss, n_tokens, seconds), measured_step = measured_step, None
                    began -= seconds
                else:
                    loss, n_tokens = accumulate_gradients(trained, micro, ranks, args.seed, step)
                torch.nn.utils.clip_grad_norm_(task.params.values(), args.max_grad_norm)
                lr = args.lr * schedule.factor(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_seconds.append(time.perf_counter() - began)
                tokens_per_s = n_tokens / step_seconds[-1]
                recorder({"step": step, "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1),
                          "elapsed_s": round(time.monotonic() - started, 3)})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
                bar.update()
                if has_val and step % args.eval_every == 0:
                    held_out()
                    if args.patience and evaluation["since_best"] >= args.patience:
                        recorder({"step": step, "stopped": f"no better held-out loss in {args.patience} evaluations"})
                        note(f"step {step}: no better held-out loss in {args.patience} evaluations (--patience), "
                             f"stopping; the best (step {evaluation['best_step']}) is in {out / BEST_DIR}")
                        break
                if step % args.save_every == 0:
                    checkpoint()
            if has_val and evaluated_at != step and not interrupted:
                held_out()
            if saved_at != step:
                checkpoint()
    finally:
        bar.close()
        recorder.close()
    if interrupted:
        raise Interrupted(step)
    if ranks.main:
        plot_losses(log, out / PLOT_FILE, task.title)
    return log
