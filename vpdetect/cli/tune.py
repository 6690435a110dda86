"""`vpdetect tune`: choose a localizer's post-processing on annotated tomograms."""

from __future__ import annotations

from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.cli.batch import device_option
from vpdetect.cli.localize import halo_option, tile_option


@app.command()
@user_errors
def tune(
    model: Path = typer.Argument(..., help="Localizer model file to tune."),
    data: list[Path] = typer.Option(
        ..., "--data", "-d",
        help="SHREC-layout folder with reconstruction.mrc, occupancy_mask.mrc and "
        "particle_locations.txt (repeat for several); not the training tomograms.",
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="Model file to write (default: update MODEL in place)."
    ),
    opening_radius: int = typer.Option(1, "--opening-radius", min=0, help="Opening radius (voxels) kept fixed."),
    bandwidths: list[float] = typer.Option(
        None, "--bandwidth",
        help="Search these fixed bandwidths in voxels (repeat for several) instead of multiples of the "
        "particle radius measured on each map (the default, which follows the user's particle size).",
    ),
    tile: int = tile_option(),
    halo: int = halo_option(),
    device: str = device_option(),
) -> None:
    """Search threshold, bandwidth, merge radius and minimum size for the best SHREC F1.

    The winners are stored in the model's card and become `localize`'s and `pick`'s
    defaults for that model (options given on the command line still win).
    """
    from vpdetect.cli.batch import resolve_device
    from vpdetect.cli.localize import build_localize_options
    from vpdetect.cli.logs import progress_bar
    from vpdetect.errors import VPDetectError
    from vpdetect.evaluate.shrec import read_truth
    from vpdetect.io.mrc import read_tomogram
    from vpdetect.localize.pipeline import segment_volume
    from vpdetect.localize.tune import AnnotatedMap, tune_postprocessing
    from vpdetect.nn.checkpoint import load_model, read_training_state, save_model

    if bandwidths and min(bandwidths) <= 0:  # before minutes of segmentation
        raise VPDetectError(f"--bandwidth must be positive, got {min(bandwidths):g}")
    device = resolve_device(device)
    net, card = load_model(model, stage="localizer", device=device)
    options = build_localize_options(tile=tile, halo=halo, device=device)
    maps = []
    for folder in data:
        tomo = read_tomogram(folder / "reconstruction.mrc")
        occupancy, truth = read_truth(folder)
        console.print(f"segmenting {folder} ...")
        prob, _ = segment_volume(tomo, net, card, options)
        maps.append(AnnotatedMap(prob, occupancy, truth, tomo.voxel_size))
    console.print(f"searching post-processing settings on {len(maps)} tomogram(s) ...")
    with progress_bar() as bar:
        task = bar.add_task("post-processing grid", total=None)
        best, rows = tune_postprocessing(
            maps, opening_radius=opening_radius, bandwidths=bandwidths or None,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    best["tuned_on"] = [str(folder) for folder in data]
    best["grid_points"] = len(rows)
    card = dict(card)
    card["postprocess"] = best
    save_model(out or model, net.cpu(), card, training_state=read_training_state(model))
    size = (f"bandwidth {best['bandwidth_factor']:g} x the measured particle radius, merge radius "
            f"{best['merge_factor']:g} x the bandwidth" if "bandwidth_factor" in best
            else f"bandwidth {best['bandwidth']:g}, merge radius {best['merge_radius']:g}")
    console.print(
        f"best mean F1 {best['f1']:.3f}: threshold {best['threshold']}, {size}, "
        f"min size {best['min_size']} -> {out or model}"
    )
