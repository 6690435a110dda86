"""Picks drawn on a tomogram, coloured by class: one slice, orthogonal slices or a z montage.

Pure figures (matplotlib `Figure`, no pyplot state): `vpdetect view` and
`make demo` write them, and the napari plugin colours points with the same
`class_colours`, so a class looks the same everywhere.

Each panel is the mean of a few slices (`thickness`) around its plane, since a
single slice of a noisy tomogram shows little; a pick is drawn on a panel
when it lies within `slab` voxels of the plane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UNKNOWN_COLOUR = (0.6, 0.6, 0.6, 1.0)
# matplotlib's tab20 (categorical, 20 distinct colours), inlined so the napari plugin needs no matplotlib.
TAB20 = (
    "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
    "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
    "#bcbd22", "#dbdb8d", "#17becf", "#9edae5",
)
# The axes of each orthogonal view: (name, axis cut [z=0, y=1, x=2], horizontal, vertical) in x/y/z.
ORTHO_VIEWS = (("xy", 0, "x", "y"), ("xz", 1, "x", "z"), ("yz", 2, "y", "z"))


def _rgba(hex_colour: str) -> tuple[float, float, float, float]:
    value = hex_colour.lstrip("#")
    return tuple(int(value[i : i + 2], 16) / 255.0 for i in (0, 2, 4)) + (1.0,)  # type: ignore[return-value]


def class_colours(names: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """RGBA colour of each class name: tab20 in sorted order, grey for `unknown`."""
    colours = {}
    known = sorted({str(n) for n in names} - {"unknown"})
    for k, name in enumerate(known):
        colours[name] = _rgba(TAB20[k % len(TAB20)])
    if "unknown" in {str(n) for n in names}:
        colours["unknown"] = UNKNOWN_COLOUR
    return colours


def pick_classes(data) -> np.ndarray:
    """Class name of each row as text (`particle` for tables without classes)."""
    if "class_name" in data.columns:
        return data["class_name"].astype(str).to_numpy()
    if "class_number" in data.columns:
        return data["class_number"].astype(int).astype(str).to_numpy()
    return np.full(len(data), "particle")


def slab_image(volume: np.ndarray, axis: int, index: int, thickness: int = 5) -> np.ndarray:
    """Mean of `thickness` slices of `volume` [z, y, x] around `index` along `axis`, as
    an image whose rows are the slower remaining axis (y for xy, z for xz and yz)."""
    half = max(int(thickness), 1) // 2
    lo, hi = max(index - half, 0), min(index + half + 1, volume.shape[axis])
    block = np.take(volume, range(lo, hi), axis=axis).astype(np.float32)
    image = block.mean(axis=axis)
    # xz and yz: rows are z already ([z, x] and [z, y]); xy: rows are y ([y, x]).
    return image


def _contrast(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _draw_panel(ax, image, h, v, names, colours, title, labels, marker_size):
    vmin, vmax = _contrast(image)
    ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
    for name in colours:
        sel = names == name
        if np.any(sel):
            ax.scatter(
                h[sel], v[sel], s=marker_size, facecolors="none", edgecolors=[colours[name]],
                linewidths=1.4,
            )
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(-0.5, image.shape[0] - 0.5)
    ax.set_xlabel(f"{labels[0]} (voxels)")
    ax.set_ylabel(f"{labels[1]} (voxels)")
    ax.set_title(title, fontsize=10)


def _legend(fig, colours, counts, **where):
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor=colours[n],
               markeredgewidth=1.5, markersize=8, label=f"{n} ({counts.get(n, 0)})")
        for n in colours
    ]
    fig.legend(handles=handles, fontsize=8, frameon=False, **where)


def _coords(data) -> dict[str, np.ndarray]:
    return {a: data[a].to_numpy(dtype=np.float64) for a in ("x", "y", "z")}


def plot_picks_on_slice(
    volume: np.ndarray,
    table,
    z: int | None = None,
    slab: int = 3,
    title: str = "",
    truth=None,
):
    """A Figure: slice `z` of `volume` [z, y, x] with the picks within `slab` voxels of it
    as circles coloured by class (and true centres as small dots).

    `table` and `truth` are ParticleTables (columns x, y, z, optional class_name).
    """
    from matplotlib.figure import Figure

    z = volume.shape[0] // 2 if z is None else int(z)
    image = slab_image(volume, 0, z)
    data = table.data
    names = pick_classes(data)
    colours = class_colours(names)
    fig = Figure(figsize=(8, 8 * image.shape[0] / max(image.shape[1], 1) + 0.6))
    ax = fig.add_subplot()
    if truth is not None and len(truth):
        t = truth.data
        near = np.abs(t["z"].to_numpy() - z) <= slab
        ax.scatter(t["x"][near], t["y"][near], s=6, c="white", marker=".", label="true centre")
    near = np.abs(data["z"].to_numpy() - z) <= slab
    c = _coords(data)
    _draw_panel(ax, image, c["x"][near], c["y"][near], names[near], colours,
                title or f"slice z = {z} (picks within {slab} voxels)", ("x", "y"), 90)
    counts = {n: int(k) for n, k in zip(*np.unique(names[near], return_counts=True), strict=True)}
    _legend(fig, colours, counts, loc="upper left", bbox_to_anchor=(0.80, 0.95))
    fig.subplots_adjust(right=0.78)
    return fig


def orthoslices_figure(
    volume: np.ndarray,
    table,
    centre_xyz: Sequence[float] | None = None,
    slab: float = 5.0,
    thickness: int = 5,
    title: str = "",
    marker_size: float = 60.0,
):
    """A Figure of the xy, xz and yz planes through `centre_xyz` (default: the volume's
    centre) with the picks within `slab` voxels of each plane, and a legend of classes."""
    from matplotlib.figure import Figure

    nz, ny, nx = volume.shape
    centre = [nx // 2, ny // 2, nz // 2] if centre_xyz is None else [int(round(v)) for v in centre_xyz]
    for value, size, axis in zip(centre, (nx, ny, nz), "xyz", strict=True):
        if not 0 <= value < size:
            from vpdetect.errors import VPDetectError

            raise VPDetectError(f"centre {axis} = {value} lies outside the tomogram (0..{size - 1})")
    data = table.data
    names = pick_classes(data)
    colours = class_colours(names)
    c = _coords(data)
    cut = {"x": centre[0], "y": centre[1], "z": centre[2]}
    widths = [nx, nx, ny]
    fig = Figure(figsize=(4.2 * 3 + 2.0, 4.2 * max(ny, nz) / max(nx, ny) + 1.0))
    grid = fig.add_gridspec(1, 3, width_ratios=widths, left=0.05, right=0.84, wspace=0.25)
    for k, (name, axis, h, v) in enumerate(ORTHO_VIEWS):
        cut_axis = "zyx"[axis]
        image = slab_image(volume, axis, cut[cut_axis], thickness)
        near = np.abs(c[cut_axis] - cut[cut_axis]) <= slab
        ax = fig.add_subplot(grid[0, k])
        _draw_panel(ax, image, c[h][near], c[v][near], names[near], colours,
                    f"{name} at {cut_axis} = {cut[cut_axis]}", (h, v), marker_size)
    counts = {n: int(k) for n, k in zip(*np.unique(names, return_counts=True), strict=True)}
    _legend(fig, colours, counts, loc="center left", bbox_to_anchor=(0.85, 0.5))
    fig.suptitle(title or f"{len(data)} picks; circles within {slab:g} voxels of each plane", fontsize=11)
    return fig


def montage_slices(nz: int, n_slices: int) -> np.ndarray:
    """`n_slices` z indices evenly spread over 0..nz-1 (each the centre of an equal band)."""
    n = max(1, min(int(n_slices), nz))
    return np.floor((np.arange(n) + 0.5) * nz / n).astype(int)


def montage_figure(
    volume: np.ndarray,
    table,
    n_slices: int = 12,
    columns: int = 4,
    thickness: int = 5,
    title: str = "",
    marker_size: float = 40.0,
):
    """A Figure of `n_slices` xy slices spread through z; each pick is drawn on the
    slice nearest to it, so every pick appears exactly once."""
    from matplotlib.figure import Figure

    nz, ny, nx = volume.shape
    zs = montage_slices(nz, n_slices)
    data = table.data
    names = pick_classes(data)
    colours = class_colours(names)
    c = _coords(data)
    nearest = np.argmin(np.abs(c["z"][:, None] - zs[None, :]), axis=1) if len(data) else np.zeros(0, int)
    columns = max(1, min(columns, len(zs)))
    rows = int(np.ceil(len(zs) / columns))
    panel = 3.2
    fig = Figure(figsize=(panel * columns + 2.0, panel * rows * ny / nx + 0.8))
    grid = fig.add_gridspec(rows, columns, left=0.04, right=0.86, wspace=0.3, hspace=0.35)
    for k, z in enumerate(zs):
        ax = fig.add_subplot(grid[k // columns, k % columns])
        sel = nearest == k
        _draw_panel(ax, slab_image(volume, 0, int(z), thickness), c["x"][sel], c["y"][sel], names[sel],
                    colours, f"z = {z} ({int(sel.sum())} picks)", ("x", "y"), marker_size)
    counts = {n: int(k) for n, k in zip(*np.unique(names, return_counts=True), strict=True)}
    _legend(fig, colours, counts, loc="center left", bbox_to_anchor=(0.87, 0.5))
    fig.suptitle(title or f"{len(data)} picks, each on its nearest slice", fontsize=11)
    return fig
