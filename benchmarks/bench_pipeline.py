"""Whole `vpdetect pick` on CPU, time per phase (issue 8 point 4), for 128^3 and 256^3.

Each size: simulate a tomogram (`vpdetect.simulate`, the "easy" preset scaled
to the size), write it as MRC, and run the `pick` command's per-tomogram task
(`vpdetect.cli.pick.pick_task`: read, tiled localizer through the CPU engine,
stitching, clustering, box extraction, classifier through the CPU engine,
write) with the paper-sized nets (localizer w=2 d=49 M=7, classifier w=2
d=100 M=5). The phases come from the pipeline's own timings.

Models: the bundled ones when installed; otherwise paper-sized stand-ins with
random weights, except that the localizer's first two layers smooth the
(dark) particle density and its final layer thresholds that map at the
simulated particles' volume fraction. The stand-ins' classes mean nothing, but
they cost exactly what trained nets of that size cost and give a plausible
number of particles to cluster and classify.

Baseline, measured in this run: the network phases with `MSDNet.predict`
instead of the engine, extrapolated from one tile / one box (running them
whole would take hours on 2 cores).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

THREADS = 2
SIZES = (128, 256)
SEED = 11
BASELINE_TILE = 48  # edge of the tile on which MSDNet.predict is timed for the estimate


def _simulate(size: int):
    from vpdetect.simulate.pipeline import preset_params, simulate_tomogram

    slab = max(32, (size * 3) // 8)
    params = preset_params("easy", shape_xyz=(size, size, size), slab_thickness=slab)
    return simulate_tomogram(params, SEED)


def _models(directory: Path, reconstruction, class_mask) -> tuple[Path, Path, str]:
    """(localizer path, classifier path, description): bundled models or stand-ins."""
    from vpdetect.errors import VPDetectError
    from vpdetect.models import default_model_path

    try:
        return default_model_path("localizer"), default_model_path("classifier"), "bundled models"
    except VPDetectError:
        pass
    return (*paper_sized_models(directory, reconstruction, class_mask),
            "paper-sized stand-in models (random dense layers, see docstring)")


def paper_sized_models(directory: Path, reconstruction, class_mask) -> tuple[Path, Path]:
    """Paper-sized stand-ins (see the module docstring) written to `directory`: (localizer, classifier)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from vpdetect.nn.checkpoint import save_model
    from vpdetect.nn.msdnet import MSDNet
    from vpdetect.simulate.phantoms import protein_classes

    torch.manual_seed(SEED)
    localizer = MSDNet(1, 2, 2, 49, 7)
    volume = torch.from_numpy(np.asarray(reconstruction, dtype=np.float32))
    volume = ((volume - volume.mean()) / volume.std())[None, None]
    # Layer 0 channel 0 = -mean of 3^3 (dense particles are dark), layer 1 channel 0 =
    # mean of that at its dilation: a smooth darkness map (buffer channel 3) for the
    # final layer to threshold, marking as many voxels as the particles fill.
    d0, d1 = localizer.dilations[0][0], localizer.dilations[1][0]
    smooth = F.conv3d(F.leaky_relu(-F.conv3d(volume, torch.full((1, 1, 3, 3, 3), 1 / 27), padding=d0,
                                             dilation=d0), 0.01),
                      torch.full((1, 1, 3, 3, 3), 1 / 27), padding=d1, dilation=d1)
    fraction = float(np.mean(class_mask > 0))
    cut = float(torch.quantile(smooth.flatten()[:: max(1, smooth.numel() // 2**24)], 1 - fraction))
    scale = 20.0 / float(smooth.std())
    with torch.no_grad():
        localizer.layer_weights[0][0].fill_(-1 / 27)
        localizer.layer_biases[0][0] = 0.0
        localizer.layer_weights[1][0].zero_()
        localizer.layer_weights[1][0][1].fill_(1 / 27)
        localizer.layer_biases[1][0] = 0.0
        localizer.final.weight.zero_()
        localizer.final.bias.zero_()
        localizer.final.weight[1, 3] = scale
        localizer.final.bias[1] = -scale * cut
    names = ["background"] + [c.name for c in protein_classes()]
    classifier = MSDNet(1, len(names), 2, 100, 5)
    loc_path, cls_path = directory / "localizer.pt", directory / "classifier.pt"
    save_model(loc_path, localizer, {"stage": "localizer", "class_names": ["background", "particle"],
                                     "crop_size": 64, "voxel_size": None})
    save_model(cls_path, classifier, {"stage": "classifier", "class_names": names, "crop_size": 40,
                                      "voxel_size": None})
    return loc_path, cls_path


def _predict_seconds_per_voxel(model, edge: int, engine: bool) -> float:
    import torch

    from vpdetect.nn.engine import InferenceEngine

    x = torch.randn(1, 1, edge, edge, edge, generator=torch.Generator().manual_seed(SEED))
    predict = InferenceEngine(model).predict if engine else model.predict
    if engine:
        predict(x)  # buffers
    start = time.perf_counter()
    predict(x)
    return (time.perf_counter() - start) / edge**3


def run(sizes: tuple[int, ...] = SIZES) -> None:
    import os

    import torch

    from vpdetect.classify.pipeline import ClassifyOptions
    from vpdetect.cli.pick import PickJob, pick_task
    from vpdetect.io.mrc import write_mrc
    from vpdetect.localize.pipeline import LocalizeOptions
    from vpdetect.localize.tiling import DEFAULT_TILE, tile_layout
    from vpdetect.nn.checkpoint import load_model

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        print(f"settings: {THREADS} torch threads, CPU, float32, `pick` defaults "
              f"(tile {DEFAULT_TILE}, box batch {ClassifyOptions().batch_size}); "
              f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="vpdetect-bench-") as tmp:
                directory = Path(tmp)
                start = time.perf_counter()
                sim = _simulate(size)
                simulate_s = time.perf_counter() - start
                source = directory / f"tomo{size}.mrc"
                write_mrc(source, sim.reconstruction, voxel_size=10.0)
                loc_path, cls_path, models = _models(directory, sim.reconstruction, sim.class_mask)
                job = PickJob(
                    localizer_path=str(loc_path), classifier_path=str(cls_path),
                    localize_options=LocalizeOptions(), classify_options=ClassifyOptions(),
                    fmt="csv", show_progress=False,
                )
                start = time.perf_counter()
                result = pick_task(source, directory / "picks.csv", "cpu", job)
                total = time.perf_counter() - start
                timings = result["timings_s"]
                print(f"{size}^3 tomogram ({models}; simulated in {simulate_s:.1f} s, "
                      f"{len(sim.particles.data)} particles placed, {result['n_particles']} picked):")
                for phase, seconds in timings.items():
                    print(f"  {phase:16s} {seconds:8.2f} s  {100 * seconds / total:5.1f} %")
                print(f"  {'total (pick)':16s} {total:8.2f} s  "
                      f"{total / size**3 * 1e6:.2f} us per tomogram voxel, "
                      f"{timings.get('classify', 0.0) / max(1, result['n_particles']):.2f} s per particle classified")

                localizer, _ = load_model(loc_path, device="cpu")
                classifier, card = load_model(cls_path, device="cpu")
                options = LocalizeOptions()
                tiles = tile_layout((size,) * 3, options.resolved_tile(localizer, (size,) * 3),
                                    options.resolved_halo(localizer))
                tile_voxels = sum(
                    (s.stop - s.start) * (y.stop - y.start) * (x.stop - x.start) for s, y, x in
                    (t.source for t in tiles)
                )
                box = int(card["crop_size"])
                boxes = result["n_particles"]
                eng_loc = _predict_seconds_per_voxel(localizer, BASELINE_TILE, engine=True)
                ref_loc = _predict_seconds_per_voxel(localizer, BASELINE_TILE, engine=False)
                eng_cls = _predict_seconds_per_voxel(classifier, box, engine=True)
                ref_cls = _predict_seconds_per_voxel(classifier, box, engine=False)
                network = timings.get("network", 0.0) + timings.get("classify", 0.0)
                estimate = ref_loc * tile_voxels + ref_cls * boxes * box**3
                print(f"  baseline: networks through MSDNet.predict, estimated from one "
                      f"{BASELINE_TILE}^3 tile and one {box}^3 box: {estimate:.0f} s "
                      f"(localizer {ref_loc / eng_loc:.1f}x, classifier {ref_cls / eng_cls:.1f}x "
                      f"slower per voxel than the engine) vs {network:.1f} s measured; "
                      f"pick would take {total - network + estimate:.0f} s, "
                      f"{(total - network + estimate) / total:.1f}x this run")
    finally:
        torch.set_num_threads(previous)
