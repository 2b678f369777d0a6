"""Alpaca records -> token sequences with masked labels -> padded, length-grouped batches.

A sequence is prompt tokens + response tokens + <|endoftext|>. The model reads ids[:-1] and is
scored on ids[1:], but only where the target is a response token: prompt targets are IGNORE.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import tiktoken
import torch

from minigpt.tokenizer import EOT_ID
from minigpt.training import IGNORE, MicroBatch

from .alpaca import Record


@dataclass(frozen=True)
class Example:
    ids: list[int]
    n_prompt: int  # the first n_prompt ids are the prompt; the rest is the response

    def inputs_and_targets(self) -> tuple[list[int], list[int]]:
        targets = [IGNORE] * (self.n_prompt - 1) + self.ids[self.n_prompt:]
        return self.ids[:-1], targets


@dataclass
class TokenizeReport:
    kept: int = 0
    truncated: int = 0  # response cut at max_len (its end, including <|endoftext|>, is not learned)
    dropped: int = 0  # the prompt alone leaves no room for a response token

    def __str__(self) -> str:
        return (f"{self.kept} examples kept, {self.truncated} with the response truncated at --max-len, "
                f"{self.dropped} dropped (prompt alone fills --max-len)")


def tokenize(records: Sequence[Record], tokenizer: tiktoken.Encoding,
             max_len: int) -> tuple[list[Example], TokenizeReport]:
    """Token sequences of at most max_len tokens; never drops a response without counting it."""
    if max_len < 2:
        raise ValueError(f"--max-len must be at least 2, got {max_len}")
    examples, report = [], TokenizeReport()
    for record in records:
        prompt = tokenizer.encode_ordinary(record.prompt)
        response = tokenizer.encode_ordinary(record.output) + [EOT_ID]
        if len(prompt) >= max_len:
            report.dropped += 1
            continue
        if len(prompt) + len(response) > max_len:
            report.truncated += 1
            response = response[:max_len - len(prompt)]
        examples.append(Example(prompt + response, len(prompt)))
    report.kept = len(examples)
    return examples, report


def split(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded shuffle, then the first round(val_fraction * n) (at least 1 if asked for) are val."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(order))) if val_fraction > 0 and len(order) > 1 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T) with T the longest in the batch; padding has target IGNORE."""
    pairs = [e.inputs_and_targets() for e in examples]
    width = max(len(inputs) for inputs, _ in pairs)
    inputs = torch.full((len(pairs), width), EOT_ID, dtype=torch.long)
    targets = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        inputs[row, :len(x)] = torch.tensor(x)
        targets[row, :len(y)] = torch.tensor(y)
    return inputs, targets


def epoch_batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int,
                  group: int = 32) -> list[list[Example]]:
    """One epoch's batches, a pure function of (seed, epoch) so a resumed run sees the same ones.

    Length grouping: shuffle, sort each window of `group` batches by length (little padding), then
    shuffle the batch order so lengths do not run from short to long.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    window = batch_size * group
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i].ids))
        batches += [[examples[i] for i in chunk[j:j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_stream(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Batches forever, epoch after epoch."""
    epoch = 0
    while True:
        yield from epoch_batches(examples, batch_size, seed, epoch)
        epoch += 1


# A micro-batch left empty by a short last batch still joins the step: one padding token, nothing scored.
NOTHING = Example([EOT_ID, EOT_ID], n_prompt=2)


def micro_batch(examples: Sequence[Example], positions: list[int]) -> MicroBatch:
    """Padded tensors for the examples; `positions`: their places in the step's global batch (dropout keys)."""
    if not examples:
        examples, positions = [NOTHING], [0]
    inputs, targets = collate(examples)
    return MicroBatch(inputs, targets, n_tokens=sum(len(e.ids) - 1 for e in examples), positions=positions)


def eval_batches(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    ordered = sorted(examples, key=lambda e: len(e.ids))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
