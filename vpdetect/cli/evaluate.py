"""`vpdetect evaluate`: SHREC'21 or CZII metrics of picks against ground truth, one or many tomograms."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.cli.copick_options import truth_user_option
from vpdetect.errors import VPDetectError

METRICS = ("shrec", "czii")


@app.command()
@user_errors
def evaluate(
    predictions: list[Path] = typer.Argument(
        ..., metavar="PRED",
        help="Predicted particles (.star, .csv or SHREC .txt), one or more files; a table of several "
        "tomograms is split by tomogram name.",
    ),
    truth: list[Path] = typer.Option(
        ..., "--truth",
        help="Ground truth (repeatable): a SHREC model folder (occupancy_mask.mrc, particle_locations.txt, "
        "simulation.json), a folder of them, a particle table, or a copick project (its config .json; "
        "needs --pixel-size, the picks' voxel spacing). Paired with PRED by tomogram name (copick: run).",
    ),
    truth_user: str = truth_user_option(),
    metric: str = typer.Option(
        None, "--metric",
        help="shrec (SHREC'21 protocol, needs SHREC folders) or czii (CZII challenge); "
        "default: shrec for SHREC folders, czii for particle tables.",
    ),
    radius: list[str] = typer.Option(
        [], "--radius",
        help="czii: particle radius in Angstrom, NAME=A (repeatable) or A for every class; "
        "default for simulated data: the radii in simulation.json.",
    ),
    weight: list[str] = typer.Option(
        [], "--weight", help="czii: weight of a class in the score, NAME=W (repeatable) or W for every class; default 1."
    ),
    beta: float = typer.Option(4.0, "--beta", help="czii: beta of the per-class F-beta (recall weighs beta^2 times more)."),
    distance_multiplier: float = typer.Option(
        0.5, "--distance-multiplier", help="czii: a prediction matches a reference within this times the radius."
    ),
    context: list[str] = typer.Option(
        [], "--context",
        help="A class that is context, not a target (repeatable; replaces the default, vesicle; '' for none): its true "
        "particles are not scored, a pick on one is a false positive, predictions labelled with it are "
        "ignored. SHREC'21 scores gold beads (class fiducial); --context vesicle --context fiducial scores "
        "them as context, as vpdetect's default localizer treats them.",
    ),
    json_path: Path = typer.Option(None, "--json", help="Write the metrics (each tomogram and the total) to this JSON file."),
    plot: Path = typer.Option(None, "--plot", help="shrec: write the confusion matrix to this PNG file."),
    confusion_csv_path: Path = typer.Option(
        None, "--confusion-csv", help="shrec: write the confusion matrix with full class names to this CSV file."
    ),
    input_format: str = typer.Option(
        None, "--format", help="Format of PRED (relion4, relion5, csv, shrec, dynamo, imod); default: detected."
    ),
    pixel_size: float = typer.Option(
        None, "--pixel-size",
        help="Voxel size in Angstrom of PRED (overriding the files), and of truth tables that state none.",
    ),
) -> None:
    """Score picks with the SHREC'21 protocol (RR TP FP FN MH RO AD, F1, per-class F1) or the CZII metric."""
    import json

    from vpdetect.io.atomic import atomic_path, check_output_dir, write_text_atomic

    if metric is not None and metric not in METRICS:
        raise VPDetectError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise VPDetectError(f"--plot writes PNG; name the file .png, got {plot.name}")
    for output in (json_path, plot, confusion_csv_path):
        if output is not None:
            check_output_dir(output.parent)

    truths, folders = _read_truths(truth, pixel_size, truth_user)
    if metric is None:
        metric = "shrec" if all(f is not None for f in folders) else "czii"
    if metric == "shrec" and any(f is None for f in folders):
        table = next(t.source for t, f in zip(truths, folders, strict=True) if f is None)
        raise VPDetectError(
            f"the SHREC metric needs an occupancy mask, but {table} is a particle table: "
            "give SHREC folders as --truth, or use --metric czii"
        )
    if metric == "czii" and (plot is not None or confusion_csv_path is not None):
        raise VPDetectError("--plot and --confusion-csv show the SHREC confusion matrix: use them with --metric shrec")
    preds = _read_predictions(predictions, input_format, pixel_size, truths)

    from vpdetect.evaluate.pairing import pair_by_name
    from vpdetect.io.particles import ParticleTable

    paired = pair_by_name(preds, truths)
    missing = [t.name for t, p in zip(truths, paired, strict=True) if p is None]
    if missing:
        warnings.warn(f"no predictions for truth tomogram(s) {', '.join(missing)}: counted as all missed",
                      stacklevel=1)
    pred_tables = [p.table if p is not None else ParticleTable.from_arrays([], class_name=[]) for p in paired]
    names = [t.name for t in truths]
    from vpdetect.evaluate.shrec import UNSCORED_CLASSES

    context_classes = sorted({name.strip() for name in context if name.strip()}) if context else sorted(UNSCORED_CLASSES)
    if metric == "shrec":
        per, total = _shrec(pred_tables, folders, context_classes)
    else:
        per, total = _czii(pred_tables, truths, folders, radius, weight, beta, distance_multiplier, pixel_size,
                           context_classes)
    per_tomogram = dict(zip(names, per, strict=True))
    empty = [name for name, result in per_tomogram.items() if result.get("localization", {}).get("n_particles") == 0]
    if empty:
        warnings.warn(f"truth tomogram(s) {', '.join(empty)} list no scored particle: their recall and F1 are "
                      "undefined (reported as 0)", stacklevel=1)

    # Render everything before writing anything, so a failure leaves no partial output.
    png = csv_text = None
    if plot is not None or confusion_csv_path is not None:
        if not total["classification"]:
            raise VPDetectError("--plot and --confusion-csv need class names in the predictions (none found)")
        confusion = total["classification"]["confusion"]
        if plot is not None:
            from vpdetect.evaluate.plots import confusion_figure, figure_png

            png = figure_png(confusion_figure(confusion))
        if confusion_csv_path is not None:
            from vpdetect.evaluate.report import confusion_csv

            csv_text = confusion_csv(confusion)
    record = {"metric": metric, "context_classes": context_classes, **total, "tomograms": per_tomogram}
    text = json.dumps(record, indent=2, allow_nan=False) + "\n" if json_path is not None else None

    from vpdetect.evaluate.report import print_czii, print_shrec

    (print_shrec if metric == "shrec" else print_czii)(console, per_tomogram, total)
    if context:
        console.print(f"context, not scored: {', '.join(context_classes) or 'none'}")
    if text is not None:
        write_text_atomic(json_path, text)
        console.print(f"metrics written to {json_path}")
    if csv_text is not None:
        write_text_atomic(confusion_csv_path, csv_text)
        console.print(f"confusion matrix written to {confusion_csv_path}")
    if png is not None:
        with atomic_path(plot) as tmp:
            tmp.write_bytes(png)
        console.print(f"confusion matrix drawn in {plot}")


def _read_truths(paths: list[Path], pixel_size: float | None, copick_user: str | None = None):
    """Truth tomograms (pairing.Tomogram) and, for each, its SHREC folder or None (a table)."""
    from vpdetect.evaluate.pairing import Tomogram, split_by_tomogram
    from vpdetect.io.particles import read_particles
    from vpdetect.io.shrec import read_simulation_record, read_truth_table, shrec_folders

    truths: list = []
    folders: list[Path | None] = []
    for path in paths:
        if path.is_dir():
            for folder in shrec_folders(path):
                truths.append(Tomogram(read_truth_table(folder), (folder.name,), str(folder)))
                folders.append(folder)
        elif path.is_file() and path.suffix.lower() == ".json":
            from vpdetect.io.particles.copick_picks import open_copick, read_copick_picks

            if pixel_size is None:
                raise VPDetectError(f"copick truth {path} needs --pixel-size (the voxel spacing of PRED)")
            table = read_copick_picks(open_copick(path), pixel_size, user_id=copick_user)
            truths += split_by_tomogram(table, path)
            folders += [None] * (len(truths) - len(folders))
        elif path.is_file():
            table = read_particles(path)
            if table.voxel_size is None:
                record = read_simulation_record(path.parent) or {}
                table.voxel_size = record.get("voxel_size_angstrom") or pixel_size
            for part in split_by_tomogram(table, path):
                truths.append(part)
                folders.append(None)
        else:
            raise VPDetectError(f"truth not found (a SHREC folder or a particle table): {path}")
    return truths, folders


def _read_predictions(paths: list[Path], fmt: str | None, pixel_size: float | None, truths: list):
    from vpdetect.evaluate.pairing import split_by_tomogram
    from vpdetect.io.particles import read_particles

    # RELION 5 tables without a tomogram size are centred on the truth's, when all truths share one.
    sizes = {t.table.tomo_size for t in truths}
    size = sizes.pop() if len(sizes) == 1 else None
    preds = []
    for path in paths:
        try:
            table = read_particles(path, fmt=fmt, voxel_size=pixel_size, tomo_size=size)
        except VPDetectError as exc:
            if path.is_dir():  # most likely a second truth folder after one --truth
                raise VPDetectError(f"{exc} (PRED); give each truth folder its own --truth") from None
            raise
        preds += split_by_tomogram(table, path)
    return preds


def _shrec(pred_tables: list, folders: list[Path], context: list[str]):
    from vpdetect.evaluate.shrec import (
        combine_results,
        evaluate_picks,
        merge_size_groups,
        read_size_groups,
        read_truth,
    )

    groups: dict = {}
    for folder in folders:
        groups = merge_size_groups(groups, read_size_groups(folder))
    per = []
    for pred, folder in zip(pred_tables, folders, strict=True):
        occupancy, truth_table = read_truth(folder)
        per.append(evaluate_picks(pred, occupancy, truth_table, size_groups=groups, context=context))
    return per, combine_results(per, groups)


def _czii(pred_tables, truths, folders, radius, weight, beta, distance_multiplier, pixel_size, context):
    from vpdetect.cli.options import parse_class_values
    from vpdetect.evaluate.czii import evaluate_czii, radii_from_simulation, truth_classes
    from vpdetect.io.shrec import read_simulation_record

    default_radius, radii = parse_class_values(radius, "--radius")
    default_weight, weights = parse_class_values(weight, "--weight", allow_zero=True)
    if default_radius is None:  # a radius for every class replaces the simulator's
        simulated: dict[str, float] = {}
        for t, folder in zip(truths, folders, strict=True):
            record = read_simulation_record(folder if folder is not None else Path(t.source).parent)
            if record is not None:
                simulated.update(radii_from_simulation(record))
        radii = {**simulated, **radii}
    pairs = []
    for pred, t in zip(pred_tables, truths, strict=True):
        truth_table = t.table
        if pred.voxel_size is None:
            pred.voxel_size = truth_table.voxel_size
        if truth_table.voxel_size is None:
            truth_table.voxel_size = pixel_size or pred.voxel_size
        pairs.append((pred, truth_table))
    known = {k.strip().lower() for k in truth_classes([t for _, t in pairs], context)}
    for option, given in (("--radius", radius), ("--weight", weight)):
        named = [s.rpartition("=")[0].strip() for s in given if "=" in s]
        unknown = [n for n in named if n.lower() not in known]
        if unknown:
            warnings.warn(f"{option} names class(es) the truth does not hold: {', '.join(unknown)}", stacklevel=1)
    results, total = evaluate_czii(
        pairs, radii, weights, beta=beta, distance_multiplier=distance_multiplier,
        default_radius=default_radius, default_weight=1.0 if default_weight is None else default_weight,
        context=context,
    )
    return [{"czii": r} for r in results], {"czii": total}
