"""`vpdetect evaluate`: SHREC localization and classification metrics against ground truth."""

from __future__ import annotations

from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.errors import VPDetectError


@app.command()
@user_errors
def evaluate(
    predictions: Path = typer.Argument(..., metavar="PRED", help="Predicted particles (.star, .csv or SHREC .txt)."),
    truth: Path = typer.Option(
        ..., "--truth",
        help="SHREC model folder with occupancy_mask.mrc and particle_locations.txt "
        "(and simulation.json for size groups of simulated classes).",
    ),
    json_path: Path = typer.Option(None, "--json", help="Write the metrics to this JSON file."),
    plot: Path = typer.Option(None, "--plot", help="Write the confusion matrix to this PNG file."),
    input_format: str = typer.Option(
        None, "--format", help="Format of PREDICTIONS (relion4, relion5, csv, shrec); default: detected."
    ),
    pixel_size: float = typer.Option(
        None, "--pixel-size", help="Voxel size in Angstrom of the predictions, overriding the file."
    ),
) -> None:
    """Score picks with the SHREC'21 protocol: RR TP FP FN MH RO AD, precision, recall, F1, per-class F1."""
    import json

    from vpdetect.evaluate.report import print_evaluation
    from vpdetect.evaluate.shrec import evaluate_picks, read_size_groups, read_truth
    from vpdetect.io.atomic import atomic_path, check_output_dir, write_text_atomic
    from vpdetect.io.particles import read_particles

    if plot is not None and plot.suffix.lower() != ".png":
        raise VPDetectError(f"--plot writes PNG; name the file .png, got {plot.name}")
    for output in (json_path, plot):
        if output is not None:
            check_output_dir(output.parent)
    occupancy, truth_table = read_truth(truth)
    groups = read_size_groups(truth)
    shape_xyz = tuple(int(v) for v in occupancy.shape[::-1])
    pred = read_particles(predictions, fmt=input_format, voxel_size=pixel_size, tomo_size=shape_xyz)
    if "tomo_name" in pred.data.columns and pred.data["tomo_name"].nunique() > 1:
        raise VPDetectError(
            f"{predictions} holds particles of {pred.data['tomo_name'].nunique()} tomograms; "
            "evaluate one tomogram's picks against its truth folder at a time"
        )
    result = evaluate_picks(pred, occupancy, truth_table, size_groups=groups)

    # Render everything before writing anything, so a failure leaves no partial output.
    png = None
    if plot is not None:
        if not result["classification"]:
            raise VPDetectError("--plot needs class names in the predictions (none found)")
        from vpdetect.evaluate.plots import confusion_figure, figure_png

        png = figure_png(confusion_figure(result["classification"]["confusion"]))
    text = json.dumps(result, indent=2, allow_nan=False) + "\n" if json_path is not None else None

    print_evaluation(console, result, label=predictions.name)
    if text is not None:
        write_text_atomic(json_path, text)
        console.print(f"metrics written to {json_path}")
    if png is not None:
        with atomic_path(plot) as tmp:
            tmp.write_bytes(png)
        console.print(f"confusion matrix written to {plot}")
