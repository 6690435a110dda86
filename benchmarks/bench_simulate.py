"""Simulation speed and memory (issue 3 point 4).

1. Projector: vpdetect's sparse single-axis projector (one matrix, all
   y-slices at once) against the baseline `skimage.transform.radon` run slice
   by slice, on the same 256 x 256 x 100 slab and 61 tilts; both timed here.
2. Whole tomograms with the `shrec21` preset: 256^3 (100-voxel slab) and
   512^3 (200-voxel slab), each in a fresh process so that its peak resident
   memory is its own. Targets: 256^3 < 30 s, 512^3 < 3 min, < 6 GB.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

CHILD = """
import json, resource, sys, time
from vpdetect.simulate import preset_params, simulate_tomogram
x, y, z, slab = (int(v) for v in sys.argv[1:5])
start = time.perf_counter()
result = simulate_tomogram(preset_params("shrec21", shape_xyz=(x, y, z), slab_thickness=slab), seed=0)
print(json.dumps({
    "seconds": time.perf_counter() - start,
    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "particles": len(result.particles.data),
    "snr": result.metadata["snr_measured"],
}))
"""


def _projector_speed() -> None:
    from skimage.transform import radon

    from vpdetect.simulate.microscope import build_backprojector, project, tilt_angles

    n, slab = 256, 100
    angles = tilt_angles(-60, 60, 2)
    rng = np.random.default_rng(0)
    volume = rng.random((slab, n, n), dtype=np.float32)

    start = time.perf_counter()
    matrix = build_backprojector(n, slab, angles)
    built = time.perf_counter() - start
    start = time.perf_counter()
    images = project(volume, matrix, len(angles))
    ours = time.perf_counter() - start

    sample = 8
    start = time.perf_counter()
    for y in range(sample):
        # radon wants a square image: pad the slab's x-z slice to n x n
        padded = np.zeros((n, n), np.float32)
        z0 = (n - slab) // 2
        padded[z0 : z0 + slab] = volume[:, y, :]
        sinogram = radon(padded, theta=angles, circle=False)
    baseline = (time.perf_counter() - start) / sample * n
    # radon's detector is the padded image's diagonal: its middle n bins are ours
    offset = (sinogram.shape[0] - n) // 2
    zero_tilt = int(np.argmin(np.abs(angles)))
    agreement = np.corrcoef(sinogram[offset : offset + n, zero_tilt], images[zero_tilt, sample - 1])[0, 1]
    print(f"projector {n}x{n}x{slab}, {len(angles)} tilts: build {built:.2f} s, "
          f"project all {n} slices {ours:.2f} s")
    print(f"baseline skimage radon per slice: {baseline:.1f} s for {n} slices "
          f"(vpdetect {baseline / ours:.0f}x faster; correlation of the 0-degree lines {agreement:.3f})")


def _tomogram(shape_xyz: tuple[int, int, int], slab: int) -> None:
    output = subprocess.run(
        [sys.executable, "-c", CHILD, *(str(v) for v in shape_xyz), str(slab)],
        check=True, capture_output=True, text=True,
    ).stdout
    import json

    figures = json.loads(output.strip().splitlines()[-1])
    x, y, z = shape_xyz
    print(f"shrec21 {x}x{y}x{z}, slab {slab}: {figures['seconds']:.1f} s, peak memory "
          f"{figures['peak_mb'] / 1024:.2f} GB, {figures['particles']} particles, SNR {figures['snr']:.2f}")


def run() -> None:
    _projector_speed()
    _tomogram((256, 256, 256), 100)
    _tomogram((512, 512, 512), 200)


if __name__ == "__main__":
    run()
