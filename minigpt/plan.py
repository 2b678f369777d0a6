"""What a training run will cost, from measured parts: steps, held-out evaluations, checkpoints and the plot.

The plan printed before the first step, the number of steps that fit a --time-budget, and the default
size of the held-out evaluation all come from `RunCosts`: seconds per optimizer step, per held-out
example, per checkpoint and for the loss plot, each measured on this run's own model and data.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

EVAL_SHARE = 0.10  # the default --eval-examples keeps evaluation within this share of the training time


@dataclass
class RunCosts:
    step_s: float  # one optimizer step
    eval_example_s: float  # one held-out example (or window), forward only
    save_s: float  # one checkpoint (the output, the training state, the best copy)
    plot_s: float  # the loss plot at the end

    def evaluations(self, start: int, end: int, every: int, has_val: bool) -> int:
        """Held-out evaluations between steps start and end: every `every` steps, and at the end."""
        if not has_val or end <= start:
            return 0
        return end // every - start // every + (end % every != 0)

    def saves(self, start: int, end: int, every: int) -> int:
        return 0 if end <= start else end // every - start // every + (end % every != 0)

    def default_eval_examples(self, start: int, end: int, every: int, available: int, floor: int) -> int:
        """Held-out examples per evaluation such that evaluating costs at most EVAL_SHARE of the training time
        (but at least `floor`, one micro-batch, so the held-out loss means something)."""
        n_evals = self.evaluations(start, end, every, available > 0)
        if n_evals == 0:
            return 0
        fits = int(EVAL_SHARE * (end - start) * self.step_s / (n_evals * max(self.eval_example_s, 1e-9)))
        return min(available, max(floor, fits))

    def seconds(self, start: int, end: int, eval_every: int, save_every: int, eval_examples: int) -> "Breakdown":
        n_evals = self.evaluations(start, end, eval_every, eval_examples > 0)
        return Breakdown(training=(end - start) * self.step_s,
                         evaluation=n_evals * eval_examples * self.eval_example_s, n_evals=n_evals,
                         saving=self.saves(start, end, save_every) * self.save_s,
                         n_saves=self.saves(start, end, save_every), plot=self.plot_s)


@dataclass
class Breakdown:
    training: float
    evaluation: float
    n_evals: int
    saving: float
    n_saves: int
    plot: float

    @property
    def total(self) -> float:
        return self.training + self.evaluation + self.saving + self.plot


def fit_steps(seconds_for: Callable[[int], float], available_s: float, upper: int) -> int:
    """The most steps n in [1, upper] with seconds_for(n) <= available_s (at least 1: a run trains)."""
    low, high = 1, upper
    while low < high:
        mid = (low + high + 1) // 2
        if seconds_for(mid) <= available_s:
            low = mid
        else:
            high = mid - 1
    return low
