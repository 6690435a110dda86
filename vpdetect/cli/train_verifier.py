"""`vpdetect train-verifier`: give a localizer a pick verifier trained on its own picks."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.cli.batch import device_option
from vpdetect.cli.localize import erase_membranes_option, gold_streaks_option, match_spectrum_option

# Measured on the benchmark's validation draws (docs/GENERALIZATION_LOG.md): 0.2 drops most false picks
# on carbon and at an ice gradient's edge and no cell's true ones; 0.3 starts to cost some.
DEFAULT_MIN_SCORE = 0.2


def _folders_candidates(folders, net, card, options, box_size: int, bar, label: str):
    from vpdetect.evaluate.shrec import read_truth
    from vpdetect.io.mrc import read_tomogram
    from vpdetect.train.verifier import tomogram_candidates

    parts = []
    task = bar.add_task(f"{label} candidates", total=len(folders))
    for folder in folders:
        occupancy, truth = read_truth(folder)
        tomo = read_tomogram(folder / "reconstruction.mrc", mmap=False)
        part = tomogram_candidates(tomo, occupancy, truth, net, card, options, box_size)
        parts.append(part)
        console.print(f"{folder}: {len(part.labels)} candidates, {int(part.labels.sum())} on particles")
        bar.advance(task)
    return parts


@app.command("train-verifier")
@user_errors
def train_verifier_command(
    model: Path = typer.Argument(..., help="Localizer model file whose picks the verifier learns to check."),
    data: list[Path] = typer.Option(
        ..., "--data", "-d",
        help="SHREC-layout training folder (reconstruction.mrc, occupancy_mask.mrc, particle_locations.txt); "
        "repeatable. Tomograms unlike the localizer's tuning data teach it most.",
    ),
    val: list[Path] = typer.Option([], "--val", help="SHREC-layout validation folder, for the per-epoch report."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write: the localizer with the verifier."),
    min_score: float = typer.Option(
        DEFAULT_MIN_SCORE, "--min-score", min=0.0, max=1.0,
        help="Least verifier score a pick needs at inference, stored in the card (localize --min-verified overrides).",
    ),
    box_size: int = typer.Option(24, "--box-size", min=8, help="Edge of the verifier's boxes (voxels; multiple of 4)."),
    width: int = typer.Option(16, "--width", min=1, help="Channels of the verifier's first layers."),
    epochs: int = typer.Option(8, "--epochs", min=1, help="Passes over the candidates."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Initial Adam learning rate (cosine decay to 0)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same data and seed give the same verifier on a CPU."),
    match_spectrum: bool = match_spectrum_option(),
    erase_membranes: bool = erase_membranes_option(),
    remove_gold_streaks: bool = gold_streaks_option(),
    device: str = device_option(),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: torch's choice)."),
    time_limit: float = typer.Option(
        None, "--time-limit", min=0.0, help="Stop training after this many minutes (the epochs done are kept)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
) -> None:
    """Train a pick verifier on the localizer's own picks and store it in a copy of the localizer.

    The localizer picks every --data tomogram at its card's threshold, at 0.3, and at its threshold
    with small components left unopened; each pick is labelled true or false by the SHREC hit rule, and a small 3D CNN learns to tell them apart
    from a box of the tomogram (as the localizer sees it) and of its map. `localize` and `pick`
    with the written model then drop picks the verifier scores under --min-score (--no-verify
    keeps them). The verifier reads this localizer's map: retrain it after retraining the localizer.
    """
    import torch

    from vpdetect import __version__
    from vpdetect.cli.batch import resolve_device
    from vpdetect.cli.localize import build_localize_options
    from vpdetect.cli.logs import progress_bar
    from vpdetect.errors import VPDetectError
    from vpdetect.io.atomic import check_output_dir
    from vpdetect.nn.checkpoint import load_model, save_model
    from vpdetect.nn.verifier import check_box_size
    from vpdetect.train.loop import hardware_description
    from vpdetect.train.verifier import Candidates, candidate_settings, train_verifier

    try:
        check_box_size(box_size)
    except ValueError as exc:
        raise VPDetectError(f"--box-size: {exc}") from None
    if out.exists() and not overwrite:
        raise VPDetectError(f"{out} exists: pass --overwrite to replace it")
    check_output_dir(out.parent)
    for folder in [*data, *val]:
        for name in ("reconstruction.mrc", "occupancy_mask.mrc", "particle_locations.txt"):
            if not (folder / name).is_file():
                raise VPDetectError(f"{folder}: no {name} (a SHREC-layout folder is needed)")
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    net, card = load_model(model, stage="localizer", device=device)
    if hasattr(net, "verifier"):
        del net.verifier  # replaced below; candidates are the localizer's picks without it
    options = build_localize_options(device=device, match_spectrum=match_spectrum, erase_membranes=erase_membranes,
                                     remove_gold_streaks=remove_gold_streaks)
    options = options.with_model_defaults({k: v for k, v in card.items() if k != "verifier"})
    start = time.perf_counter()
    with progress_bar() as bar:
        train_parts = _folders_candidates(data, net, card, options, box_size, bar, "training")
        val_parts = _folders_candidates(val, net, card, options, box_size, bar, "validation")
    train_set = Candidates.concatenate(train_parts)
    val_set = Candidates.concatenate(val_parts) if val_parts else None
    n_true = int(train_set.labels.sum())
    console.print(f"{len(train_set.labels)} training candidates ({n_true} true, {len(train_set.labels) - n_true} false) "
                  f"in {time.perf_counter() - start:.0f} s; training the verifier ...")
    if n_true in (0, len(train_set.labels)):
        raise VPDetectError("the localizer's picks on --data are all true or all false: the verifier needs both "
                            "(add tomograms where it makes mistakes)")

    def report(row: dict) -> None:
        extra = (f", val AUC {row['val_auc']:.3f}, false dropped {row['val_false_dropped']:.2f}, "
                 f"true kept {row['val_true_kept']:.3f}" if "val_auc" in row else "")
        console.print(f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.3f}{extra} ({row['seconds']:.0f} s)")

    verifier, history = train_verifier(
        train_set, val_set, width=width, epochs=epochs, lr=lr, seed=seed, min_score=min_score, device=device,
        time_limit_s=None if time_limit is None else 60.0 * time_limit, on_epoch=report,
    )
    net = net.cpu()
    net.verifier = verifier
    card = dict(card)
    card["verifier"] = {
        "min_score": float(min_score),
        "provenance": {
            "data": [str(p) for p in data], "val": [str(p) for p in val], "seed": seed, "epochs": len(history),
            "epochs_planned": epochs, "lr": lr, "candidates": len(train_set.labels), "true_candidates": n_true,
            "candidate_settings": candidate_settings(options),
            "wall_time_s": round(time.perf_counter() - start, 1),
            "hardware": hardware_description(torch.device(device), 1), "vpdetect_version": __version__,
        },
        "metrics": history[-1],
    }
    save_model(out, net, card, half_weights=card.get("weights_storage") == "float16")
    console.print(f"wrote {out}: picks scoring under {min_score:g} are dropped by default")
