"""The logit lens panel: a layer x position grid around the selected token, and the selected column in numbers."""
from __future__ import annotations

import numpy as np
import tiktoken
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..inspection import LogitLens
from .clickable import ClickMap, render
from .panels import axis_label
from .replies import Reply

LENS_COLUMNS = 12  # positions shown at once: the cells must stay wide enough to read a token


def lens_ids(reply: Reply) -> list[int]:
    """The sequence the lens reads: the prompt and every reply token (the last one is only a target)."""
    return reply.prompt_ids + reply.token_ids


def reply_column(reply: Reply, position: int) -> int:
    """The lens column that predicted reply token `position` (1-based): the position before it."""
    return len(reply.prompt_ids) + position - 2


def visible_columns(lens: LogitLens, column: int) -> range:
    """LENS_COLUMNS columns around `column`, within the sequence."""
    total = lens.top_ids.shape[1]
    start = min(max(column - LENS_COLUMNS // 2, 0), max(total - LENS_COLUMNS, 0))
    return range(start, min(start + LENS_COLUMNS, total))


def layer_name(layer: int, n_layers: int) -> str:
    return "embeddings" if layer == 0 else "output" if layer == n_layers - 1 else f"layer {layer}"


def lens_figure(lens: LogitLens, tokenizer: tiktoken.Encoding, column: int,
                first_reply_column: int) -> tuple[np.ndarray, ClickMap]:
    """The grid image and its click map, over visible_columns(lens, column). A cell shows the layer's top-1 token and
    the rank of the token that came next; its colour is that token's probability under the layer."""
    def short(token_id: int) -> str:
        return axis_label(tokenizer, int(token_id))[:7]

    columns = visible_columns(lens, column)
    n_layers = lens.top_ids.shape[0]
    probs = lens.target_probs[:, columns.start:columns.stop]
    fig = Figure(figsize=(7.2, 0.32 * n_layers + 1.6), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="lower",
                      interpolation="nearest")
    for layer in range(n_layers):
        for j, c in enumerate(columns):
            ax.text(j, layer, f"{short(lens.top_ids[layer, c])}\n#{lens.target_ranks[layer, c]}", ha="center", va="center", fontsize=5.5,
                    color="white" if probs[layer, j] < 0.5 else "black")
    ax.set_yticks(range(n_layers), [layer_name(i, n_layers) for i in range(n_layers)], fontsize=6)
    ax.set_xticks(range(len(columns)), [f"{short(lens.ids[c])}\n→{short(lens.ids[c + 1])}" for c in columns],
                  fontsize=6)
    for j, c in enumerate(columns):
        if c < first_reply_column:
            ax.get_xticklabels()[j].set_color("gray")  # prompt positions
    if column in columns:  # the selected position, outlined
        ax.add_patch(Rectangle((column - columns.start - 0.5, -0.5), 1, n_layers, fill=False, edgecolor="#ff4081",
                               linewidth=2))
    ax.set_xlabel("position: the token read → the token that came next (gray: prompt)", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).set_label("p(token that came next)", fontsize=7)
    return render(fig, ax, n_layers, len(columns), bottom_up=True)


def lens_table(lens: LogitLens, tokenizer: tiktoken.Encoding, column: int) -> str:
    """The selected column, every layer in numbers (markdown)."""
    target = lens.ids[column + 1]
    read, came = axis_label(tokenizer, lens.ids[column]), axis_label(tokenizer, target)
    lines = [f"After `{read}` the next token was `{came}`. What each layer predicts:", "",
             "| layer | top-1 | p(top-1) | p(next) | rank of next |", "|---|---|---|---|---|"]
    n_layers = lens.top_ids.shape[0]
    for layer in reversed(range(n_layers)):
        top = axis_label(tokenizer, int(lens.top_ids[layer, column]))
        lines.append(f"| {layer_name(layer, n_layers)} | `{top}` | "
                     f"{lens.top_probs[layer, column]:.3g} | {lens.target_probs[layer, column]:.3g} | "
                     f"{lens.target_ranks[layer, column]} |")
    return "\n".join(lines)
