"""The learning-rate schedule: one or more segments, each warm-up then cosine decay to 0.

A run starts with one segment. Extending a run (--resume with a larger --max-steps, --epochs or
--time-budget) appends a segment at the checkpoint's step: where the learning rate had not reached 0,
the new segment continues the cosine from its current value to 0 at the new end (no jump); where it
had (a finished run), it warms up again to the peak and decays to 0 at the new end, like a warm
restart (SGDR). The segments are stored in the checkpoint, so a resumed run follows them exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Segment:
    start: int  # first step of the segment (steps counted from 0)
    end: int  # the step at which the learning rate reaches 0
    warmup: int  # linear warm-up steps at the segment's start (0: none)
    peak: float = 1.0  # the multiplier the cosine starts from (below 1 where it continues an earlier cosine)

    def factor(self, step: int) -> float:
        """LR multiplier: linear from 1/warmup to 1 over `warmup` steps, then cosine from `peak` to 0 at `end`."""
        at = step - self.start
        if at < self.warmup:
            return (at + 1) / self.warmup
        progress = (at - self.warmup) / max(1, self.end - self.start - self.warmup)
        return self.peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Schedule:
    segments: tuple[Segment, ...]

    @classmethod
    def new(cls, total: int, warmup: int | None) -> "Schedule":
        return cls((Segment(0, total, default_warmup(total) if warmup is None else warmup),))

    @property
    def total(self) -> int:
        return self.segments[-1].end

    def factor(self, step: int) -> float:
        return next(s for s in reversed(self.segments) if s.start <= step).factor(step)

    def extended(self, step: int, end: int, warmup: int | None) -> "Schedule":
        """A new segment from `step` to `end`: the cosine continued from its current value, or, where it had
        reached 0, a fresh warm-up (`warmup` steps; default 5% of the segment) and cosine."""
        now = self.factor(step) if step < self.total else 0.0
        if now > 0:
            segment = Segment(step, end, 0, now)
        else:
            segment = Segment(step, end, default_warmup(end - step) if warmup is None else warmup)
        return Schedule(tuple(s for s in self.segments if s.start < step) + (segment,))

    def describe(self, step: int, peak_lr: float) -> str:
        """What the learning rate does from `step` on, in words, for the plan line."""
        s = next(s for s in reversed(self.segments) if s.start <= step)
        if step >= s.end:
            return "lr 0 (the schedule has ended)"
        if s.peak < 1:
            return f"lr continues its cosine from {peak_lr * s.factor(step):.3g} to 0 at step {s.end}"
        warm = f"warm-up over {s.warmup} steps to {peak_lr:.3g}" if step - s.start < s.warmup else \
            f"at {peak_lr * s.factor(step):.3g}"
        again = " again (a new segment after the finished run)" if s.start > 0 and step == s.start else ""
        return f"lr {warm}{again}, then cosine to 0 at step {s.end}"

    def to_json(self) -> list[dict]:
        return [asdict(s) for s in self.segments]

    @classmethod
    def from_json(cls, segments: list[dict]) -> "Schedule":
        return cls(tuple(Segment(**s) for s in segments))


def default_warmup(steps: int) -> int:
    return round(0.05 * steps)
