"""Per-class average subtomograms: the first look at a classification.

Boxes are cut around each pick exactly as the classifier sees them
(`vpdetect.classify.extract.extract_boxes`, z-scored with the tomogram's own
statistics) and averaged per class without alignment: particles of one class
in random orientations average to a blob of the class's size and mean
density, so a class whose average is empty, off-centre or of the wrong size
stands out. The gallery shows each average's central xy, xz and yz slices.
"""

from __future__ import annotations

import numpy as np

from vpdetect.errors import VPDetectError

CHUNK = 256  # boxes extracted at a time, so memory stays small for large tables


def class_averages(volume: np.ndarray, table, box: int, stats: tuple[float, float] | None = None) -> dict:
    """{class name: (mean box [z, y, x] float32, number of picks)} in sorted class order.

    Picks whose centre lies outside the volume are left out; a class with none
    inside is left out. `stats` reuses the tomogram's (mean, std).
    """
    from vpdetect.classify.extract import extract_boxes, inside_volume
    from vpdetect.evaluate.overlay import pick_classes
    from vpdetect.localize.pipeline import tomogram_stats

    if box < 3:
        raise VPDetectError(f"box size must be at least 3 voxels, got {box}")
    data = table.data
    if len(data) == 0:
        raise VPDetectError("particle table is empty: no class averages to draw")
    coords = data[["x", "y", "z"]].to_numpy(dtype=np.float64)
    inside = inside_volume(coords, volume.shape)
    if not inside.any():
        raise VPDetectError("no pick lies inside the tomogram")
    names = pick_classes(data)
    mean, std = stats if stats is not None else tomogram_stats(volume)
    averages = {}
    for name in sorted(set(names[inside])):
        rows = coords[inside & (names == name)]
        total = np.zeros((box, box, box), np.float64)
        for start in range(0, len(rows), CHUNK):
            total += extract_boxes(volume, rows[start : start + CHUNK], box, mean, std).sum(axis=0)
        averages[name] = ((total / len(rows)).astype(np.float32), len(rows))
    return averages


def averages_figure(averages: dict, title: str = ""):
    """A Figure with one row per class: the central xy, xz and yz slices of its average box,
    on one grey scale shared by all classes so their densities compare."""
    from matplotlib.figure import Figure

    from vpdetect.evaluate.overlay import ORTHO_VIEWS, class_colours

    if not averages:
        raise VPDetectError("no class averages to draw")
    colours = class_colours(list(averages))
    stacked = np.stack([avg for avg, _ in averages.values()])
    lo, hi = np.percentile(stacked, [1, 99.5])
    n = len(averages)
    fig = Figure(figsize=(6.2, 1.4 * n + 0.6))
    grid = fig.add_gridspec(n, 3, left=0.33, right=0.98, top=1 - 0.45 / (1.4 * n + 0.6), bottom=0.02,
                            wspace=0.06, hspace=0.08)
    for row, (name, (avg, count)) in enumerate(averages.items()):
        centre = avg.shape[0] // 2
        for col, (view, axis, _, _) in enumerate(ORTHO_VIEWS):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(np.take(avg, centre, axis=axis), cmap="gray", vmin=lo, vmax=hi, origin="lower",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(view, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{name}\n({count})", rotation=0, ha="right", va="center", fontsize=9,
                              )
            for spine in ax.spines.values():
                spine.set_edgecolor(colours[name])
                spine.set_linewidth(2)
    fig.suptitle(title or "class averages (central slices, no alignment)", fontsize=10)
    return fig
