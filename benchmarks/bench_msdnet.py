"""MSDNet inference speed on CPU (issue 8 point 2): the engine vs the straightforward net.

Three ways to evaluate the same random-weight network on the same input, all
timed in this run with the same torch thread count:

- baseline `concat`: `vpdetect.nn.reference.concat_forward`, which concatenates
  all earlier maps for every layer and runs one dilated conv3d per channel;
- `buffer`: `MSDNet.predict` (one preallocated buffer), with its layers as
  conv3d per channel and as whole-volume matrix multiplies (`model.method`);
- `engine`: `vpdetect.nn.engine.fast_predict` (one matrix multiply per layer
  and slab plus shifted adds, z-slab cache blocking, one worker per thread).

Nets: the paper's localizer (w=2, d=49, M=7) on 96^3 and the classifier
(w=2, d=100, M=5) on a 40^3 box. Target: engine >= 3x the baseline on the
localizer, probabilities within 1e-4. The baselines take minutes at 96^3, so
they run `BASELINE_REPEATS` times and the engine `REPEATS` times (median).
More sizes: `python -m benchmarks msdnet --localizer-size 96 --localizer-size 128` (`--help`).

Then whole tomograms (issue 17): the bundled and the paper-sized localizer on
256^3 and 200 x 512 x 512 through `predict_map` with the CPU default layout
(full-depth columns streamed along z, as wide as the free memory allows),
with the recomputation factor (voxels computed per output voxel), us and
GFLOP/s per output voxel, and the fraction of this machine's sgemm rate,
measured in the same run (a large square float32 matrix multiply on the same
threads). Targets: paper-sized <= 4 us/voxel or >= 60 % of sgemm; bundled
<= 2 us/voxel; recomputation < 1.3 for the bundled localizer.
"""

from __future__ import annotations

import statistics
import time

THREADS = 2
LOCALIZER_SIZES = (96,)
# Whole tomograms (z, y, x) through the CPU default layout.
TOMOGRAM_SHAPES = ((256, 256, 256), (200, 512, 512))
PAPER_TARGET_US = 4.0
PAPER_TARGET_SGEMM_SHARE = 0.6
BUNDLED_TARGET_US = 2.0
RECOMPUTE_TARGET = 1.3
SGEMM_EDGE = 2048
CLASSIFIER_SIZE = 40
REPEATS = 3
BASELINE_REPEATS = 1
TOLERANCE = 1e-4
TARGET_RATIO = 3.0
SEED = 0


def _net(n_classes: int, width: int, depth: int, max_dilation: int):
    import torch

    from vpdetect.nn.msdnet import MSDNet

    torch.manual_seed(SEED)
    model = MSDNet(1, n_classes, width, depth, max_dilation).eval()
    with torch.no_grad():
        for bias in model.layer_biases:
            bias.normal_(0.0, 0.1)
    return model


def _flops_per_voxel(model) -> int:
    """Multiply-adds x 2 of the dense layers and the final 1x1x1 layer."""
    dense = sum(2 * 27 * model.width * (model.in_channels + i * model.width) for i in range(model.depth))
    return dense + 2 * model.n_feature_maps * model.n_classes


def _time(fn, repeats: int) -> tuple[float, object]:
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _variants(model) -> list[tuple[str, object, int]]:
    """(label, predict function, repeats) for every way of evaluating `model`, baseline first."""
    from vpdetect.nn.engine import InferenceEngine
    from vpdetect.nn.reference import concat_predict

    def with_method(method):
        def predict(x):
            saved = model.method
            model.method = method
            try:
                return model.predict(x)
            finally:
                model.method = saved

        return predict

    variants = [("concat (baseline)", lambda x: concat_predict(model, x), BASELINE_REPEATS)]
    if hasattr(model, "method"):
        # MSDNet can run its layers as conv3d or as whole-volume matrix multiplies.
        variants += [
            ("buffer, conv3d", with_method("conv"), BASELINE_REPEATS),
            ("buffer, whole-volume mm", with_method("gemm"), BASELINE_REPEATS),
        ]
    else:
        variants.append(("buffer (model.predict)", model.predict, BASELINE_REPEATS))
    variants.append(("engine (z-streamed)", InferenceEngine(model, kernel="engine").predict, REPEATS))
    # What vpdetect runs: the fastest kernel for this shape, measured on its first call.
    variants.append(("fast_predict (measured)", InferenceEngine(model).predict, REPEATS))
    return variants


def compare(model, size: int) -> dict:
    """Time every variant on one size^3 input; {label: (median seconds, runs, max |diff| to baseline)}."""
    import torch

    generator = torch.Generator().manual_seed(SEED + size)
    x = torch.randn((1, 1, size, size, size), generator=generator)
    variants = _variants(model)
    start = time.perf_counter()
    variants[-2][1](x)  # first call: builds the buffers for this shape (tiles reuse them)
    first = time.perf_counter() - start
    variants[-1][1](x)  # first call: measures the kernels
    figures: dict = {"voxels": size**3, "engine_first": first, "times": {}}
    reference = None
    for label, predict, repeats in variants:
        seconds, probs = _time(lambda predict=predict: predict(x), repeats)
        if reference is None:
            reference = probs
        figures["times"][label] = (seconds, repeats, float((probs - reference).abs().max()))
    return figures


def _report(name: str, model, size: int, figures: dict) -> tuple[float, float]:
    """Print the table; return (engine speed-up over the baseline, engine's max difference)."""
    voxels = figures["voxels"]
    gflop = _flops_per_voxel(model) * voxels / 1e9
    print(f"{name} w={model.width} d={model.depth} M={model.max_dilation} at {size}^3 "
          f"({gflop:.0f} GFLOP per pass)")
    times = figures["times"]
    baseline = next(iter(times.values()))[0]
    for label, (seconds, runs, diff) in times.items():
        print(
            f"  {label:26s} {seconds:8.2f} s  {seconds / voxels * 1e6:8.2f} us/voxel  "
            f"{gflop / seconds:6.1f} GFLOP/s  {baseline / seconds:6.1f}x baseline  "
            f"max|p - baseline| {diff:.1e}  (median of {runs})"
        )
    print(f"  engine first call incl. buffer setup: {figures['engine_first']:.2f} s")
    fastest = min(seconds for seconds, _, _ in times.values())
    seconds, _, diff = times["fast_predict (measured)"]
    print(f"  fast_predict: {seconds / fastest:.2f}x the fastest variant's time")
    return baseline / seconds, diff


def sgemm_gflops(threads: int = THREADS, edge: int = SGEMM_EDGE, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate on `threads` threads (best of `repeats`)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(edge, edge), torch.randn(edge, edge)
        out = torch.empty(edge, edge)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        return 2 * edge**3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def tomogram_pass(model, shape: tuple[int, int, int]) -> dict:
    """One `predict_map` over a random tomogram of `shape` with the CPU default layout."""
    import numpy as np

    from vpdetect.localize.pipeline import LocalizeOptions
    from vpdetect.localize.tiling import predict_map, recompute_factor, tile_shape
    from vpdetect.nn.engine import allocation_seconds, kernels_used

    options = LocalizeOptions()
    halo = options.resolved_halo(model)
    tile = options.resolved_tile(model, shape)
    volume = np.random.default_rng(SEED).normal(size=shape).astype(np.float32)
    timings: dict = {}
    allocated = allocation_seconds(model)
    start = time.perf_counter()
    predict_map(model, volume, 0.0, 1.0, tile=tile, halo=halo, out=np.zeros(shape, np.float16),
                timings=timings)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "network": timings["network"], "tile": tile_shape(shape, tile),
            "recompute": recompute_factor(shape, tile, halo), "kernel": kernels_used(model),
            "allocation": allocation_seconds(model) - allocated}


def _tomogram_row(label: str, shape, r: dict, flops: float, peak: float) -> tuple[float, float]:
    """Print one table row of a `tomogram_pass` result; (us per voxel, GFLOP/s)."""
    voxels = shape[0] * shape[1] * shape[2]
    us, gflops = r["network"] / voxels * 1e6, flops * voxels / r["network"] / 1e9
    print(f"| {label} | {' x '.join(map(str, shape))} | {' x '.join(map(str, r['tile']))} | "
          f"{r['recompute']:.2f} | {r['network']:.1f} | {r['allocation']:.1f} | {us:.2f} | {gflops:.1f} | "
          f"{gflops / peak:.0%} |", flush=True)
    return us, gflops


def report_tomograms(shapes=TOMOGRAM_SHAPES, warm: bool = False) -> bool:
    """us/voxel, GFLOP/s and share of sgemm for both localizers; True when every target is met.

    The targets judge the first pass of a shape, which allocates the engine's buffers (what one
    `localize` of one tomogram costs); `warm` adds a second pass of the same shape, reusing them
    (the next tomograms of a batch of that shape)."""
    from vpdetect.errors import VPDetectError
    from vpdetect.models import default_model_path
    from vpdetect.nn.checkpoint import load_model

    peak = sgemm_gflops()
    print(f"sgemm: {peak:.0f} GFLOP/s ({SGEMM_EDGE}^2 float32 matrices, {THREADS} threads, best of 5)")
    nets = [("paper-sized localizer", _net(2, 2, 49, 7))]
    try:
        nets.insert(0, ("bundled localizer", load_model(default_model_path("localizer"), stage="localizer")[0]))
    except VPDetectError:
        pass
    met = True
    print("| localizer | tomogram (z, y, x) | columns (z, y, x) | recompute | seconds | of which buffers "
          "allocated | us/voxel | GFLOP/s | share of sgemm |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model in nets:
        flops = _flops_per_voxel(model)
        for shape in shapes:
            r = tomogram_pass(model, shape)
            us, gflops = _tomogram_row(f"{name} (w={model.width} d={model.depth})", shape, r, flops, peak)
            if warm:
                _tomogram_row(f"{name}, second pass (buffers reused)", shape, tomogram_pass(model, shape), flops, peak)
            if name.startswith("paper"):
                met &= us <= PAPER_TARGET_US or gflops >= PAPER_TARGET_SGEMM_SHARE * peak
            else:
                met &= us <= BUNDLED_TARGET_US and r["recompute"] < RECOMPUTE_TARGET
    print(f"targets (paper-sized <= {PAPER_TARGET_US:g} us/voxel or >= {PAPER_TARGET_SGEMM_SHARE:.0%} of sgemm; "
          f"bundled <= {BUNDLED_TARGET_US:g} us/voxel, recompute < {RECOMPUTE_TARGET:g}): "
          f"{'met' if met else 'NOT met'}")
    return met


def parse_args(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks msdnet", description=__doc__.split("\n")[0])
    parser.add_argument("--localizer-size", type=int, action="append", dest="localizer_sizes",
                        help=f"Cube edge for the engine-vs-baseline comparison (repeat; default {LOCALIZER_SIZES}; "
                        "0: skip the comparison).")
    parser.add_argument("--no-classifier", action="store_true", help="Skip the classifier comparison.")
    parser.add_argument("--tomogram", type=int, nargs=3, action="append", metavar=("Z", "Y", "X"), dest="shapes",
                        help=f"Whole-tomogram shape (repeat; default {TOMOGRAM_SHAPES}).")
    parser.add_argument("--no-tomograms", action="store_true", help="Skip the whole-tomogram table.")
    parser.add_argument("--warm", action="store_true",
                        help="Time a second pass of each tomogram too, with the engine's buffers reused.")
    args = parser.parse_args(argv)
    sizes = tuple(n for n in (args.localizer_sizes or LOCALIZER_SIZES) if n > 0)
    shapes = () if args.no_tomograms else tuple(tuple(t) for t in (args.shapes or TOMOGRAM_SHAPES))
    return sizes, None if args.no_classifier else CLASSIFIER_SIZE, shapes, args.warm


def run(argv: list[str] | None = None) -> None:
    """`python -m benchmarks msdnet [--localizer-size N] [--no-classifier] [--tomogram Z Y X] [--no-tomograms]
    [--warm]`."""
    import os

    import torch

    localizer_sizes, classifier_size, shapes, warm = parse_args(list(argv or []))
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        print(
            f"settings: {THREADS} torch threads (engine: {THREADS} workers), float32, random "
            f"weights (seed {SEED}), N(0,1) input, batch 1; load average at start "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        localizer = _net(2, 2, 49, 7)
        met = True
        for size in localizer_sizes:
            ratio, diff = _report("localizer", localizer, size, compare(localizer, size))
            met &= ratio >= TARGET_RATIO and diff <= TOLERANCE
            print(f"  localizer: engine {ratio:.1f}x the baseline (target >= {TARGET_RATIO:g}x), "
                  f"max difference {diff:.1e} (tolerance {TOLERANCE:g})")
        if classifier_size:
            classifier = _net(13, 2, 100, 5)
            figures = compare(classifier, classifier_size)
            ratio, diff = _report("classifier", classifier, classifier_size, figures)
            print(f"  classifier: engine {ratio:.1f}x the baseline, max difference {diff:.1e}")
        print(f"msdnet target (>= {TARGET_RATIO:g}x, within {TOLERANCE:g}): {'met' if met else 'NOT met'}")
        if shapes:
            report_tomograms(shapes, warm)
    finally:
        torch.set_num_threads(previous)
