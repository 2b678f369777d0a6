"""Speed and memory of one LoRA training step: MiniGPT vs transformers + peft, or MiniGPT with and without
gradient checkpointing; same shape, same batch, same run.

    python -m bench.train_step                         # GPT-2 124M shape, random weights, batch 4 x 128 tokens
    python -m bench.train_step --batch-size 8 --seq-len 256 --reps 20
    python -m bench.train_step --threads 1             # steadiest on a busy shared CPU (compare CPU seconds)
    python -m bench.train_step --compare checkpointing --shape gpt2-medium   # --grad-checkpoint's cost and saving

A step is forward, masked cross-entropy (the first half of each row is "prompt", ignored), backward,
AdamW on the LoRA parameters, zero_grad: rank 8 on c_attn, LoRA dropout 0.05, the base's own
dropout off on both sides (MiniGPT has none). bf16 autocast on CUDA for both.
Timing runs both sides in one process, alternating step by step (A B B A ...), so load from other
work on the machine hits both alike; peak memory comes from a separate process per side (CUDA: max
allocated; CPU: peak RSS of the process). Reports median step time, tokens/s, the MiniGPT/peft
ratio (of medians, the median of per-rep ratios, and of the best steps), and the CPU seconds each
step used. On a shared CPU, wall time swings with other load; CPU time with --threads 1 barely
does, so `--threads 1` gives the steadiest comparison there. Writes bench/results/train_step-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tests.helpers import REPO as ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
COMPARISONS = {"peft": ("minigpt", "peft"), "checkpointing": ("minigpt", "minigpt-checkpointed")}


def build(side: str, device: torch.device, args: argparse.Namespace):
    """(step function taking (inputs, labels), model) for one side, weights random, LoRA injected."""
    torch.manual_seed(0)
    from minigpt import GPTConfig
    shape = GPTConfig.from_name(args.shape)
    if side.startswith("minigpt"):
        from lora import inject_lora, lora_parameters
        from minigpt import GPT
        from minigpt.training import lm_loss_sum
        model = GPT(shape).to(device)
        model.grad_checkpoint = side == "minigpt-checkpointed"
        for module in model.modules():  # GPT-2's init, as transformers does it on the other side
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        inject_lora(model, ["c_attn"], args.rank, 2 * args.rank, dropout=0.05)
        params = list(lora_parameters(model).values())

        def loss_fn(inputs, labels):  # labels aligned with inputs, as in transformers: shift here
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
            return lm_loss_sum(model, inputs, targets) / (targets != -100).sum()
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2Config, GPT2LMHeadModel
        config = GPT2Config(n_embd=shape.n_embd, n_layer=shape.n_layer, n_head=shape.n_head,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05, target_modules=["c_attn"],
            fan_in_fan_out=True)).to(device)
        params = [p for p in model.parameters() if p.requires_grad]

        def loss_fn(inputs, labels):
            return model(input_ids=inputs, labels=labels).loss
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(inputs, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(inputs, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params)


def batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and transformers-style labels with the first half of each row ignored."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 50257, (args.batch_size, args.seq_len), generator=gen).to(device)
    labels = inputs.clone()
    labels[:, :args.seq_len // 2] = -100
    return inputs, labels


def timed(step, inputs, labels, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one step."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step(inputs, labels)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(args: argparse.Namespace) -> dict:
    """Both sides in this process, steps alternating (ABBA...), so machine noise hits both alike."""
    device = torch.device(args.device)
    sides = COMPARISONS[args.compare]
    steps = {side: build(side, device, args) for side in sides}
    inputs, labels = batch(args, device)
    times = {side: [] for side in sides}
    for i in range(args.warmup + args.reps):
        for side in sides if i % 2 == 0 else sides[::-1]:
            t = timed(steps[side][0], inputs, labels, device)
            if i >= args.warmup:
                times[side].append(t)
        if i >= args.warmup:
            print(f"rep {i - args.warmup + 1}: " + ", ".join(
                f"{s} {times[s][-1][0]:.3f} s (cpu {times[s][-1][1]:.3f} s)" for s in sides), file=sys.stderr)
    return {side: {"step_s": [t[0] for t in times[side]], "cpu_s": [t[1] for t in times[side]],
                   "trainable_parameters": steps[side][1]} for side in sides}


def measure_memory(side: str, args: argparse.Namespace) -> dict:
    """Peak memory of one side alone (run in its own process): two training steps after building it."""
    device = torch.device(args.device)
    step, _ = build(side, device, args)
    inputs, labels = batch(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        timed(step, inputs, labels, device)
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "CUDA max allocated"}
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "kind": "process peak RSS"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--reps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compare", choices=COMPARISONS, default="peft", help="what MiniGPT is measured against")
    p.add_argument("--shape", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"], default="gpt2")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one side's memory
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args)))
        return

    memory = {}
    sides = COMPARISONS[args.compare]
    first, second = sides
    for side in sides:
        done = subprocess.run([sys.executable, "-m", "bench.train_step", "--memory-of", side, *sys.argv[1:]], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        memory[side] = json.loads(done.stdout.strip().splitlines()[-1])
    speed = measure_speed(args)
    tokens = args.batch_size * args.seq_len
    summary = {side: {"median_step_s": statistics.median(speed[side]["step_s"]),
                      "min_step_s": min(speed[side]["step_s"]),
                      "median_cpu_s": statistics.median(speed[side]["cpu_s"]),
                      "tokens_per_s": tokens / statistics.median(speed[side]["step_s"]),
                      "trainable_parameters": speed[side]["trainable_parameters"],
                      "peak_memory_mb": round(memory[side]["peak_mb"], 1), "peak_memory_kind": memory[side]["kind"]}
               for side in sides}
    pair_ratios = [b / a for a, b in zip(speed[first]["step_s"], speed[second]["step_s"])]
    report = {"benchmark": f"one LoRA training step, {args.shape} shape (random weights), {first} vs {second}",
              "command": " ".join(["python", "bench/train_step.py", *sys.argv[1:]]),
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"device": args.device, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "load_average": os.getloadavg(),
                          "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
              "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank, "targets": ["c_attn"],
              "reps": args.reps, "warmup": args.warmup, "results": summary,
              f"{first}_over_{second}_tokens_per_s": summary[first]["tokens_per_s"] / summary[second]["tokens_per_s"],
              "median_paired_ratio": statistics.median(pair_ratios),
              "best_step_ratio": summary[second]["min_step_s"] / summary[first]["min_step_s"],
              "cpu_time_ratio": summary[second]["median_cpu_s"] / summary[first]["median_cpu_s"],
              "threads": torch.get_num_threads(), "raw": speed}
    out = args.out or ROOT / "bench" / "results" / f"train_step-{datetime.now():%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for side, s in summary.items():
        print(f"{side:20s} {s['tokens_per_s']:9.1f} tokens/s  median step {s['median_step_s']:.3f} s  "
              f"best {s['min_step_s']:.3f} s  cpu {s['median_cpu_s']:.3f} s  "
              f"peak {s['peak_memory_mb']:.0f} MB ({s['peak_memory_kind']})")
    print(f"{first} / {second} tokens/s: {report[f'{first}_over_{second}_tokens_per_s']:.3f} (median of paired reps "
          f"{report['median_paired_ratio']:.3f}, of best steps {report['best_step_ratio']:.3f}); {second} / {first} "
          f"CPU seconds per step: {report['cpu_time_ratio']:.3f}  -> {out}")


if __name__ == "__main__":
    main()
