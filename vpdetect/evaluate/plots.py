"""Figures of evaluation results (matplotlib, Agg, no pyplot global state)."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np


def confusion_figure(confusion: Mapping, title: str = "Classification confusion matrix"):
    """A Figure of the confusion matrix, rows normalised to the fraction of each true class.

    Cells show the counts; colour is the row fraction, so rare classes read as well as common ones.
    """
    from matplotlib.figure import Figure

    labels = list(confusion["labels"])
    counts = np.asarray(confusion["matrix"], dtype=np.int64).reshape(len(labels), len(labels))
    # No true particle is background: its row is always empty, so it is not drawn.
    row_labels = labels[:-1] if labels and labels[-1] == "background" else labels
    counts = counts[: len(row_labels)]
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = max(4.0, 0.55 * len(labels) + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("assigned class (first hit)")
    ax.set_ylabel("true class")
    ax.set_title(title)
    for i in range(len(row_labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                colour = "white" if fractions[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    fig.tight_layout()
    return fig


def figure_png(fig, dpi: int = 120) -> bytes:
    """PNG bytes of a Figure (rendered in memory, so the caller writes the file atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
