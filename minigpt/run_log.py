"""A training run's log: log.jsonl (one JSON record per line: losses, learning rate, held-out loss, why it
stopped), and the same scalars as TensorBoard events with --log tensorboard."""
from __future__ import annotations

import json
from pathlib import Path

LOG_FILE, TENSORBOARD_DIR = "log.jsonl", "tensorboard"


class Recorder:
    """The run's log: log.jsonl (rank 0), and TensorBoard scalars with --log tensorboard."""
    SCALARS = {"loss": "loss/train", "val_loss": "loss/held_out", "lr": "lr", "tokens_per_s": "tokens_per_s"}

    def __init__(self, out: Path, log: list[dict], main: bool, tensorboard: bool):
        self.log = log
        self.file = None
        self.writer = None
        if main:
            write_log(out / LOG_FILE, log)
            self.file = (out / LOG_FILE).open("a")
            if tensorboard:
                self.writer = open_tensorboard(out / TENSORBOARD_DIR)

    def __call__(self, entry: dict) -> None:
        self.log.append(entry)
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.writer:
            for key, tag in self.SCALARS.items():
                if key in entry:
                    self.writer.add_scalar(tag, entry[key], entry["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


def open_tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--log tensorboard needs the tensorboard package (pip install -r requirements.txt)") from None
    return SummaryWriter(str(folder))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_log(path: Path, log: list[dict]) -> None:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in log))
