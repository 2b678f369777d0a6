"""The loss-curve PNG written next to a training run's output."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the headless backend)


def plot_losses(log: list[dict], path: Path, title: str) -> None:
    """Training loss per step and held-out loss at each evaluation, from the JSONL log's records."""
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out", linewidth=1.5)
    ax.set(xlabel="optimizer step", ylabel="loss (nats per scored token)", title=title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.savefig(path, dpi=120)
