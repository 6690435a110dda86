"""Picture of a simulated tomogram: a central slice of the reconstruction beside its class mask.

    python examples/plot_simulation.py                       # simulate the shrec21 preset (512^3), seed 0
    python examples/plot_simulation.py --model-dir out/model_0   # plot an existing simulation

Writes docs/images/simulate_shrec21.png by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load_or_simulate(model_dir: Path | None, size: int | None, seed: int):
    """(reconstruction, class_mask, class table, title) from a folder or a fresh shrec21 simulation."""
    if model_dir is not None:
        from vpdetect.io.mrc import read_tomogram

        reconstruction = read_tomogram(model_dir / "reconstruction.mrc").data
        class_mask = read_tomogram(model_dir / "class_mask.mrc").data.astype(int)
        meta = json.loads((model_dir / "simulation.json").read_text())
    else:
        from vpdetect.simulate import preset_params, simulate_tomogram

        overrides = {}
        if size is not None:  # a smaller cube with the preset's slab-to-size ratio
            overrides = {"shape_xyz": (size, size, size), "slab_thickness": max(40, round(size * 200 / 512))}
        params = preset_params("shrec21", **overrides)
        result = simulate_tomogram(params, seed=seed)
        reconstruction, class_mask, meta = result.reconstruction, result.class_mask, result.metadata
    x, y, z = meta["shape_xyz"]
    title = (f"{meta['parameters']['preset']} {x}x{y}x{z}, SNR {meta['snr_measured']:.2f}, "
             f"defocus {meta['microscope']['defocus_um']:.1f} um")
    return reconstruction, class_mask, meta["classes"], title


def plot(reconstruction: np.ndarray, class_mask: np.ndarray, classes: list[dict], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from vpdetect.io.atomic import atomic_path

    centre = reconstruction.shape[0] // 2
    section = reconstruction[centre]
    low, high = np.percentile(section, [1, 99])
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))[: len(classes)]
    cmap = ListedColormap(np.vstack([[0.08, 0.08, 0.08, 1.0], colours]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.6), constrained_layout=True)
    axes[0].imshow(section, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    axes[0].set_title(f"reconstruction, z = {centre}")
    axes[1].imshow(class_mask[centre], cmap=cmap, vmin=0, vmax=len(classes), interpolation="nearest")
    axes[1].set_title("class mask")
    for ax in axes:
        ax.set_xlabel("x (nm)")
        ax.set_ylabel("y (nm)")
    handles = [Patch(color=colours[row["label"] - 1], label=row["name"]) for row in classes]
    axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="a model_N folder written by `vpdetect simulate`")
    parser.add_argument("--size", type=int, help="edge of the simulated cube (default: the preset's 512)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    parser.add_argument("--out", type=Path, default=Path("docs/images/simulate_shrec21.png"), help="PNG to write")
    args = parser.parse_args()
    plot(*load_or_simulate(args.model_dir, args.size, args.seed), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
