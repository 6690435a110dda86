"""`vpdetect tune`: choose a localizer's post-processing on annotated tomograms."""

from __future__ import annotations

from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.cli.batch import device_option
from vpdetect.cli.localize import (
    erase_membranes_option,
    gold_streaks_option,
    halo_option,
    match_spectrum_option,
    tile_option,
)
from vpdetect.localize.tune import (
    DEFAULT_BANDWIDTH_FACTORS,
    DEFAULT_MAX_COMPONENTS,
    DEFAULT_MERGE_FACTORS,
    DEFAULT_MIN_SCORES,
    DEFAULT_MIN_SIZES,
    DEFAULT_SPARE_SMALLS,
    DEFAULT_THRESHOLDS,
)


def grid_option(flag: str, what: str, defaults):
    """A repeatable option giving the values one axis of the search takes."""
    listed = ", ".join(f"{v:g}" for v in defaults)
    return typer.Option(None, flag, help=f"Search these {what} (repeat for several; default: {listed}).")


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
    drop_thin: bool = typer.Option(
        None, "--drop-thin/--keep-thin",
        help="Drop the fragments of thin structures (as `localize --drop-thin`) at every grid point, "
        "and store the choice (default: the model's current choice, else keep).",
    ),
    bandwidths: list[float] = typer.Option(
        None, "--bandwidth",
        help="Search these fixed bandwidths in voxels (repeat for several) instead of multiples of the "
        "particle radius measured on each map (the default, which follows the user's particle size).",
    ),
    thresholds: list[float] = grid_option("--threshold", "foreground thresholds", DEFAULT_THRESHOLDS),
    bandwidth_factors: list[float] = grid_option(
        "--bandwidth-factor", "multiples of the measured particle radius as the bandwidth", DEFAULT_BANDWIDTH_FACTORS
    ),
    merge_factors: list[float] = grid_option(
        "--merge-factor", "merge radii, as multiples of the bandwidth", DEFAULT_MERGE_FACTORS
    ),
    min_sizes: list[int] = grid_option("--min-size", "minimum cluster sizes in voxels", DEFAULT_MIN_SIZES),
    max_components: list[float] = grid_option(
        "--max-component", "largest components, in balls of the bandwidth (0: no limit)", DEFAULT_MAX_COMPONENTS
    ),
    spare_smalls: list[float] = grid_option(
        "--spare-small", "sizes, in typical particles, up to which components are left unopened (0: open all)",
        DEFAULT_SPARE_SMALLS,
    ),
    min_scores: list[float] = grid_option(
        "--min-score", "least mean probabilities of a cluster's voxels (0: keep all)", DEFAULT_MIN_SCORES
    ),
    grid_csv: Path = typer.Option(
        None, "--grid-csv",
        help="Also write every grid point (settings, mean F1 and each tomogram's F1, best first) to this CSV.",
    ),
    match_spectrum: bool = match_spectrum_option(),
    erase_membranes: bool = erase_membranes_option(),
    remove_gold_streaks: bool = gold_streaks_option(),
    drop_gold: bool = typer.Option(
        None, "--drop-gold/--keep-gold",
        help="Store whether picks on gold beads are dropped by default (as `localize --drop-gold`; the search "
        "itself scores the picks before beads are dropped) (default: leave the model's choice).",
    ),
    tile: int = tile_option(),
    halo: int = halo_option(),
    device: str = device_option(),
) -> None:
    """Search threshold, bandwidth, merge radius, minimum size, minimum score and largest component for the
    best SHREC F1.

    The winners are stored in the model's card and become `localize`'s and `pick`'s
    defaults for that model (options given on the command line still win). With
    --match-spectrum or --no-match-spectrum (likewise --erase-membranes or --keep-membranes,
    --remove-gold-streaks or --keep-gold-streaks) the maps are made that way and the card keeps that choice as the model's default.
    """
    from vpdetect.cli.batch import resolve_device
    from vpdetect.cli.localize import build_localize_options
    from vpdetect.cli.logs import progress_bar
    from vpdetect.errors import VPDetectError
    from vpdetect.evaluate.shrec import read_truth, scored_particles
    from vpdetect.io.atomic import atomic_path, check_output_dir
    from vpdetect.io.mrc import read_tomogram
    from vpdetect.localize.pipeline import segment_volume
    from vpdetect.localize.tune import AnnotatedMap, grid_table, tune_postprocessing
    from vpdetect.nn.checkpoint import load_model, read_training_state, save_model

    grids = {"--bandwidth": bandwidths, "--threshold": thresholds, "--bandwidth-factor": bandwidth_factors,
             "--merge-factor": merge_factors, "--min-size": min_sizes}
    for flag, values in grids.items():  # before minutes of segmentation
        if values and min(values) <= 0:
            raise VPDetectError(f"{flag} must be positive, got {min(values):g}")
    if thresholds and max(thresholds) >= 1:
        raise VPDetectError(f"--threshold must lie below 1, got {max(thresholds):g}")
    if spare_smalls and min(spare_smalls) < 0:
        raise VPDetectError(f"--spare-small must be 0 or positive, got {min(spare_smalls):g}")
    if max_components and min(max_components) < 0:
        raise VPDetectError(f"--max-component must be 0 or positive, got {min(max_components):g}")
    bad_score = next((v for v in min_scores or () if not 0 <= v < 1), None)
    if bad_score is not None:
        raise VPDetectError(f"--min-score must lie in [0, 1), got {bad_score:g}")
    if grid_csv is not None:
        check_output_dir(grid_csv.parent)
    device = resolve_device(device)
    net, card = load_model(model, stage="localizer", device=device)
    options = build_localize_options(tile=tile, halo=halo, device=device, match_spectrum=match_spectrum,
                                     erase_membranes=erase_membranes, remove_gold_streaks=remove_gold_streaks)
    # Every folder's truth first: one without particles would make any setting score 0 (and the
    # grid's first point "best") after all the others were segmented.
    truths = [read_truth(folder) for folder in data]
    for folder, (_, truth) in zip(data, truths, strict=True):
        if not scored_particles(truth).any():
            raise VPDetectError(f"{folder}: its particle_locations.txt lists no particle to tune on")
    maps = []
    for folder, (occupancy, truth) in zip(data, truths, strict=True):
        tomo = read_tomogram(folder / "reconstruction.mrc")
        console.print(f"segmenting {folder} ...")
        prob, _ = segment_volume(tomo, net, card, options)
        maps.append(AnnotatedMap(prob, occupancy, truth, tomo.voxel_size))
    console.print(f"searching post-processing settings on {len(maps)} tomogram(s) ...")
    with progress_bar() as bar:
        task = bar.add_task("post-processing grid", total=None)
        best, rows = tune_postprocessing(
            maps, opening_radius=opening_radius, bandwidths=bandwidths or None,
            thresholds=thresholds or DEFAULT_THRESHOLDS,
            bandwidth_factors=bandwidth_factors or DEFAULT_BANDWIDTH_FACTORS,
            merge_factors=merge_factors or DEFAULT_MERGE_FACTORS,
            min_sizes=min_sizes or DEFAULT_MIN_SIZES,
            max_components=max_components or DEFAULT_MAX_COMPONENTS,
            min_scores=min_scores or DEFAULT_MIN_SCORES,
            spare_smalls=spare_smalls or DEFAULT_SPARE_SMALLS,
            drop_thin=bool((card.get("postprocess") or {}).get("drop_thin", False) if drop_thin is None else drop_thin),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    if grid_csv is not None:
        with atomic_path(grid_csv) as temporary:
            grid_table(rows, [str(folder) for folder in data]).to_csv(temporary, index=False, float_format="%.4f")
    best["tuned_on"] = [str(folder) for folder in data]
    best["grid_points"] = len(rows)
    card = dict(card)
    card["postprocess"] = best
    if match_spectrum is not None:  # tuned with (or without) matching: the model's default from now on
        card["match_spectrum"] = match_spectrum
    if erase_membranes is not None:
        card["erase_membranes"] = erase_membranes
    if remove_gold_streaks is not None:
        card["remove_gold_streaks"] = remove_gold_streaks
    if drop_gold is not None:
        card["drop_gold"] = drop_gold
    # A shipped model keeps its float16 storage (its weights are float16 values already).
    save_model(out or model, net.cpu(), card, training_state=read_training_state(model),
               half_weights=card.get("weights_storage") == "float16")
    size = (f"bandwidth {best['bandwidth_factor']:g} x the measured particle radius, merge radius "
            f"{best['merge_factor']:g} x the bandwidth" if "bandwidth_factor" in best
            else f"bandwidth {best['bandwidth']:g}, merge radius {best['merge_radius']:g}")
    console.print(
        f"best mean F1 {best['f1']:.3f}: threshold {best['threshold']}, {size}, "
        f"min size {best['min_size']}, min score {best['min_score']:g}, largest component {best['max_component']:g} bandwidth balls "
        f"(0: any){', thin fragments dropped' if best.get('drop_thin') else ''} -> {out or model}"
    )
