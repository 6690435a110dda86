"""Whole `vpdetect pick` on CPU, time per phase (issues 8 and 17), for 256^3 and 200 x 512 x 512.

Each shape: simulate a tomogram (`vpdetect.simulate`, the "easy" preset scaled
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
instead of the engine, extrapolated from a slab of the tomogram's whole planes
(BASELINE_PLANES of them: the plain alternative, the whole volume through
`predict`, works on whole planes, whose maps leave the caches as the volume's
do; a 48^3 cube that fits in the caches ran 1.2-2x faster per voxel than whole
planes on an AVX-512 host and is no configuration a tomogram can run) and
one batch of boxes, counting only the output voxels (no recomputation charged
to the baseline: a lower bound for any tiling), the faster of two timed calls.
The localizer's ratio compares that slab's time per voxel with the run's own
whole-volume pass; a whole-box classifier has no engine (`classify` calls its
`predict`), so only an MSDNet classifier gets a ratio. The report names the
columns, their recomputation factor and the kernels `pick` chose.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

THREADS = 2
SHAPES = ((256, 256, 256), (200, 512, 512))  # (z, y, x)
SEED = 11
BASELINE_PLANES = 16  # whole planes of the tomogram on which MSDNet.predict is timed for the estimate


def _simulate(shape: tuple[int, int, int]):
    from vpdetect.simulate.pipeline import preset_params, simulate_tomogram

    slab = max(32, (shape[0] * 3) // 8)
    params = preset_params("easy", shape_xyz=(shape[2], shape[1], shape[0]), slab_thickness=slab)
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


def _predict_seconds_per_voxel(model, shape: tuple[int, ...], engine: bool) -> float:
    """Seconds per input voxel of one call on a batch of `shape` (N, D, H, W): vpdetect's
    path (an MSDNet through the engine, kernel measured) or the plain `model.predict`.
    Whole-box classifiers have no engine: `classify` calls their `predict`, so both are it."""
    import torch

    from vpdetect.nn.engine import InferenceEngine
    from vpdetect.nn.msdnet import MSDNet

    x = torch.randn(shape[0], 1, *shape[1:], generator=torch.Generator().manual_seed(SEED))
    engine = engine and isinstance(model, MSDNet)
    predict = InferenceEngine(model).predict if engine else model.predict
    with torch.no_grad():
        predict(x)  # warm-up: buffers, kernel measurement, first-call allocations
    seconds = []
    for _ in range(2):  # the faster of two: the baseline gets the benefit of the doubt
        start = time.perf_counter()
        with torch.no_grad():
            predict(x)
        seconds.append(time.perf_counter() - start)
    return min(seconds) / x.numel()


def run(shapes: tuple[tuple[int, int, int], ...] = SHAPES) -> None:
    import os

    import numpy as np
    import torch

    from vpdetect.classify.pipeline import DEFAULT_BATCH, ClassifyOptions
    from vpdetect.cli.pick import PickJob, pick_task
    from vpdetect.io.mrc import write_mrc
    from vpdetect.localize.pipeline import LocalizeOptions
    from vpdetect.localize.tiling import recompute_factor, tile_shape
    from vpdetect.nn.checkpoint import is_box_arch, load_model

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        print(f"settings: {THREADS} torch threads, CPU, float32, `pick` defaults; "
              f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for shape in shapes:
            name = " x ".join(map(str, shape))
            voxels = int(np.prod(shape))
            with tempfile.TemporaryDirectory(prefix="vpdetect-bench-") as tmp:
                directory = Path(tmp)
                start = time.perf_counter()
                sim = _simulate(shape)
                simulate_s = time.perf_counter() - start
                source = directory / "tomo.mrc"
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
                localizer, _ = load_model(loc_path, device="cpu")
                classifier, card = load_model(cls_path, device="cpu")
                options = LocalizeOptions()
                tile = options.resolved_tile(localizer, shape)
                halo = options.resolved_halo(localizer)
                print(f"{name} tomogram (z, y, x; {models}; simulated in {simulate_s:.1f} s, "
                      f"{len(sim.particles.data)} particles placed, {result['n_particles']} picked); "
                      f"localizer columns {' x '.join(map(str, tile_shape(shape, tile)))}, "
                      f"recompute factor {recompute_factor(shape, tile, halo):.2f}:")
                print("  | phase | seconds | share |\n  |---|---|---|")
                for phase, seconds in timings.items():
                    print(f"  | {phase} | {seconds:.2f} | {100 * seconds / total:.1f} % |")
                print(f"  | total (pick) | {total:.2f} | {total / voxels * 1e6:.2f} us per voxel |")
                # Both stages may average test-time flips (one network pass each): per pass is what
                # the kernels deliver, and the baseline below is charged the same passes.
                loc_flips = int(result.get("localizer_flips") or 1)
                cls_flips = int(card.get("test_time_flips", 1)) if is_box_arch(card.get("arch")) else 1
                per_pass = timings.get("network", 0.0) / voxels * 1e6 / loc_flips
                print(f"  network phase {timings.get('network', 0.0) / voxels * 1e6:.2f} us per voxel "
                      f"({per_pass:.2f} per voxel and pass, {loc_flips} localizer pass(es)); "
                      f"{1e3 * timings.get('classify', 0.0) / max(1, result['n_particles']):.1f} ms per particle classified")
                for stage, used in result.get("kernels", {}).items():
                    print(f"  {stage} kernel: {used}")

                box = int(card["crop_size"])
                batch = DEFAULT_BATCH["boxes" if is_box_arch(card.get("arch")) else "msdnet"]
                boxes = result["n_particles"]
                ref_loc = _predict_seconds_per_voxel(localizer, (1, min(BASELINE_PLANES, shape[0]), *shape[1:]),
                                                     engine=False)
                ref_cls = _predict_seconds_per_voxel(classifier, (batch,) + (box,) * 3, engine=False)
                if is_box_arch(card.get("arch")):  # no engine: `classify` runs this very predict
                    classifier_ratio = "classifier: its own predict, the path `classify` takes"
                else:
                    eng_cls = _predict_seconds_per_voxel(classifier, (batch,) + (box,) * 3, engine=True)
                    classifier_ratio = f"classifier {ref_cls / eng_cls:.1f}x the same batch through the engine"
                network = timings.get("network", 0.0) + timings.get("classify", 0.0)
                estimate = ref_loc * voxels * loc_flips + ref_cls * boxes * box**3 * cls_flips
                print(f"  baseline: networks through MSDNet.predict / the classifier's predict, estimated "
                      f"from {min(BASELINE_PLANES, shape[0])} whole planes and one batch of {batch} {box}^3 boxes: {estimate:.0f} s "
                      f"(per voxel and pass: localizer {ref_loc / (per_pass * 1e-6):.1f}x this run's "
                      f"whole-volume pass; {classifier_ratio}) vs {network:.1f} s measured; "
                      f"pick would take {total - network + estimate:.0f} s, "
                      f"{(total - network + estimate) / total:.1f}x this run", flush=True)
    finally:
        torch.set_num_threads(previous)
