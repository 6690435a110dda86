"""`vpdetect localize`: particle coordinates from tomograms (stage 1).

The option factories and `build_localize_options`, `load_localizer` and
`localize_task` are shared with `vpdetect pick`.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import typer

from vpdetect.cli.app import app, user_errors
from vpdetect.cli.batch import (
    FORMAT_SUFFIX,
    device_option,
    devices_option,
    expand_inputs,
    format_name,
    load_stage_model,
    log_file_option,
    output_dir_option,
    overwrite_option,
    progress_bar,
    quiet_option,
    resolve_model_path,
    run_command_batch,
    shard_option,
    start_run,
    verbose_option,
)
from vpdetect.cli.copick_options import (
    copick_inputs,
    copick_option,
    copick_session_option,
    copick_user_option,
    run_option,
    store_in_copick,
    tomo_type_option,
    voxel_spacing_option,
)
from vpdetect.cli.geometry import (
    coords_pixel_size_option,
    load_tomograms,
    place_in_project,
    tomograms_star_option,
)
from vpdetect.errors import VPDetectError

log = logging.getLogger("vpdetect.localize")

# Defaults repeated here (not imported) so that `vpdetect --help` needs no numpy.
DEFAULT_THRESHOLD = 0.5
DEFAULT_OPENING_RADIUS = 1
DEFAULT_MIN_SIZE = 10
DEFAULT_BANDWIDTH = 5.0
DEFAULT_SNAP_DISTANCE = 2.0
DEFAULT_BATCH_SIZE = 1


# --------------------------------------------------------------------------- shared options


def localizer_model_option():
    return typer.Option(
        None, "--model", "-m", help="Localizer model file (.pt); default: the bundled localizer."
    )


def threshold_option():
    return typer.Option(
        None, "--threshold", min=0.0, max=1.0,
        help="Foreground probability above which a voxel belongs to a particle "
        f"(default: the model's tuned value, else {DEFAULT_THRESHOLD}).",
    )


def opening_radius_option():
    return typer.Option(
        None, "--opening-radius", min=0,
        help="Radius (voxels) of the ball of the morphological opening that removes speckle; 0 = none "
        f"(default: the model's tuned value, else {DEFAULT_OPENING_RADIUS}).",
    )


def bandwidth_option():
    return typer.Option(
        None, "--bandwidth", min=0.0,
        help="Mean-shift bandwidth in voxels, about a particle's radius (default: from --particle-diameter, "
        "else the model's tuned value, a multiple of the particle radius measured on the map, "
        f"else {DEFAULT_BANDWIDTH:g}).",
    )


def particle_diameter_option():
    return typer.Option(
        None, "--particle-diameter", min=0.0,
        help="Typical particle diameter in Angstrom; sets the bandwidth to its radius in voxels.",
    )


def min_size_option():
    return typer.Option(
        None, "--min-size", min=1,
        help="Drop clusters with fewer voxels than this (false positives) "
        f"(default: the model's tuned value, else {DEFAULT_MIN_SIZE}).",
    )


def min_score_option():
    return typer.Option(
        None, "--min-score", min=0.0, max=1.0,
        help="Drop clusters whose voxels' mean probability (the score column) is below this "
        "(default: the model's tuned value, else 0 = keep all).",
    )


def max_centre_gap_option():
    return typer.Option(
        None, "--max-centre-gap", min=0.0,
        help="Drop connected components whose centroid lies more than this many voxels outside "
        "them: hollow shells such as vesicle membranes (default: the bandwidth; 0 = keep all).",
    )


def max_component_option():
    return typer.Option(
        None, "--max-component", min=0.0,
        help="Drop connected components with more voxels than this many balls of the mean-shift "
        "bandwidth: membranes, carbon and other extended structures, which would otherwise become rows "
        "of false particles (default: the model's tuned value, else 0 = keep all).",
    )


def drop_thin_option():
    return typer.Option(
        None, "--drop-thin/--keep-thin",
        help="Drop the small fragments that the opening leaves of thin extended structures "
        "(membranes, filaments) segmented as foreground; particles on them, larger than the fragments, "
        "stay (default: the model's tuned choice, else keep).",
    )


def drop_gold_option():
    return typer.Option(
        None, "--drop-gold/--keep-gold",
        help="Drop picks on gold beads: objects whose smoothed robust |z| exceeds 20 and whose peak contrast "
        "exceeds 4 x the median pick's (far denser than any protein), picks within a bead's radius + 2 voxels. "
        "Default: the model card's choice (the bundled "
        "localizer drops them: beads are not macromolecules), else keep; SHREC'21 scores beads as its class "
        "fiducial, so --keep-gold there.",
    )


def verify_option():
    return typer.Option(
        None, "--verify/--no-verify",
        help="Score every pick with the localizer's pick verifier (a small network that reads a box of the "
        "tomogram and the map around the pick) and drop those scoring under --min-verified. Default: on "
        "when the model holds a verifier (`vpdetect train-verifier`; `vpdetect info` says).",
    )


def min_verified_option():
    return typer.Option(
        None, "--min-verified", min=0.0, max=1.0,
        help="Least verifier score a pick needs, 0-1 (default: the model card's).",
    )


def spare_small_option():
    return typer.Option(
        None, "--spare-small", min=0.0,
        help="Leave components of at most this many typical particles unopened: at very low SNR the map "
        "marks small particles with thin blobs that the opening erases; large structures are still opened "
        "(default: the model's tuned value, else 0 = open all).",
    )


def snap_distance_option():
    return typer.Option(
        DEFAULT_SNAP_DISTANCE, "--snap-distance", min=0.0,
        help="Move a centre that falls off the segmented particle (between two lobes) to the nearest "
        "foreground voxel within this many voxels (0 = keep the mean-shift centre).",
    )


def localizer_flips_option(flag: str = "--test-time-flips"):
    return typer.Option(
        None, flag, min=1, max=8,
        help="Average the localizer's map over this many of the 8 axis flips of each tile (flips keep the "
        "missing wedge in place; each costs one more network pass; 1 = none). Default: the model card's choice.",
    )


def tile_option():
    return typer.Option(
        None, "--tile", min=8,
        help="Edge (voxels) of the cubic tiles fed to the network (default: 128 on the CPU; on a GPU "
        "the largest whose feature maps fit half its free memory). Tiles too large for the memory are refused.",
    )


def halo_option():
    return typer.Option(
        None, "--halo", min=0,
        help="Context voxels around each tile's trusted core (default: the network's reach, capped at 24).",
    )


def batch_size_option():
    return typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Tiles per network call.")


def precision_option():
    return typer.Option(
        "auto", "--precision",
        help="Network arithmetic on CUDA: auto (TF32 on Ampere and newer GPUs, else fp32), fp32, "
        "tf32, bf16 or fp16. The CPU always computes in fp32.",
    )


def pixel_size_option():
    return typer.Option(None, "--pixel-size", help="Voxel size in Angstrom, overriding the MRC header.")


def contrast_option():
    return typer.Option(
        "auto", "--contrast",
        help="Particle contrast in the tomogram: dark (dense matter dark, as reconstructed), bright "
        "(contrast-inverted) or auto (detected from the skewness of band-passed copies; logged).",
    )


def rescale_option():
    return typer.Option(
        True, "--rescale/--no-rescale",
        help="Resample a tomogram whose voxel size differs from the model's by more than 10 % to the "
        "model's (Fourier cropping/padding; coordinates are mapped back). Sizes in voxels (bandwidth, "
        "min size) are then the model grid's.",
    )


def match_spectrum_option():
    return typer.Option(
        None, "--match-spectrum/--no-match-spectrum",
        help="Filter the tomogram so that its radial amplitude spectrum follows the model's training data "
        "(as membrain-seg does; needs a reference in the model card; whole tomogram in memory). Helps "
        "noisy tomograms, costs elsewhere (see README) (default: the model card's choice, else off).",
    )


def erase_membranes_option():
    return typer.Option(
        None, "--erase-membranes/--keep-membranes",
        help="Replace large thin dense sheets (membranes, the streak fans of gold beads, a carbon edge's face) "
        "by background noise before the network, so that particles beside them are found (Hessian "
        "sheetness at 1.5 nm, sheets of at least 6000 nm^3; whole tomogram in memory; see README) "
        "(default: the model card's choice, else off; the bundled localizer erases).",
    )


def gold_streaks_option():
    return typer.Option(
        None, "--remove-gold-streaks/--keep-gold-streaks",
        help="Subtract the streaks that gold beads throw across the tomogram before the network: each "
        "bead's (smoothed robust |z| over 20) streaks are fitted as its back-projection, one ray per "
        "tilt with a profile shared along each y row (tilt axis y; the tilt range fitted to the beads), "
        "and subtracted outside the bead (whole tomogram in memory; see README) (default: the model "
        "card's choice, else off).",
    )


def mask_option():
    return typer.Option(
        None, "--mask", help="MRC mask the size of the tomogram: search only where it is nonzero."
    )


def z_range_option():
    return typer.Option(
        None, "--z-range", help="Search only slices Z0 to Z1 (0-based, inclusive).", show_default=False
    )


def table_output_option():
    return typer.Option(
        None, "--output", "-o", help="Output table for a single tomogram (default: <name>.star in --output-dir)."
    )


def table_format_option():
    return typer.Option(
        None, "--format", help="relion4 (default), relion5, csv, shrec, dynamo or imod; with -o, default from its extension."
    )


def postprocess_record(options) -> dict:
    """The post-processing actually used (command line, else model card, else built-in),
    for provenance sidecars."""
    return {
        "threshold": options.threshold, "opening_radius": options.opening_radius,
        "min_size": options.min_size, "min_score": options.min_score, "merge_radius": options.merge_radius,
        "max_centre_gap": options.max_centre_gap, "snap_distance": options.snap_distance,
        "max_component": options.max_component, "drop_thin": options.drop_thin,
        "spare_small": options.spare_small, "drop_gold": options.drop_gold,
        "verify": options.verify, "min_verified": options.min_verified,
    }


def build_localize_options(
    *,
    threshold: float | None = None,
    opening_radius: int | None = None,
    bandwidth: float | None = None,
    particle_diameter: float | None = None,
    min_size: int | None = None,
    min_score: float | None = None,
    max_centre_gap: float | None = None,
    snap_distance: float = DEFAULT_SNAP_DISTANCE,
    max_component: float | None = None,
    drop_thin: bool | None = None,
    spare_small: float | None = None,
    drop_gold: bool | None = None,
    verify: bool | None = None,
    min_verified: float | None = None,
    flips: int | None = None,
    tile: int | None = None,
    halo: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    precision: str = "auto",
    z_range: tuple[int, int] | None = None,
    contrast: str = "auto",
    rescale: bool = True,
    match_spectrum: bool | None = None,
    erase_membranes: bool | None = None,
    remove_gold_streaks: bool | None = None,
):
    """A validated `LocalizeOptions` from CLI values (`device` already resolved)."""
    from vpdetect.localize.pipeline import LocalizeOptions
    from vpdetect.nn.precision import check_precision

    if bandwidth is not None and particle_diameter is not None:
        raise VPDetectError("give --bandwidth or --particle-diameter, not both")
    if bandwidth is not None and bandwidth <= 0:
        raise VPDetectError(f"--bandwidth must be positive, got {bandwidth}")
    if z_range is not None and (z_range[0] is None or z_range[0] > z_range[1] or z_range[0] < 0):
        raise VPDetectError(f"--z-range takes Z0 <= Z1 (0-based slices), got {z_range}")
    precision = check_precision(precision)
    if contrast not in ("dark", "bright", "auto"):
        raise VPDetectError(f"--contrast must be dark, bright or auto, got {contrast!r}")
    return LocalizeOptions(
        threshold=threshold,
        opening_radius=opening_radius,
        bandwidth=bandwidth,
        particle_diameter=particle_diameter,
        min_size=min_size,
        min_score=min_score,
        max_centre_gap=max_centre_gap,
        snap_distance=snap_distance,
        max_component=max_component,
        drop_thin=drop_thin,
        spare_small=spare_small,
        drop_gold=drop_gold,
        verify=verify,
        min_verified=min_verified,
        flips=flips,
        tile=tile,
        halo=halo,
        batch_size=batch_size,
        device=device,
        precision=precision.lower(),
        z_range=tuple(z_range) if z_range is not None else None,
        contrast=contrast,
        rescale=rescale,
        match_spectrum=match_spectrum,
        erase_membranes=erase_membranes,
        remove_gold_streaks=remove_gold_streaks,
    )


# --------------------------------------------------------------------------- one tomogram


@dataclass(frozen=True)
class LocalizeJob:
    """Everything `localize_task` needs besides the input, output and device (picklable)."""

    model_path: str
    options: object  # LocalizeOptions; device filled in per task
    fmt: str | None
    save_map: str | None = None
    save_map_is_dir: bool = False
    mask: str | None = None
    pixel_size: float | None = None
    show_progress: bool = True
    tomograms_star: str | None = None
    coords_pixel_size: float | None = None
    copick: str | None = None
    copick_user: str | None = None
    copick_session: str = "0"


def map_path(job: LocalizeJob, source: Path) -> Path | None:
    from vpdetect.io.mrc import tomogram_name

    if job.save_map is None:
        return None
    if job.save_map_is_dir:
        return Path(job.save_map) / f"{tomogram_name(source)}_map.mrc"
    return Path(job.save_map)


def localize_task(source: Path, output: Path, device: str, job: LocalizeJob) -> dict:
    """Localize one tomogram file and write its table (and map); returns provenance extras."""
    import numpy as np

    from vpdetect.io.mrc import read_roi, read_tomogram, write_mrc
    from vpdetect.io.particles import write_particles
    from vpdetect.localize.pipeline import (
        format_timings,
        model_input,
        particles_from_map,
        segment_volume,
    )
    from vpdetect.nn.engine import kernels_used

    start = time.perf_counter()
    tomo = read_tomogram(source, voxel_size=job.pixel_size)
    model, card = load_stage_model(job.model_path, "localizer", device)
    options = replace(job.options, device=device).with_model_defaults(card)
    roi = read_roi(job.mask, tomo.data.shape) if job.mask is not None else None
    opened = time.perf_counter() - start
    input_timings: dict[str, float] = {}
    prepared = model_input(tomo, card, options, input_timings)

    with progress_bar(job.show_progress) as bar:
        tiles = bar.add_task(f"{tomo.name}: network", total=None)
        prob, timings = segment_volume(
            tomo, model, card, options, progress=lambda done, total: bar.update(tiles, completed=done, total=total),
            prepared=prepared,
        )
    for phase, seconds in input_timings.items():
        timings[phase] = timings.get(phase, 0.0) + seconds
    timings["load"] += opened
    table = particles_from_map(prob, tomo, options, roi, timings, model=model, prepared=prepared)
    bandwidth = table.data.attrs["bandwidth"]
    table = place_in_project(table, tomo, source, load_tomograms(job.tomograms_star))

    start = time.perf_counter()
    saved_map = map_path(job, source)
    if saved_map is not None:
        saved_map.parent.mkdir(parents=True, exist_ok=True)
        if prob.shape != tomo.data.shape:  # computed on the model's grid: back onto the tomogram's
            from vpdetect.resample import linear_resample

            prob = linear_resample(prob, tomo.data.shape)
        small = prob.size <= 64 * 1024**2
        write_mrc(saved_map, np.asarray(prob, dtype=np.float32) if small else prob, voxel_size=tomo.voxel_size)
    try:
        store_in_copick(table, job.copick, job.copick_user, job.copick_session)
        written = write_particles(output, table, fmt=job.fmt, coords_pixel_size=job.coords_pixel_size)
    except BaseException:
        if saved_map is not None:  # a map without its table is not a result
            saved_map.unlink(missing_ok=True)
        raise
    timings["write"] = time.perf_counter() - start
    log.info("%s: %d particle(s) -> %s (%s)", tomo.name, len(table), output, written)
    kernels = {stage: used for stage, net in (("localizer", model),) if (used := kernels_used(net))}
    log.info("%s timings: %s%s", tomo.name, format_timings(timings),
             "".join(f"; {stage} kernel: {used}" for stage, used in kernels.items()))
    return {
        "n_particles": len(table),
        "format": written,
        "shape_xyz": list(tomo.shape_xyz),
        "voxel_size": tomo.voxel_size,
        "bandwidth_voxels": bandwidth,
        "postprocess": postprocess_record(options),
        "test_time_flips": options.flips,
        "halo": options.resolved_halo(model),
        "map": str(saved_map) if saved_map is not None else None,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "kernels": kernels,
    }


# --------------------------------------------------------------------------- command


@app.command()
@user_errors
def localize(
    tomograms: list[str] = typer.Argument(
        None, help="Tomograms (MRC/REC, OME-Zarr .zarr) or globs like 'data/*.mrc' (or --copick)."
    ),
    model: Path = localizer_model_option(),
    output: Path = table_output_option(),
    output_dir: Path = output_dir_option(),
    output_format: str = table_format_option(),
    save_map: Path = typer.Option(
        None, "--save-map",
        help="Write the probability map as MRC: a file for one tomogram, or a folder (<name>_map.mrc each).",
    ),
    mask: Path = mask_option(),
    z_range: tuple[int, int] = z_range_option(),
    threshold: float = threshold_option(),
    opening_radius: int = opening_radius_option(),
    bandwidth: float = bandwidth_option(),
    particle_diameter: float = particle_diameter_option(),
    min_size: int = min_size_option(),
    min_score: float = min_score_option(),
    max_centre_gap: float = max_centre_gap_option(),
    snap_distance: float = snap_distance_option(),
    max_component: float = max_component_option(),
    drop_thin: bool | None = drop_thin_option(),
    spare_small: float | None = spare_small_option(),
    drop_gold: bool | None = drop_gold_option(),
    verify: bool | None = verify_option(),
    min_verified: float | None = min_verified_option(),
    test_time_flips: int = localizer_flips_option(),
    tile: int = tile_option(),
    halo: int = halo_option(),
    batch_size: int = batch_size_option(),
    device: str = device_option(),
    devices: str = devices_option(),
    precision: str = precision_option(),
    pixel_size: float = pixel_size_option(),
    tomograms_star: Path = tomograms_star_option(),
    coords_pixel_size: float = coords_pixel_size_option(),
    contrast: str = contrast_option(),
    rescale: bool = rescale_option(),
    match_spectrum: bool = match_spectrum_option(),
    erase_membranes: bool = erase_membranes_option(),
    remove_gold_streaks: bool = gold_streaks_option(),
    copick: Path = copick_option(),
    run: list[str] = run_option(),
    voxel_spacing: float = voxel_spacing_option(),
    tomo_type: str = tomo_type_option(),
    copick_user: str = copick_user_option(),
    copick_session: str = copick_session_option(),
    overwrite: bool = overwrite_option(),
    shard: str = shard_option(),
    verbose: bool = verbose_option(),
    quiet: bool = quiet_option(),
    log_file: Path = log_file_option(),
) -> None:
    """Find particles: tiled MSDNet segmentation, opening, connected components, mean-shift."""
    settings, resolved_device = start_run(
        verbose=verbose, quiet=quiet, log_file=log_file, device=device, devices=devices
    )
    tomograms = copick_inputs(tomograms, copick, run, voxel_spacing, tomo_type)
    fmt = format_name(output_format) or (None if output is not None else "relion4")
    options = build_localize_options(
        threshold=threshold, opening_radius=opening_radius, bandwidth=bandwidth,
        particle_diameter=particle_diameter, min_size=min_size, min_score=min_score, tile=tile, halo=halo,
        max_centre_gap=max_centre_gap, snap_distance=snap_distance, max_component=max_component,
        drop_thin=drop_thin,
        spare_small=spare_small,
        drop_gold=drop_gold,
        verify=verify,
        min_verified=min_verified,
        flips=test_time_flips,
        batch_size=batch_size, device=resolved_device, precision=precision, z_range=z_range or None,
        contrast=contrast, rescale=rescale, match_spectrum=match_spectrum, erase_membranes=erase_membranes,
        remove_gold_streaks=remove_gold_streaks,
    )
    model_path = resolve_model_path(model, "localizer")
    # A wrong model fails once, before any input (checked on the CPU when workers take the GPUs).
    load_stage_model(model_path, "localizer", "cpu" if devices else resolved_device)
    save_map_is_dir = False
    if save_map is not None:
        n_inputs = len(expand_inputs(tomograms))
        save_map_is_dir = save_map.is_dir() or save_map.suffix == "" or n_inputs > 1
        if save_map_is_dir and save_map.exists() and not save_map.is_dir():
            raise VPDetectError(f"--save-map {save_map} must be a folder when several tomograms are given")
    job = LocalizeJob(
        model_path=str(model_path), options=options, fmt=fmt,
        save_map=str(save_map) if save_map is not None else None, save_map_is_dir=save_map_is_dir,
        mask=str(mask) if mask is not None else None, pixel_size=pixel_size,
        show_progress=not quiet and devices is None,
        tomograms_star=str(tomograms_star) if tomograms_star is not None else None,
        coords_pixel_size=coords_pixel_size,
        copick=str(copick) if copick is not None else None, copick_user=copick_user,
        copick_session=copick_session,
    )
    load_tomograms(tomograms_star)  # a bad tomograms.star fails once, before any input
    if output is not None and fmt is None:
        from vpdetect.io.particles import detect_format

        detect_format(output, for_writing=True)  # an unknown extension fails before hours of work
    parameters = options.as_dict() | {
        "format": fmt, "mask": mask, "save_map": save_map, "pixel_size": pixel_size, "model": model_path,
        "tomograms_star": tomograms_star, "coords_pixel_size": coords_pixel_size,
        "copick": copick, "run": list(run), "voxel_spacing": voxel_spacing, "tomo_type": tomo_type,
        "copick_user": copick_user, "copick_session": copick_session,
    }
    run_command_batch(
        "localize", tomograms, functools.partial(localize_task, job=job),
        output=output, output_dir=output_dir, suffix=FORMAT_SUFFIX[fmt or "relion4"], parameters=parameters,
        models={"localizer": model_path}, device=resolved_device, devices=devices, shard=shard,
        overwrite=overwrite, log_settings=settings,
    )
