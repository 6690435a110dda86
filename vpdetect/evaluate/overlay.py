"""A central slice of a tomogram with picked particles drawn on it, coloured by class."""

from __future__ import annotations

import numpy as np


def plot_picks_on_slice(
    volume: np.ndarray,
    table,
    z: int | None = None,
    slab: int = 3,
    title: str = "",
    truth=None,
):
    """Return a matplotlib Figure: slice `z` of `volume` [z, y, x] with the picks within
    `slab` voxels of it as circles coloured by class (and true centres as small dots).

    `table` and `truth` are ParticleTables (columns x, y, z, optional class_name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = volume.shape[0] // 2 if z is None else int(z)
    # Average a few slices: single slices of a noisy tomogram show little.
    lo, hi = max(z - 2, 0), min(z + 3, volume.shape[0])
    image = np.asarray(volume[lo:hi], dtype=np.float32).mean(axis=0)
    vmin, vmax = np.percentile(image, [1, 99])
    fig, ax = plt.subplots(figsize=(8, 8 * image.shape[0] / max(image.shape[1], 1) + 0.6))
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
    if truth is not None and len(truth):
        t = truth.data
        near = np.abs(t["z"].to_numpy() - z) <= slab
        ax.scatter(t["x"][near], t["y"][near], s=6, c="white", marker=".", label="true centre")
    data = table.data
    near = np.abs(data["z"].to_numpy() - z) <= slab
    picked = data[near]
    names = (
        picked["class_name"].astype(str).to_numpy()
        if "class_name" in picked
        else np.full(len(picked), "particle")
    )
    cmap = plt.get_cmap("tab20")
    for k, name in enumerate(sorted(set(names))):
        sel = names == name
        ax.scatter(
            picked["x"].to_numpy()[sel],
            picked["y"].to_numpy()[sel],
            s=90,
            facecolors="none",
            edgecolors=[cmap(k % 20)],
            linewidths=1.5,
            label=name,
        )
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(-0.5, image.shape[0] - 0.5)
    ax.set_xlabel("x (voxels)")
    ax.set_ylabel("y (voxels)")
    ax.set_title(title or f"slice z = {z} (picks within {slab} voxels)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
