"""`make gpu-check`: prove the CUDA path on one GPU and measure it, in one report.

Sections (each timed; one that fails is recorded with its error and the others still run):

1. gpu_tests: `pytest -m gpu tests` (the tests that need CUDA; skipped elsewhere);
2. precision: the demo tomogram (`make demo`'s simulation, seed 7) through the bundled
   localizer in fp32, tf32, bf16 and fp16 on the GPU and fp32 on the CPU engine: the
   maps' differences from the GPU fp32 map, the voxels whose threshold decision flips,
   and the localization F1 of each against the truth;
3. train: the paper-sized localizer (w=2, d=49, M=7, 64^3 crops, batch 4) for a fixed
   number of steps in fp32/TF32 and with --amp: crops per second and peak GPU memory;
4. pick_512: `pick`'s per-tomogram task on a 512^3 tomogram (the demo tomogram tiled
   4 x 2 x 2) with the bundled nets and with paper-sized nets (random weights, the
   stand-ins of benchmarks/bench_pipeline.py), cold (first call: CUDA context, cuDNN
   autotuning) and warm, per phase, with the tile chosen and peak GPU memory.

Everything goes to one JSON report (`--out`, default gpu_check.json) and a summary table.
It needs no network: the demo tomogram is simulated here. Without CUDA it stops at once
with a one-line reason and exit code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TRAIN_STEPS = 20
TRAIN_WARMUP = 3
NO_CUDA_EXIT = 3


def no_cuda_reason() -> str | None:
    """Why this machine cannot run the check, or None when it can."""
    try:
        import torch
    except ImportError as exc:
        return f"torch cannot be imported ({exc})"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"no CUDA device is available (torch {torch.__version__}, {build})"
    return None


# --------------------------------------------------------------------------- pure helpers (tested on the CPU)


def compare_maps(reference, other, threshold: float) -> dict:
    """How far a probability map is from the reference one: max and mean absolute difference
    and the share of voxels on the other side of `threshold`."""
    import numpy as np

    a = np.asarray(reference, dtype=np.float32)
    b = np.asarray(other, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape} cannot be compared")
    diff = np.abs(a - b)
    flips = np.count_nonzero((a >= threshold) != (b >= threshold))
    return {"max_abs_diff": float(diff.max(initial=0.0)), "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "decision_flips": float(flips / max(1, a.size))}


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(section, item, figures) rows of the summary table, from a report."""
    rows: list[tuple[str, str, str]] = []
    for name, section in report.get("sections", {}).items():
        if "error" in section:
            rows.append((name, "ERROR", section["error"][:100]))
            continue
        if name == "gpu_tests":
            rows.append((name, "pytest -m gpu", section.get("summary", "")))
        elif name == "precision":
            for precision, values in section.get("runs", {}).items():
                flips = values.get("decision_flips")
                rows.append((name, precision, f"F1 {values['f1']:.3f}, network {values['network_s']:.2f} s"
                             + ("" if flips is None else f", max |diff| {values['max_abs_diff']:.2e}, "
                                f"flips {100 * flips:.3f} %")))
        elif name == "pick_512":
            for nets, runs in section.get("runs", {}).items():
                for temperature, values in runs.items():
                    phases = ", ".join(f"{k} {v:.2f}" for k, v in values["timings_s"].items())
                    rows.append((name, f"{nets} ({temperature})",
                                 f"total {values['total_s']:.2f} s: {phases}; tile {values.get('tile')}, "
                                 f"{values['n_particles']} particles, peak {values['peak_gb']:.1f} GB"))
        elif name == "train":
            for mode, values in section.get("runs", {}).items():
                rows.append((name, mode, f"{values['crops_per_s']:.1f} crops/s, peak {values['peak_gb']:.1f} GB"))
        rows.append((name, "seconds", f"{section.get('seconds', 0.0):.1f}"))
    return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return "(empty report)"
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:{widths[0]}s}  {b:{widths[1]}s}  {c}" for a, b, c in rows)


# --------------------------------------------------------------------------- sections (need CUDA)


def _vpdetect(*args: str) -> None:
    """Run a vpdetect command in a fresh interpreter (as a user would)."""
    code = "import sys; from vpdetect.cli import main; sys.argv = ['vpdetect'] + sys.argv[1:]; main()"
    subprocess.run([sys.executable, "-c", code, *args], check=True, timeout=300)


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9


def section_gpu_tests(work: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", str(ROOT / "tests"), "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "",
            "failures": [line for line in lines if line.startswith("FAILED")][:20]}


def demo_tomogram(work: Path) -> Path:
    """The demo's held-out simulation (seed 7), made once in `work`."""
    folder = work / "sim" / "model_0"
    if not (folder / "reconstruction.mrc").is_file():
        from examples.demo import SEED, SHAPE, SLAB

        _vpdetect("simulate", str(work / "sim"), "--preset", "shrec21", "--shape", *SHAPE,
                  "--slab-thickness", SLAB, "--seed", str(SEED), "--overwrite", "--quiet")
    return folder


def section_precision(work: Path) -> dict:
    import numpy as np
    import torch

    from vpdetect.evaluate.shrec import evaluate_picks
    from vpdetect.io.mrc import read_tomogram
    from vpdetect.io.shrec import read_truth
    from vpdetect.localize.pipeline import (
        LocalizeOptions,
        model_input,
        particles_from_map,
        segment_volume,
    )
    from vpdetect.models import default_model_path
    from vpdetect.nn.checkpoint import load_model

    folder = demo_tomogram(work)
    tomo = read_tomogram(folder / "reconstruction.mrc")
    occupancy, truth = read_truth(folder)
    runs, maps = {}, {}
    for device, precision in [("cuda:0", p) for p in PRECISIONS] + [("cpu", "fp32")]:
        net, card = load_model(default_model_path("localizer"), stage="localizer", device=device)
        options = LocalizeOptions(device=device, precision=precision).with_model_defaults(card)
        prepared = model_input(tomo, card, options)
        segment_volume(tomo, net, card, options, prepared=prepared)  # warm-up: cuDNN autotuning, engine buffers
        torch.cuda.synchronize()
        start = time.perf_counter()
        prob, timings = segment_volume(tomo, net, card, options, prepared=prepared)
        seconds = time.perf_counter() - start
        table = particles_from_map(prob, tomo, options, model=net, prepared=prepared)  # the pick verifier too
        scores = evaluate_picks(table, occupancy, truth)["localization"]
        key = precision if device != "cpu" else "cpu-fp32"
        maps[key] = np.asarray(prob, dtype=np.float32)
        runs[key] = {"f1": scores["f1"], "precision": scores["precision"], "recall": scores["recall"],
                     "n_particles": len(table), "network_s": timings["network"], "seconds": seconds}
    for key in runs:
        if key != "fp32":
            runs[key].update(compare_maps(maps["fp32"], maps[key], options.threshold))
    return {"tomogram": str(folder), "shape_zyx": list(tomo.data.shape), "threshold": options.threshold,
            "runs": runs}


def section_pick_512(work: Path) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_pipeline import paper_sized_models
    from vpdetect.classify.pipeline import ClassifyOptions
    from vpdetect.cli.pick import PickJob, pick_task
    from vpdetect.io.mrc import read_tomogram, write_mrc
    from vpdetect.localize.pipeline import LocalizeOptions
    from vpdetect.models import default_model_path
    from vpdetect.nn.checkpoint import load_model

    folder = demo_tomogram(work)
    demo = read_tomogram(folder / "reconstruction.mrc", mmap=False).data  # 128 x 256 x 256
    reps = [512 // n for n in demo.shape]
    volume = np.tile(demo, reps)
    source = work / "tomo512.mrc"
    write_mrc(source, volume, voxel_size=10.0)
    class_mask = np.tile(read_tomogram(folder / "class_mask.mrc", mmap=False).data, reps)
    paper = paper_sized_models(work, volume, class_mask)
    del volume, class_mask
    nets = {"bundled": (default_model_path("localizer"), default_model_path("classifier")), "paper-sized": paper}
    runs = {}
    for name, (loc, cls) in nets.items():
        localizer, _ = load_model(loc)
        job = PickJob(localizer_path=str(loc), classifier_path=str(cls), localize_options=LocalizeOptions(),
                      classify_options=ClassifyOptions(), fmt="csv", show_progress=False)
        tile = LocalizeOptions(device="cuda:0").resolved_tile(localizer.to("cuda:0"), (512, 512, 512))
        del localizer
        torch.cuda.empty_cache()
        runs[name] = {}
        for temperature in ("cold", "warm"):
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = pick_task(source, work / f"picks_{name}.csv", "cuda:0", job)
            torch.cuda.synchronize()
            runs[name][temperature] = {"total_s": time.perf_counter() - start, "timings_s": result["timings_s"],
                                       "n_particles": result["n_particles"], "tile": tile,
                                       "peak_gb": _peak_gb()}
    return {"shape_zyx": [512, 512, 512], "runs": runs}


def section_train(work: Path) -> dict:
    import numpy as np
    import torch

    from vpdetect.train.data import CropDataset, TrainingVolume
    from vpdetect.train.loop import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    targets = np.zeros((128, 128, 128), np.int16)
    for centre in rng.integers(10, 118, size=(60, 3)):
        z, y, x = centre
        targets[z - 5 : z + 5, y - 5 : y + 5, x - 5 : x + 5] = 1
    volume = (targets + rng.normal(0, 0.5, targets.shape)).astype(np.float32)
    centres = np.argwhere(targets > 0)[:: 500]
    data = TrainingVolume(name="synthetic", volume=volume, mean=float(volume.mean()), std=float(volume.std()),
                          targets=targets, centres_zyx=centres, centre_classes=np.ones(len(centres), np.int64))
    runs = {}
    for mode, amp in (("fp32-tf32", False), ("amp", True)):
        config = TrainConfig(width=2, depth=49, max_dilation=7, crop_size=64, batch_size=4, epochs=2,
                             steps_per_epoch=TRAIN_WARMUP, val_crops=0, amp=amp)
        trainer = Trainer(config, CropDataset([data], 64, seed=0), None, "cuda:0")
        trainer.train_epoch()  # warm-up steps
        trainer.config.steps_per_epoch = TRAIN_STEPS
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = trainer.train_epoch()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        runs[mode] = {"steps": TRAIN_STEPS, "crops_per_s": TRAIN_STEPS * config.batch_size / seconds,
                      "seconds": seconds, "peak_gb": _peak_gb(), "loss": loss,
                      "amp_dtype": str(trainer.amp_dtype)}
        del trainer
        torch.cuda.empty_cache()
    return {"config": "w=2 d=49 M=7, 64^3 crops, batch 4", "runs": runs}


# Cheap and decisive first: a run cut short still has those in its report.
SECTIONS = {"gpu_tests": section_gpu_tests, "precision": section_precision, "train": section_train,
            "pick_512": section_pick_512}


def machine() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gb": props.total_memory / 1e9, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="The JSON report to write.")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="Run only these sections.")
    args = parser.parse_args(argv)
    reason = no_cuda_reason()
    if reason is not None:
        print(f"gpu-check: {reason}; run it on a machine with a GPU", file=sys.stderr)
        return NO_CUDA_EXIT
    sys.path.insert(0, str(ROOT))
    report: dict = {"machine": machine(), "sections": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vpdetect-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.only or SECTIONS:
            print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                section = SECTIONS[name](work)
            except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
                section = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            section["seconds"] = time.perf_counter() - start
            report["sections"][name] = section
            args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # kept if later ones fail
    report["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(format_table(summary_rows(report)))
    print(f"report: {args.out} ({report['seconds']:.0f} s)")
    failed = [n for n, s in report["sections"].items() if "error" in s or s.get("returncode", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
