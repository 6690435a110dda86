"""`vpdetect pick`: both stages in one process, each tomogram read once."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import typer

from vpdetect.cli.app import app, user_errors
from vpdetect.cli.batch import (
    FORMAT_SUFFIX,
    device_option,
    devices_option,
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
from vpdetect.cli.classify import (
    class_summary,
    drop_unknown_option,
    flips_option,
    search_radius_option,
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
from vpdetect.cli.localize import (
    bandwidth_option,
    batch_size_option,
    build_localize_options,
    contrast_option,
    drop_gold_option,
    drop_thin_option,
    erase_membranes_option,
    gold_streaks_option,
    halo_option,
    localizer_flips_option,
    mask_option,
    match_spectrum_option,
    max_centre_gap_option,
    max_component_option,
    min_score_option,
    min_size_option,
    min_verified_option,
    opening_radius_option,
    particle_diameter_option,
    pixel_size_option,
    postprocess_record,
    precision_option,
    rescale_option,
    snap_distance_option,
    spare_small_option,
    table_format_option,
    table_output_option,
    threshold_option,
    tile_option,
    verify_option,
    z_range_option,
)

log = logging.getLogger("vpdetect.pick")

@dataclass(frozen=True)
class PickJob:
    """Everything `pick_task` needs besides the input, output and device (picklable for --devices)."""

    localizer_path: str
    classifier_path: str
    localize_options: object  # LocalizeOptions; device filled in per task
    classify_options: object  # ClassifyOptions
    fmt: str | None
    mask: str | None = None
    pixel_size: float | None = None
    show_progress: bool = True
    tomograms_star: str | None = None
    coords_pixel_size: float | None = None
    copick: str | None = None
    copick_user: str | None = None
    copick_session: str = "0"


def pick_task(source: Path, output: Path, device: str, job: PickJob) -> dict:
    """Localize and classify one tomogram file, write its table; returns provenance extras."""
    from vpdetect.classify.pipeline import classify_table, most_confident_first, with_empty_classes
    from vpdetect.io.mrc import read_roi, read_tomogram
    from vpdetect.io.particles import write_particles
    from vpdetect.localize.pipeline import (
        CLEANING_PHASES,
        NORMALISATION,
        format_timings,
        model_input,
        particles_from_map,
        segment_volume,
        tomogram_stats,
    )
    from vpdetect.nn.engine import kernels_used

    start = time.perf_counter()
    tomo = read_tomogram(source, voxel_size=job.pixel_size)
    localizer, localizer_card = load_stage_model(job.localizer_path, "localizer", device)
    classifier, classifier_card = load_stage_model(job.classifier_path, "classifier", device)
    roi = read_roi(job.mask, tomo.data.shape) if job.mask is not None else None
    options = replace(job.localize_options, device=device).with_model_defaults(localizer_card)
    input_timings: dict[str, float] = {}
    prepared = model_input(tomo, localizer_card, options, input_timings)
    # One pass over the tomogram serves both stages when they normalise alike on the same grid.
    method = classifier_card.get("normalisation", NORMALISATION)
    if (prepared.scale_zyx is None and method == localizer_card.get("normalisation", NORMALISATION)
            and not localizer_card.get("background_sigma")):
        stats = (prepared.centre, abs(prepared.scale))
    else:
        stats = tomogram_stats(tomo.data, method)
    # The input's cleaning steps are phases of their own, not part of "load".
    cleaning = {phase: seconds for phase, seconds in input_timings.items() if phase in CLEANING_PHASES}
    opened = time.perf_counter() - start - sum(cleaning.values())

    with progress_bar(job.show_progress) as bar:
        tiles = bar.add_task(f"{tomo.name}: localize", total=None)
        prob, timings = segment_volume(
            tomo, localizer, localizer_card, options,
            progress=lambda done, total: bar.update(tiles, completed=done, total=total), prepared=prepared,
        )
        timings["load"] += opened
        timings.update(cleaning)
        found = particles_from_map(prob, tomo, options, roi, timings, model=localizer, prepared=prepared)
        bandwidth = found.data.attrs["bandwidth"]
        del prob  # the map can be large; stage 2 needs only the coordinates
        if len(found):
            boxes = bar.add_task(f"{tomo.name}: classify", total=len(found))
            table = most_confident_first(classify_table(
                tomo, found, classifier, classifier_card, job.classify_options, stats=stats,
                progress=lambda n: bar.advance(boxes, n), timings=timings,
            ))
        else:
            table = with_empty_classes(found)

    start = time.perf_counter()
    table = place_in_project(table, tomo, source, load_tomograms(job.tomograms_star))
    store_in_copick(table, job.copick, job.copick_user, job.copick_session)
    written = write_particles(output, table, fmt=job.fmt, coords_pixel_size=job.coords_pixel_size)
    timings["write"] = time.perf_counter() - start
    counts = table.data["class_name"].value_counts().to_dict()
    log.info("%s: %s -> %s (%s)", tomo.name, class_summary(table.data), output, written)
    kernels = {stage: used for stage, net in (("localizer", localizer), ("classifier", classifier)) if (used := kernels_used(net))}
    log.info("%s timings: %s%s", tomo.name, format_timings(timings),
             "".join(f"; {stage} kernel: {used}" for stage, used in kernels.items()))
    return {
        "n_particles": len(table),
        "classes": {str(k): int(v) for k, v in counts.items()},
        "format": written,
        "shape_xyz": list(tomo.shape_xyz),
        "voxel_size": tomo.voxel_size,
        "bandwidth_voxels": bandwidth,
        "postprocess": postprocess_record(options),
        "localizer_flips": options.flips,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "kernels": kernels,
    }


@app.command()
@user_errors
def pick(
    tomograms: list[str] = typer.Argument(
        None, help="Tomograms (MRC/REC, OME-Zarr .zarr) or globs like 'data/*.mrc' (or --copick)."
    ),
    localizer: Path = typer.Option(
        None, "--localizer", help="Localizer model file (.pt); default: the bundled localizer."
    ),
    classifier: Path = typer.Option(
        None, "--classifier", help="Classifier model file (.pt); default: the bundled classifier."
    ),
    output: Path = table_output_option(),
    output_dir: Path = output_dir_option(),
    output_format: str = table_format_option(),
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
    localizer_flips: int = localizer_flips_option("--localizer-flips"),
    tile: int = tile_option(),
    halo: int = halo_option(),
    batch_size: int = batch_size_option(),
    search_radius: float = search_radius_option(),
    test_time_flips: int = flips_option(),
    drop_unknown: bool = drop_unknown_option(),
    box_batch_size: int = typer.Option(
        None, "--box-batch-size", min=1,
        help="Subtomograms per classifier call (default 8 for an MSDNet, 64 for a whole-box classifier).",
    ),
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
    """Localize and classify: coordinates, scores and a class per particle, one table per tomogram
    (particles with a class first, most confident first; then unknown / non-particle ones)."""
    from vpdetect.classify.pipeline import ClassifyOptions

    settings, resolved_device = start_run(
        verbose=verbose, quiet=quiet, log_file=log_file, device=device, devices=devices
    )
    tomograms = copick_inputs(tomograms, copick, run, voxel_spacing, tomo_type)
    fmt = format_name(output_format) or (None if output is not None else "relion4")
    localize_options = build_localize_options(
        threshold=threshold, opening_radius=opening_radius, bandwidth=bandwidth,
        particle_diameter=particle_diameter, min_size=min_size, min_score=min_score, tile=tile, halo=halo,
        max_centre_gap=max_centre_gap, snap_distance=snap_distance, max_component=max_component,
        drop_thin=drop_thin,
        spare_small=spare_small,
        drop_gold=drop_gold,
        verify=verify,
        min_verified=min_verified,
        flips=localizer_flips,
        batch_size=batch_size, device=resolved_device, precision=precision, z_range=z_range or None,
        contrast=contrast, rescale=rescale, match_spectrum=match_spectrum, erase_membranes=erase_membranes,
        remove_gold_streaks=remove_gold_streaks,
    )
    classify_options = ClassifyOptions(
        batch_size=box_batch_size, search_radius=search_radius, drop_unknown=drop_unknown,
        precision=precision.lower(), flips=test_time_flips,
    )
    localizer_path = resolve_model_path(localizer, "localizer")
    classifier_path = resolve_model_path(classifier, "classifier")
    # A wrong model fails once, before any input (checked on the CPU when workers take the GPUs).
    load_stage_model(localizer_path, "localizer", "cpu" if devices else resolved_device)
    load_stage_model(classifier_path, "classifier", "cpu" if devices else resolved_device)
    job = PickJob(
        localizer_path=str(localizer_path), classifier_path=str(classifier_path),
        localize_options=localize_options, classify_options=classify_options, fmt=fmt,
        mask=str(mask) if mask is not None else None, pixel_size=pixel_size,
        show_progress=not quiet and devices is None,
        tomograms_star=str(tomograms_star) if tomograms_star is not None else None,
        coords_pixel_size=coords_pixel_size,
        copick=str(copick) if copick is not None else None, copick_user=copick_user,
        copick_session=copick_session,
    )
    load_tomograms(tomograms_star)  # a bad tomograms.star fails once, before any input
    parameters = localize_options.as_dict() | {
        "classify": asdict(classify_options), "format": fmt, "mask": mask, "pixel_size": pixel_size,
        "tomograms_star": tomograms_star, "coords_pixel_size": coords_pixel_size,
        "copick": copick, "run": list(run), "voxel_spacing": voxel_spacing, "tomo_type": tomo_type,
        "copick_user": copick_user, "copick_session": copick_session,
    }
    run_command_batch(
        "pick", tomograms, functools.partial(pick_task, job=job),
        output=output, output_dir=output_dir, suffix=FORMAT_SUFFIX[fmt or "relion4"], parameters=parameters,
        models={"localizer": localizer_path, "classifier": classifier_path}, device=resolved_device,
        devices=devices, shard=shard, overwrite=overwrite, log_settings=settings,
    )
