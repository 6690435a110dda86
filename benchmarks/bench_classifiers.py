"""Stage-2 classifiers side by side: the same data, the same CPU budget, held-out scores.

Every architecture of `vpdetect train classifier --arch` is trained on the same
simulated tomograms (`shrec21` preset, 256 x 256 x 128, 100-voxel slab: seed
101 for training, 202 for validation) for the same wall-clock budget
(`--minutes`, `--threads`), keeping its best epoch by validation. Each is then
scored on the held-out tomogram (seed 7, never used for training or choices)
twice, with the SHREC'21 protocol (`vpdetect.evaluate`): classifying the
ground-truth coordinates (stage 2 alone) and classifying the coordinates the
bundled localizer finds (what `vpdetect pick` does: the same localize code
in the same process). Reported: class F1 per size group for both, training
time, and inference time per 1,000 boxes (network and box extraction, from the
classify pipeline's own timing). The bundled classifier is scored alongside.

    .venv/bin/python -m benchmarks.bench_classifiers --work bench_cls --minutes 8 --threads 2

Trainings and scores already present in `--work` are reused (delete NAME.score.json to score again);
`--arch` limits the run to some architectures. The JSON of all scores goes to
`--work/classifiers.json` and the markdown table to stdout.

`--test-seed` adds held-out tomograms (the same preset and size, other seeds),
`--model` scores other classifier files beside the bundled one (e.g. an older
bundled classifier from git), and `--gains 0.6,0.8,1,1.25,1.6` also reports
accuracy on the true coordinates when every normalised box is multiplied by
each gain (how much the classifier reads size from contrast):

    git show 1787c24~1:vpdetect/models/classifier.pt > old.pt
    .venv/bin/python -m benchmarks.bench_classifiers --work bench_cls --bundled-only \
        --model old.pt --test-seed 7 --test-seed 11 --test-seed 12 --gains 0.6,0.8,1,1.25,1.6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# CPU recipe per architecture: widths divided so that a 2-core CPU trains each at a useful
# number of boxes a second; box 24^3, 16 boxes a step, short epochs so that even a loaded
# machine finishes several (each ends with a validation on every validation particle).
RECIPES = {
    "dilated-densenet": {"width_divisor": 2, "steps": 2},
    "densenet": {"width_divisor": 2, "steps": 2},
    "dsrf3d-v2": {"width_divisor": 4, "steps": 3},
    "rb3d": {"width_divisor": 4, "steps": 3},
    "cb3d": {"width_divisor": 4, "steps": 3},
    "msdnet": {"steps": 3},  # the bundled CPU recipe's network: w=2 d=30 M=5, 24^3 crops
}
BOX = 24
SHAPE = ("256", "256", "128")
SEEDS = {"train": 101, "val": 202, "test": 7}


def _vpdetect() -> list[str]:
    return [str(Path(sys.executable).parent / "vpdetect")]


def simulate_data(root: Path, test_seeds: list[int] | None = None) -> dict[str, list[Path]]:
    """The benchmark's tomograms (made once; the simulator is deterministic).

    "test" holds one held-out tomogram per test seed (seed 7 in test/, others in test_SEED/)."""
    splits = [("train", "train", 6, SEEDS["train"]), ("val", "val", 1, SEEDS["val"])]
    splits += [("test", "test" if seed == SEEDS["test"] else f"test_{seed}", 1, seed)
               for seed in test_seeds or [SEEDS["test"]]]
    folders: dict[str, list[Path]] = {}
    for split, name, n, seed in splits:
        out = root / name
        if not (out / f"model_{n - 1}" / "simulation.json").is_file():
            subprocess.run(
                [*_vpdetect(), "simulate", str(out), "--n-tomograms", str(n), "--preset", "shrec21",
                 "--shape", *SHAPE, "--slab-thickness", "100", "--seed", str(seed)],
                check=True,
            )
        folders.setdefault(split, []).extend(out / f"model_{i}" for i in range(n))
    return folders


def train(arch: str, folders: dict, work: Path, minutes: float, threads: int, seed: int) -> tuple[Path, float]:
    """Train one architecture for `minutes` (skipped when its model exists); (model, seconds)."""
    out = work / f"{arch}.pt"
    log = work / f"{arch}.train.log"
    if out.is_file():
        from vpdetect.nn.checkpoint import read_model_card

        return out, float(read_model_card(out)["provenance"].get("wall_time_s", 0.0))
    recipe = RECIPES[arch]
    args = [*_vpdetect(), "train", "classifier", "--arch", arch, "--out", str(out), "--overwrite",
            "--crop-size", str(BOX), "--batch-size", "16" if arch != "msdnet" else "8",
            "--steps-per-epoch", str(recipe["steps"]), "--epochs", "1000", "--lr-step", "1000",
            "--threads", str(threads), "--seed", str(seed), "--time-limit", str(minutes)]
    for folder in folders["train"]:
        args += ["--data", str(folder)]
    for folder in folders["val"]:
        args += ["--val", str(folder)]
    if arch == "msdnet":
        args += ["--width", "2", "--depth", "30", "--max-dilation", "5", "--particle-share", "0.95"]
    else:
        args += ["--width-divisor", str(recipe["width_divisor"])]
    started = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(args, check=True, stdout=handle, stderr=subprocess.STDOUT,
                       env=os.environ | {"COLUMNS": "200"})
    return out, time.perf_counter() - started


def localize_test(folder: Path, threads: int, cache: Path):
    """The bundled localizer's coordinates on a test tomogram (pick's first stage), kept in `cache`."""
    import torch

    from vpdetect.io.mrc import read_tomogram
    from vpdetect.io.particles import read_particles, write_particles
    from vpdetect.localize.pipeline import LocalizeOptions, localize_volume
    from vpdetect.models import default_model_path
    from vpdetect.nn.checkpoint import load_model

    torch.set_num_threads(threads)
    tomo = read_tomogram(folder / "reconstruction.mrc")
    if cache.is_file():
        return tomo, read_particles(cache)
    model, card = load_model(default_model_path("localizer"), stage="localizer")
    table, _ = localize_volume(tomo, model, card, LocalizeOptions().with_model_defaults(card))
    write_particles(cache, table)
    return tomo, table


def gain_accuracy(model, card, tomo, truth, gains: list[float]) -> dict[str, float]:
    """Accuracy on the true coordinates with every normalised box multiplied by each gain."""
    from vpdetect.classify.pipeline import classify_table
    from vpdetect.preprocess import streamed_zscore_params

    mean, std = streamed_zscore_params(tomo.data)
    truth_class = truth.data["class_name"].to_numpy()
    result = {}
    for gain in gains:
        classified = classify_table(tomo, truth, model, card, stats=(mean, std / gain))
        result[f"{gain:g}"] = round(float((classified.data["class_name"].to_numpy() == truth_class).mean()), 3)
    return result


def score(model_path: Path, tomo, coords_tables: dict, truth_folder: Path, gains: list[float] | None = None) -> dict:
    """Size-group and per-class F1 for each coordinate set, inference ms per 1,000 boxes, and
    with `gains` the accuracy on the true coordinates per gain (`gain_accuracy`)."""
    from vpdetect.classify.pipeline import classify_table
    from vpdetect.evaluate.shrec import evaluate_picks, read_size_groups, read_truth
    from vpdetect.nn.checkpoint import load_model

    model, card = load_model(model_path, stage="classifier")
    occupancy, truth = read_truth(truth_folder)
    groups = read_size_groups(truth_folder)
    result = {"arch": card["arch"].get("name", "msdnet"), "n_parameters": card.get("n_parameters"),
              "epochs": card["provenance"].get("epochs"), "val_metrics": card.get("metrics", {})}
    boxes, seconds = 0, 0.0
    for label, table in coords_tables.items():
        timings: dict = {}
        classified = classify_table(tomo, table, model, card, timings=timings)
        boxes += len(table)
        seconds += timings["classify"]
        classification = evaluate_picks(classified, occupancy, truth, groups)["classification"]
        result[label] = {
            "size_groups": {g: round(v["f1"], 3) for g, v in classification["size_groups"].items()},
            "per_class": {c: round(v["f1"], 3) for c, v in classification["per_class"].items()},
        }
    result["ms_per_1000_boxes"] = round(1000.0 * seconds / boxes * 1000.0, 0)
    if gains:
        result["gain_accuracy"] = gain_accuracy(model, card, tomo, coords_tables["gt"], gains)
    return result


def markdown(rows: list[dict]) -> str:
    groups = ("small", "medium", "large")
    head = ("| classifier | test seed | parameters | train time | GT small | GT medium | GT large "
            "| pick small | pick medium | pick large | inference per 1,000 boxes |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        gt = [r["gt"]["size_groups"].get(g, float("nan")) for g in groups]
        pk = [r["pick"]["size_groups"].get(g, float("nan")) for g in groups]
        train_time = "-" if r.get("train_s") is None else f"{r['train_s'] / 60:.1f} min"
        lines.append(
            f"| {r['name']} | {r.get('test_seed', SEEDS['test'])} | {r['n_parameters']:,} | {train_time} | "
            + " | ".join(f"{v:.3f}" for v in gt + pk)
            + f" | {r['ms_per_1000_boxes'] / 1000:.1f} s |"
        )
    gained = [r for r in rows if r.get("gain_accuracy")]
    if gained:
        gains = list(gained[0]["gain_accuracy"])
        lines += ["", "| accuracy on the true coordinates, boxes x gain | test seed | "
                  + " | ".join(gains) + " |", "|" + "---|" * (len(gains) + 2)]
        lines += [f"| {r['name']} | {r.get('test_seed', SEEDS['test'])} | "
                  + " | ".join(f"{r['gain_accuracy'].get(g, float('nan')):.3f}" for g in gains) + " |"
                  for r in gained]
    return "\n".join(lines)


def _gain_list(text: str) -> list[float]:
    try:
        gains = [float(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from None
    if any(g <= 0 for g in gains):
        raise argparse.ArgumentTypeError(f"gains must be positive: {text!r}")
    return gains


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench_classifiers"), help="folder for data and models")
    parser.add_argument("--data", type=Path, default=None, help="folder with train/ val/ test/ (default: --work)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per architecture")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training and inference")
    parser.add_argument("--arch", action="append", help="architectures to run (default: all)")
    parser.add_argument("--seed", type=int, default=3, help="training seed")
    parser.add_argument("--no-bundled", action="store_true", help="do not score the bundled classifier (a score already in --work is still shown)")
    parser.add_argument("--bundled-only", action="store_true", help="score only the bundled classifier")
    parser.add_argument("--model", type=Path, action="append", default=[],
                        help="another classifier file to score (repeatable; named by its file name)")
    parser.add_argument("--test-seed", type=int, action="append", default=None,
                        help=f"held-out tomogram seed (repeatable; default {SEEDS['test']})")
    parser.add_argument("--gains", type=_gain_list, default=[],
                        help="comma list of positive gains: accuracy on the true coordinates per box gain")
    args = parser.parse_args(argv)
    gains = args.gains
    import torch

    from vpdetect.io.particles import read_particles
    from vpdetect.models import default_model_path

    args.work.mkdir(parents=True, exist_ok=True)
    test_seeds = args.test_seed or [SEEDS["test"]]
    folders = simulate_data(args.data or args.work, test_seeds)
    torch.set_num_threads(args.threads)
    tests = []
    for seed, test in zip(test_seeds, folders["test"], strict=True):
        suffix = "" if seed == SEEDS["test"] else f"_{seed}"
        tomo, picked = localize_test(test, args.threads, args.work / f"test{suffix}_picks.csv")
        coords = {"gt": read_particles(test / "particle_locations.txt", fmt="shrec"), "pick": picked}
        tests.append((seed, suffix, test, tomo, coords))

    def scored(name: str, model: Path, train_s: float | None) -> list[dict]:
        rows = []
        for seed, suffix, test, tomo, coords in tests:
            cached = args.work / f"{name}{suffix}.score.json"
            row = json.loads(cached.read_text()) if cached.is_file() else {}
            if not row or (gains and "gain_accuracy" not in row):
                row = {"name": name, "test_seed": seed, "train_s": train_s,
                       **score(model, tomo, coords, test, gains)}
                cached.write_text(json.dumps(row, indent=1))
            rows.append(row)
        print(markdown(rows), flush=True)
        return rows

    rows = []
    from vpdetect.nn.checkpoint import read_model_card

    bundled = default_model_path("classifier")
    card = read_model_card(bundled)
    flips = card.get("test_time_flips", 1)
    bundled_name = f"bundled {card['arch'].get('name', 'msdnet')}" + (f", {flips} test-time flips" if flips > 1 else "")
    if not args.no_bundled or (args.work / f"{bundled_name}.score.json").is_file():
        rows += scored(bundled_name, bundled, None)
    for path in args.model:
        rows += scored(path.stem, path, None)
    for arch in [] if args.bundled_only else args.arch or list(RECIPES):
        model, seconds = train(arch, folders, args.work, args.minutes, args.threads, args.seed)
        if not model.is_file():
            print(f"{arch}: no epoch finished within {args.minutes} min; see {arch}.train.log", flush=True)
            continue
        torch.set_num_threads(args.threads)
        rows += scored(arch, model, seconds)
    (args.work / "classifiers.json").write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    return 0


def run() -> None:
    """`python -m benchmarks classifiers`: the full benchmark with the defaults (about an hour)."""
    main([])


if __name__ == "__main__":
    sys.exit(main())
