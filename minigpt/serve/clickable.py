"""Figures a user can click: a matplotlib Figure rendered to pixels, and the grid of cells its axes hold.

gr.Plot reports no clicks, but gr.Image's select event gives the clicked pixel of the image as
rendered here; ClickMap turns that pixel into a (row, column) cell of the figure's grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass(frozen=True)
class ClickMap:
    """A rows x columns grid drawn over the axes' box [left, right) x [top, bottom) in image pixels.
    Row 0 is the top row unless bottom_up (imshow with origin="lower")."""
    left: float
    top: float
    right: float
    bottom: float
    rows: int
    columns: int
    bottom_up: bool = False

    def cell(self, x: float, y: float) -> tuple[int, int] | None:
        """The (row, column) under pixel (x, y), or None outside the grid."""
        if not (self.left <= x < self.right and self.top <= y < self.bottom):
            return None
        row = int((y - self.top) / (self.bottom - self.top) * self.rows)
        column = int((x - self.left) / (self.right - self.left) * self.columns)
        return (self.rows - 1 - row if self.bottom_up else row), column

    def centre(self, row: int, column: int) -> tuple[float, float]:
        """Pixel (x, y) at the middle of a cell (what a test clicks)."""
        shown_row = self.rows - 1 - row if self.bottom_up else row
        return (self.left + (column + 0.5) * (self.right - self.left) / self.columns,
                self.top + (shown_row + 0.5) * (self.bottom - self.top) / self.rows)


def render(fig: Figure, ax: Axes, rows: int, columns: int, bottom_up: bool = False) -> tuple[np.ndarray, ClickMap]:
    """The figure as an RGB array (H, W, 3), and the clickable grid of `ax`, whose data limits must span
    the cells exactly (imshow's default extent; bar charts with xlim (-0.5, n - 0.5))."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    box = ax.get_window_extent()  # display pixels, origin at the bottom left
    height = pixels.shape[0]
    return pixels, ClickMap(box.x0, height - box.y1, box.x1, height - box.y0, rows, columns, bottom_up)
