"""Attention, head by head: the entropy of every head over the last reply, and how alike a layer's heads look."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..inspection import attention_entropy, head_similarity
from .clickable import ClickMap, render
from .panels import AttentionWindow


def entropy_grid(window: AttentionWindow) -> np.ndarray:
    """(n_layer, n_head): each head's attention entropy in nats, averaged over the reply's rows."""
    return attention_entropy(window.probs).mean(axis=-1)


def entropy_figure(window: AttentionWindow, selected: tuple[int, int | None]) -> tuple[np.ndarray, ClickMap]:
    """Layer x head grid of entropies; low = a head that looks at few tokens. Click a cell for its map."""
    grid = entropy_grid(window)
    n_layer, n_head = grid.shape
    fig = Figure(figsize=(3.6, 0.22 * n_layer + 1.3), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="cividis", aspect="auto", interpolation="nearest")
    if n_layer * n_head <= 64:  # numbers only where they fit
        for (layer, head), value in np.ndenumerate(grid):
            ax.text(head, layer, f"{value:.1f}", ha="center", va="center", fontsize=6,
                    color="white" if value < grid.mean() else "black")
    layer, head = selected
    if head is not None:
        ax.add_patch(_cell_outline(head, layer))
    ax.set_xticks(range(n_head), [str(h + 1) for h in range(n_head)], fontsize=6)
    ax.set_yticks(range(n_layer), [str(i + 1) for i in range(n_layer)], fontsize=6)
    ax.set_xlabel("head", fontsize=7)
    ax.set_ylabel("layer", fontsize=7)
    ax.set_title("Attention entropy (nats)", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, format="%.2f").ax.tick_params(labelsize=6)
    return render(fig, ax, n_layer, n_head)


def similarity_figure(window: AttentionWindow, layer: int, head: int | None) -> tuple[np.ndarray, ClickMap]:
    """Cosine similarity of one layer's heads' patterns over the reply: blocks of alike heads show up."""
    matrix = head_similarity(window.probs[layer])
    n = matrix.shape[0]
    fig = Figure(figsize=(3.4, 3.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    if head is not None:
        ax.add_patch(_cell_outline(head, head))
    ax.set_xticks(range(n), [str(h + 1) for h in range(n)], fontsize=6)
    ax.set_yticks(range(n), [str(h + 1) for h in range(n)], fontsize=6)
    ax.set_xlabel("head", fontsize=7)
    ax.set_title(f"Layer {layer + 1}: head similarity", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize=6)
    return render(fig, ax, n, n)


def _cell_outline(column: int, row: int) -> Rectangle:
    return Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="#ff4081", linewidth=2)
