"""The timeline of a reply: how long each token took, the prompt's processing first."""
from __future__ import annotations

import numpy as np
import tiktoken
from matplotlib.figure import Figure

from .clickable import ClickMap, render
from .panels import axis_label
from .replies import Reply


def token_durations(reply: Reply) -> np.ndarray:
    """Milliseconds per token: the first includes reading the prompt, each later one is a decode step
    (speculative decoding delivers several tokens per step: the first carries the step's time)."""
    return np.diff(np.array([0.0, *reply.token_times])) * 1000.0


def timeline_summary(reply: Reply) -> str:
    if not reply.token_times:
        return "No timings: this reply was loaded from a file without them."
    ms = token_durations(reply)
    speed = f" · decode {reply.tokens_per_s:.1f} tokens/s" if reply.tokens_per_s else ""
    later = f" · median step {np.median(ms[1:]):.1f} ms" if len(ms) > 1 else ""
    return f"Prompt ({len(reply.prompt_ids)} tokens) + first token: {ms[0]:.0f} ms{later}{speed} · total {ms.sum():.0f} ms"


def timeline_figure(reply: Reply, tokenizer: tiktoken.Encoding, position: int) -> tuple[np.ndarray, ClickMap]:
    """A bar per token, in order; the prompt's bar in gray, the selected token in pink. Click a bar to select it."""
    ms = token_durations(reply)
    n = len(ms)
    colours = ["#9e9e9e"] + ["#5c6bc0"] * (n - 1)
    if 1 <= position <= n:
        colours[position - 1] = "#e91e63"
    fig = Figure(figsize=(7.2, 2.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(range(n), ms, width=0.9, color=colours)
    ax.set_xlim(-0.5, n - 0.5)  # the click map's cells are the bars
    ax.set_yscale("log")
    ax.set_ylabel("ms", fontsize=7)
    ax.set_xlabel("token (the first bar includes reading the prompt)", fontsize=7)
    step = max(1, n // 16)
    ax.set_xticks(range(0, n, step), [axis_label(tokenizer, reply.token_ids[i])[:6] for i in range(0, n, step)],
                  fontsize=6, rotation=90)
    ax.tick_params(labelsize=6)
    return render(fig, ax, 1, n)
