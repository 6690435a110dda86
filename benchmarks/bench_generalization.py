"""Out-of-distribution benchmark (issue 12 item 1): does the localizer find particles in
tomograms that do not look like its training data?

    python -m benchmarks generalization [--model PATH] [--cells TEXT ...] [--quick] [--json OUT] [--fresh]
                                        [--validation | --seeds SEED ...]

A grid of tomograms, each differing from a base cell along one axis (and a few
combinations), from two simulators:
- `benchmarks/independent_sim.py`: code that did not make the training data
  (test-only particle shapes, scikit-image radon/iradon, own CTF; the SNR is
  the particles' own, so context cells show a higher whole-volume SNR). Base cell:
  128 x 128 x 64 voxels at 1 nm, SNR 0.5, dark particles, defocus 3 um, tilts
  +-60 step 3, ramp filter, moderate crowding, no context. Seed 9000 for every
  cell, so that cells differing only in imaging share one scene.
- vpdetect's own simulator on held-out seeds, as a user runs it:
  `vpdetect simulate DIR --preset shrec21 --shape 160 160 64 --slab-thickness 48
  --seed 9001 --snr S` (S = 0.1, 0.5, 4), and the same contrast-inverted.
Test seeds are 9000-9999: never used to train or tune vpdetect's models.
`--validation` draws every cell again with seeds 9100 (independent) and 9101
(vpdetect), kept apart under .bench/generalization-validation/: the grid on
which a default may be chosen, so that the reported grid stays a test. `--seeds`
draws the selected cells on more seeds (under .bench/generalization-draws/seedN/),
e.g. the 18 design gold tomograms of the README: `--cells gold --seeds 9100 9200
9300 9400 9500 9600 9700 9800 9900`.

Every cell: the localizer run as a user runs it (`vpdetect localize TOMO.mrc -o
picks.csv`, in-process, default options, the MRC's header carrying the voxel
size), scored with the SHREC rules as `vpdetect evaluate` scores (read_truth,
read_particles, evaluate_picks), beside a difference-of-Gaussians baseline that
is told the true particle count, the polarity and the particles' median size.

Tomograms and truth are kept in SHREC folders under .bench/generalization/<cell>/
and reused when their recipe (parameters, seed, simulator source) is unchanged,
so rerunning with another model costs only the localizer; `--fresh` re-simulates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from benchmarks.independent_sim import IndependentParams, simulate, with_changes

INDEPENDENT_SEED = 9000
VPDETECT_SEED = 9001
# The same cells drawn again, for choosing defaults without looking at the reported grid.
VALIDATION_SEEDS = (9100, 9101)
WORK_DIR = Path(".bench/generalization")
DEFAULT_JSON = Path(".bench/generalization.json")
VPDETECT_SHAPE = (160, 160, 64)
VPDETECT_SLAB = 48
QUICK_CELLS = ("base", "snr=0.05", "contrast=bright", "vpdetect snr=0.5")


@dataclass(frozen=True)
class Cell:
    name: str
    axis: str
    value: str
    source: str  # "independent" or "vpdetect"
    params: IndependentParams | None = None
    vpdetect_snr: float | None = None
    inverted: bool = False
    seed: int = INDEPENDENT_SEED
    notes: dict = field(default_factory=dict)


def grid(validation: bool = False) -> list[Cell]:
    """The benchmark's cells, base first; with `validation`, on the validation seeds."""
    independent_seed, vpdetect_seed = VALIDATION_SEEDS if validation else (INDEPENDENT_SEED, VPDETECT_SEED)
    base = IndependentParams()
    cells = [Cell("base", "base", "-", "independent", base, seed=independent_seed)]

    def one(axis: str, value, label: str | None = None, **changes) -> None:
        label = str(value) if label is None else label
        cells.append(Cell(f"{axis}={label}", axis, label, "independent", with_changes(base, **changes),
                          seed=independent_seed))

    for snr in (0.02, 0.05, 0.1, 0.25, 1.0, 4.0):
        one("snr", snr, f"{snr:g}", snr=snr)
    one("contrast", "bright", contrast="bright")
    for defocus in (1.0, 6.0):
        one("defocus_um", defocus, f"{defocus:g}", defocus_um=defocus)
    for tilt in (40.0, 55.0, 70.0):
        one("tilt", tilt, f"+-{tilt:g}", tilt_range=(-tilt, tilt))
    # A lamella milled at a pre-tilt is imaged over a range off centre: its missing wedge and
    # every gold bead's streaks lose their mirror symmetry across the beam axis.
    one("tilt", "-50..+66", tilt_range=(-50.0, 66.0))
    # Same particles in nm at another voxel size: 0.5x / 2x their base size in voxels.
    one("size", "0.5x", "0.5x (2 nm voxels)", voxel_nm=2.0)
    one("size", "2x", "2x (0.5 nm voxels)", voxel_nm=0.5, shape_xyz=(160, 160, 96))
    for crowding in ("sparse", "dense"):
        one("crowding", crowding, crowding=crowding)
    for context in ("membranes", "gold", "carbon", "ice_gradient"):
        one("context", context, context=(context,))
    # Particles touching the membranes as well as free ones (the thin-structure filter must keep them).
    one("context", "membranes+proteins", context=("membranes", "membrane_proteins"))
    one("filter", "hann", filter_name="hann")
    combos = [
        ("bright+snr0.1+gold", dict(contrast="bright", snr=0.1, context=("gold",))),
        ("dense+membranes+defocus6", dict(crowding="dense", context=("membranes",), defocus_um=6.0)),
        ("2x+snr0.1+ice_gradient", dict(voxel_nm=0.5, shape_xyz=(160, 160, 96), snr=0.1,
                                        context=("ice_gradient",))),
    ]
    for label, changes in combos:
        cells.append(Cell(f"combo={label}", "combination", label, "independent", with_changes(base, **changes),
                          seed=independent_seed))
    for snr in (0.1, 0.5, 4.0):
        for inverted in (False, True):
            label = f"snr={snr:g}" + (" inverted" if inverted else "")
            cells.append(Cell(f"vpdetect {label}", "vpdetect simulator", label, "vpdetect",
                              vpdetect_snr=snr, inverted=inverted, seed=vpdetect_seed))
    return cells


def draws(cells: list[Cell], seeds: Sequence[int]) -> list[Cell]:
    """Every cell drawn again on each of `seeds` (independent cells with the seed, vpdetect cells
    with seed + 1, as the test and validation grids pair them), seed by seed."""
    for seed in seeds:
        if not 9000 <= seed <= 9998:
            raise ValueError(f"seed {seed} is outside 9000-9998, the seeds kept for testing")
    return [replace(c, seed=seed if c.source == "independent" else seed + 1) for seed in seeds for c in cells]


def select_cells(cells: list[Cell], patterns: Sequence[str] | str | None, quick: bool) -> list[Cell]:
    """The cells to run: the quick ones if asked, and those whose name contains any of `patterns`."""
    if quick:
        cells = [c for c in cells if c.name in QUICK_CELLS]
    if patterns:
        texts = [patterns] if isinstance(patterns, str) else list(patterns)
        cells = [c for c in cells if any(text in c.name for text in texts)]
    return cells


# --------------------------------------------------------------------------- tomograms on disk


def _source_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _folder_name(cell: Cell) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cell.name)


def _recipe(cell: Cell) -> dict:
    here = Path(__file__).parent
    if cell.source == "independent":
        return {"source": "independent", "params": cell.params.to_dict(), "seed": cell.seed,
                "code": _source_digest([here / "independent_sim.py"])}
    import vpdetect.simulate

    code = _source_digest(list(Path(vpdetect.simulate.__file__).parent.glob("*.py")))
    return {"source": "vpdetect", "command": vpdetect_command(cell), "inverted": cell.inverted, "code": code}


def vpdetect_command(cell: Cell) -> list[str]:
    x, y, z = VPDETECT_SHAPE
    return ["simulate", "{out}", "--preset", "shrec21", "--shape", str(x), str(y), str(z),
            "--slab-thickness", str(VPDETECT_SLAB), "--seed", str(cell.seed), "--snr", f"{cell.vpdetect_snr:g}"]


def _write_truth(folder: Path, occupancy: np.ndarray, centres_xyz: np.ndarray, names: list[str],
                 voxel_size: float) -> None:
    from vpdetect.io.mrc import write_mrc
    from vpdetect.io.particles import ParticleTable, write_particles

    write_mrc(folder / "occupancy_mask.mrc", occupancy, voxel_size)
    table = ParticleTable.from_arrays(centres_xyz, voxel_size=voxel_size, class_name=names)
    write_particles(folder / "particle_locations.txt", table, fmt="shrec")


def _run_cli(args: list[str]) -> None:
    """One vpdetect command in this process, as the console script runs it (errors raise)."""
    import typer

    from vpdetect.cli import app

    try:
        code = app(args, standalone_mode=False)  # click returns an Exit's code here
    except typer.Exit as exc:
        code = exc.exit_code
    if code:
        raise RuntimeError(f"vpdetect {' '.join(args)} exited with {code}")


def make_tomogram(cell: Cell, root: Path, fresh: bool = False) -> tuple[Path, dict]:
    """The cell's SHREC folder (reconstruction.mrc, occupancy_mask.mrc, particle_locations.txt),
    simulated unless a folder with the same recipe exists; returns (folder, {snr_measured,
    snr_particles}) (the particles' own SNR only where the simulator knows it)."""
    folder = root / _folder_name(cell)
    stamp = folder / "recipe.json"
    recipe = _recipe(cell)
    if not fresh and stamp.is_file():
        saved = json.loads(stamp.read_text())
        if saved.get("recipe") == recipe:
            return folder, saved["snr"]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if cell.source == "independent":
        from vpdetect.io.mrc import write_mrc

        tomo = simulate(cell.params, cell.seed)
        write_mrc(folder / "reconstruction.mrc", tomo.volume, tomo.voxel_size_angstrom)
        _write_truth(folder, tomo.occupancy, tomo.centres_xyz, tomo.shapes, tomo.voxel_size_angstrom)
        snr = {"snr_measured": tomo.snr_measured, "snr_particles": tomo.snr_particles}
    else:
        snr = {"snr_measured": _vpdetect_tomogram(cell, root, folder), "snr_particles": None}
    stamp.write_text(json.dumps({"recipe": recipe, "snr": snr}, indent=1) + "\n")
    return folder, snr


def _vpdetect_tomogram(cell: Cell, root: Path, folder: Path) -> float:
    from vpdetect.io.mrc import read_tomogram, write_mrc

    # The dark and the inverted cell of one SNR share one simulation.
    raw = root / "_vpdetect_raw" / f"snr{cell.vpdetect_snr:g}"
    args = [a.replace("{out}", str(raw)) for a in vpdetect_command(cell)] + ["--overwrite"]
    stamp = raw / "recipe.json"
    recipe = _recipe(Cell(cell.name, cell.axis, cell.value, cell.source, vpdetect_snr=cell.vpdetect_snr,
                          seed=cell.seed))
    if not stamp.is_file() or json.loads(stamp.read_text()) != recipe:
        _run_cli(args)
        stamp.write_text(json.dumps(recipe) + "\n")
    model = raw / "model_0"
    tomo = read_tomogram(model / "reconstruction.mrc", mmap=False)
    volume = -tomo.data if cell.inverted else tomo.data
    write_mrc(folder / "reconstruction.mrc", np.asarray(volume, np.float32), tomo.voxel_size)
    for name in ("occupancy_mask.mrc", "particle_locations.txt", "simulation.json"):
        shutil.copy(model / name, folder / name)
    return float(json.loads((model / "simulation.json").read_text())["snr_measured"])


# --------------------------------------------------------------------------- the baseline


def dog_pick(volume: np.ndarray, radius: float, n: int, dark: bool) -> np.ndarray:
    """Difference-of-Gaussians blob picker: the `n` strongest local extrema, (n, 3) x, y, z.

    `radius` (voxels) is the particles' typical radius; sigmas radius/2 and radius;
    `dark` says that particles are darker than the background. Non-maximum
    suppression keeps picks at least `radius` apart.
    """
    from scipy import ndimage

    data = np.asarray(volume, dtype=np.float32)
    data = -data if dark else data
    sigma = max(radius / 2.0, 0.5)
    response = ndimage.gaussian_filter(data, sigma) - ndimage.gaussian_filter(data, 2.0 * sigma)
    window = max(3, 2 * int(round(radius / 2.0)) + 1)
    peaks = np.argwhere(response == ndimage.maximum_filter(response, size=window, mode="nearest"))
    peaks = peaks[np.argsort(-response[tuple(peaks.T)], kind="stable")]
    # Greedy suppression: each pick blocks a ball of `radius` around it.
    reach = int(np.ceil(radius))
    offsets = np.argwhere(np.ones((2 * reach + 1,) * 3, bool)) - reach
    offsets = offsets[np.sum(offsets**2, axis=1) < radius**2]
    blocked = np.zeros(data.shape, bool)
    upper = np.asarray(data.shape) - 1
    chosen = []
    for peak in peaks:
        if len(chosen) >= n:
            break
        if blocked[tuple(peak)]:
            continue
        chosen.append(peak)
        ball = np.clip(peak + offsets, 0, upper)
        blocked[tuple(ball.T)] = True
    zyx = np.asarray(chosen, dtype=np.float64).reshape(-1, 3)
    return zyx[:, ::-1].copy()


def typical_radius(occupancy: np.ndarray, truth) -> float:
    """Median equivalent-sphere radius (voxels) of the scored truth particles' masks."""
    from vpdetect.evaluate.shrec import UNSCORED_CLASSES

    counts = np.bincount(occupancy.ravel(), minlength=len(truth) + 1)[1:]
    labels = truth.class_labels() or [""] * len(truth)
    scored = np.array([str(v).lower() not in UNSCORED_CLASSES for v in labels], dtype=bool)
    volumes = counts[scored & (counts > 0)]
    return float(np.median(np.cbrt(3.0 * volumes / (4.0 * np.pi)))) if len(volumes) else 3.0


# --------------------------------------------------------------------------- one cell


def score_cell(cell: Cell, folder: Path, model: Path | None) -> dict:
    from vpdetect.evaluate.shrec import evaluate_picks, read_truth
    from vpdetect.io.particles import ParticleTable, read_particles

    occupancy, truth = read_truth(folder)
    shape_xyz = tuple(int(v) for v in occupancy.shape[::-1])
    picks = folder / "localizer_picks.csv"
    args = ["localize", str(folder / "reconstruction.mrc"), "-o", str(picks), "--quiet", "--overwrite"]
    if model is not None:
        args += ["--model", str(model)]
    start = time.perf_counter()
    _run_cli(args)
    seconds = time.perf_counter() - start
    pred = read_particles(picks, tomo_size=shape_xyz)
    localizer = evaluate_picks(pred, occupancy, truth)["localization"]

    from vpdetect.io.mrc import read_tomogram

    volume = read_tomogram(folder / "reconstruction.mrc", mmap=False).data
    n_true = localizer["n_particles"]
    radius = typical_radius(occupancy, truth)
    dark = not (cell.inverted or (cell.params is not None and cell.params.contrast == "bright"))
    dog_xyz = dog_pick(volume, radius, n_true, dark=dark)
    dog = evaluate_picks(ParticleTable.from_arrays(dog_xyz, tomo_size=shape_xyz), occupancy, truth)["localization"]
    return {
        "n_true": n_true, "radius_vox": radius, "localizer_seconds": seconds,
        "localizer": localizer, "dog": dog,
    }


# --------------------------------------------------------------------------- report


def draws_summary(rows: list[dict]) -> str:
    """Each cell's mean localizer and DoG F1 over its draws, and the mean over all rows."""
    lines = ["| cell | draws | localizer F1, mean (min - max) | DoG F1, mean |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["cell"] for r in rows):
        f1 = [r["localizer"]["f1"] for r in rows if r["cell"] == name]
        dog = [r["dog"]["f1"] for r in rows if r["cell"] == name]
        lines.append(f"| {name} | {len(f1)} | {np.mean(f1):.4f} ({min(f1):.3f} - {max(f1):.3f}) | {np.mean(dog):.3f} |")
    lines.append(f"\nmean localizer F1 over the {len(rows)} tomograms: {np.mean([r['localizer']['f1'] for r in rows]):.4f}")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| cell | axis | value | SNR measured | n true | localizer F1 | localizer P / R | picks | DoG F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loc, dog = r["localizer"], r["dog"]
        snr = "-" if r["snr_measured"] is None else f"{r['snr_measured']:.3g}"
        particles = r.get("snr_particles")
        if particles is not None and abs(particles - r["snr_measured"]) > 0.01 * particles:
            snr += f" (particles {particles:.3g})"  # context adds signal variance
        lines.append(
            f"| {r['cell']} | {r['axis']} | {r['value']} | {snr} | {r['n_true']} | {loc['f1']:.2f} | "
            f"{loc['precision']:.2f} / {loc['recall']:.2f} | {loc['RR']} | {dog['f1']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks generalization", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Localizer model (default: the bundled one).")
    parser.add_argument("--cells", action="append", default=None,
                        help="Only cells whose name contains this text (repeat for several).")
    parser.add_argument("--quick", action="store_true", help=f"Only the cells {', '.join(QUICK_CELLS)}.")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"Write every cell's metrics here (default {DEFAULT_JSON}, or its -validation twin).")
    parser.add_argument("--fresh", action="store_true", help="Re-simulate even where a tomogram is kept.")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help=f"Where the cells' SHREC folders live (default {WORK_DIR}, or its -validation twin).")
    parser.add_argument("--validation", action="store_true",
                        help=f"The same cells on the validation seeds {VALIDATION_SEEDS}: for choosing defaults.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="Draw the cells again on these seeds (9000-9998; vpdetect's cells on seed + 1), "
                        "each seed in a folder of its own, and print each cell's mean over them: design "
                        "draws for choosing defaults (the README's use 9100 9200 ... 9900).")
    args = parser.parse_args(argv)
    if args.seeds and args.validation:
        parser.error("--seeds and --validation both choose the seeds: give one")
    suffix = "-validation" if args.validation else "-draws" if args.seeds else ""
    if args.json is None:
        args.json = DEFAULT_JSON.with_name(f"{DEFAULT_JSON.stem}{suffix}{DEFAULT_JSON.suffix}")
    if args.work_dir is None:
        args.work_dir = WORK_DIR.with_name(WORK_DIR.name + suffix)
    return args


def run(argv: list[str] | None = None) -> list[dict]:
    import os

    import torch

    from vpdetect.models import default_model_path

    args = parse_args(list(argv or []))
    cells = select_cells(grid(args.validation), args.cells, args.quick)
    if not cells:
        raise SystemExit(f"no cell matches {', '.join(args.cells or [])!r}")
    if args.seeds:
        try:
            cells = draws(cells, args.seeds)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    model = args.model
    model_text = str(model) if model is not None else f"bundled ({default_model_path('localizer')})"
    seeds = "validation" if args.validation else f"{len(args.seeds)} design" if args.seeds else "test"
    print(f"localizer: {model_text}", flush=True)
    print(f"{len(cells)} cell(s) on the {seeds} seeds; torch threads {torch.get_num_threads()}; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every cell, so that an interrupted run keeps what it measured
        text = json.dumps({"model": model_text, "cells": rows}, indent=1, allow_nan=False) + "\n"
        args.json.write_text(text)

    for cell in cells:
        start = time.perf_counter()
        root = args.work_dir / f"seed{cell.seed}" if args.seeds else args.work_dir
        folder, snr = make_tomogram(cell, root, fresh=args.fresh)
        simulated = time.perf_counter() - start
        result = score_cell(cell, folder, model)
        row = {"cell": cell.name, "axis": cell.axis, "value": cell.value, "source": cell.source,
               "seed": cell.seed, **snr, "folder": str(folder),
               "params": cell.params.to_dict() if cell.params is not None else
               {"command": "vpdetect " + " ".join(vpdetect_command(cell)).replace("{out}", "DIR"),
                "inverted": cell.inverted},
               "simulate_seconds": simulated} | result
        rows.append(row)
        save()
        print(f"  {cell.name:32s} n {row['n_true']:4d}  localizer F1 {row['localizer']['f1']:.2f} "
              f"({row['localizer']['RR']} picks, {row['localizer_seconds']:.1f} s)  "
              f"DoG F1 {row['dog']['f1']:.2f}  (tomogram {simulated:.1f} s)", flush=True)
    print()
    print(markdown_table(rows))
    if args.seeds:
        print()
        print(draws_summary(rows))
    print(f"\nmetrics written to {args.json}")
    return rows
