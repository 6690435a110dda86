"""Stage 1 end to end on one tomogram: normalise -> tiled MSDNet -> map -> particles.

`localize_volume` is the whole stage for library callers; `segment_volume`
and `particles_from_map` are its two halves, which `vpdetect localize` (that
may save the map) and `vpdetect pick` (that hands the map's normalisation,
`tomogram_stats`, on to stage 2) call themselves. No file is read or written
here: the CLI opens the tomogram and writes the table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.localize.cluster import find_particles
from vpdetect.localize.tiling import (
    DEFAULT_HALO_CAP,
    DEFAULT_TILE,
    MAP_IN_MEMORY_VOXELS,
    PageReleasingVolume,
    allocate_map,
    predict_map,
)
from vpdetect.nn.checkpoint import check_inference_card
from vpdetect.preprocess import zscore_params

log = logging.getLogger("vpdetect.localize")

# Built-in post-processing defaults, used where neither the command line nor the
# model card (`postprocess`, chosen by `vpdetect tune` on validation tomograms) sets a value.
DEFAULT_THRESHOLD = 0.5
DEFAULT_OPENING_RADIUS = 1
# SHREC particles are 2.5-6 nm in radius at 1 nm voxels: a 5-voxel flat kernel
# covers the large ones without merging small touching neighbours.
DEFAULT_BANDWIDTH = 5.0
DEFAULT_MIN_SIZE = 10


@dataclass
class LocalizeOptions:
    """Everything that steers stage 1 besides the model and the tomogram.

    bandwidth: mean-shift bandwidth in voxels; None = particle_diameter / 2 in
    voxels when a diameter (Angstrom) is given, else DEFAULT_BANDWIDTH.
    halo: context voxels per tile side; None = min(model.halo, DEFAULT_HALO_CAP).
    z_range: first and last slice (0-based, inclusive) to search, or None.
    device: a concrete torch device string ("cpu", "cuda:0").
    precision: "auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16".
    """

    threshold: float | None = None
    opening_radius: int | None = None
    bandwidth: float | None = None
    particle_diameter: float | None = None
    min_size: int | None = None
    merge_radius: float | None = None
    # Drop hollow components (membranes) whose centroid is this far outside them; None = bandwidth.
    max_centre_gap: float | None = None
    tile: int = DEFAULT_TILE
    halo: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    precision: str = "auto"
    z_range: tuple[int, int] | None = None
    max_map_in_memory_voxels: int = MAP_IN_MEMORY_VOXELS

    def resolved_bandwidth(self, voxel_size: float | None) -> float:
        """The bandwidth in voxels for a tomogram of the given voxel size (Angstrom)."""
        if self.bandwidth is not None:
            if self.bandwidth <= 0:
                raise VPDetectError(f"bandwidth must be positive, got {self.bandwidth}")
            return float(self.bandwidth)
        if self.particle_diameter is not None:
            if self.particle_diameter <= 0:
                raise VPDetectError(f"particle diameter must be positive, got {self.particle_diameter}")
            if voxel_size is None:
                raise VPDetectError(
                    "--particle-diameter needs the voxel size, which the MRC header does not give; "
                    "pass --pixel-size or --bandwidth"
                )
            return self.particle_diameter / (2.0 * voxel_size)
        return DEFAULT_BANDWIDTH

    def with_model_defaults(self, card: dict) -> LocalizeOptions:
        """Unset (None) post-processing settings from the model card's tuned `postprocess`
        values, else the built-in defaults. The tuned merge radius only comes with the
        tuned bandwidth (they were chosen together)."""
        tuned = card.get("postprocess") or {}
        updates: dict = {}
        for name, default in (
            ("threshold", DEFAULT_THRESHOLD),
            ("opening_radius", DEFAULT_OPENING_RADIUS),
            ("min_size", DEFAULT_MIN_SIZE),
        ):
            if getattr(self, name) is None:
                updates[name] = type(default)(tuned.get(name, default))
        if self.bandwidth is None and self.particle_diameter is None and "bandwidth" in tuned:
            updates["bandwidth"] = float(tuned["bandwidth"])
            if self.merge_radius is None and tuned.get("merge_radius") is not None:
                updates["merge_radius"] = float(tuned["merge_radius"])
        return replace(self, **updates)

    def resolved_halo(self, model) -> int:
        return int(min(model.halo, DEFAULT_HALO_CAP) if self.halo is None else self.halo)

    def as_dict(self) -> dict:
        """Plain values for provenance records."""
        values = asdict(self)
        if values["z_range"] is not None:
            values["z_range"] = list(values["z_range"])
        return values


def check_localizer(card: dict) -> None:
    """Refuse a model that is not a localizer or expects another input normalisation."""
    check_inference_card(card, "localizer")


def minimum_size(card: dict, model) -> int:
    """The smallest edge (voxels) a tomogram may have: the model's training crop size."""
    crop = card.get("crop_size")
    return int(crop) if crop else 2 * int(min(model.halo, DEFAULT_HALO_CAP)) + 1


def check_volume(tomo, model, card: dict) -> None:
    """One-line errors for volumes the localizer cannot use (too small, not 3D)."""
    shape = tuple(tomo.data.shape)
    if len(shape) != 3:
        raise VPDetectError(f"expected a 3D tomogram, got an array of shape {shape}")
    needed = minimum_size(card, model)
    if min(shape) < needed:
        x, y, z = shape[2], shape[1], shape[0]
        raise VPDetectError(
            f"tomogram is {x}x{y}x{z} voxels; the localizer needs at least {needed} along each axis "
            "(its training crop size)"
        )


def _search_slices(shape_z: int, z_range: tuple[int, int] | None, context: int) -> tuple[int, int]:
    if z_range is None:
        return 0, shape_z
    z0, z1 = int(z_range[0]), int(z_range[1])
    if z0 > z1 or z1 < 0 or z0 >= shape_z:
        raise VPDetectError(f"z range {z0}..{z1} lies outside the tomogram's slices 0..{shape_z - 1}")
    return max(0, z0 - context), min(shape_z, z1 + 1 + context)


def _finer_rows(volume: np.ndarray) -> np.ndarray:
    """The same voxels with 8x more, thinner rows along axis 0 (no copy) when the shape allows.

    Statistics do not depend on the shape, and `zscore_params` reads 32 rows at
    a time in float64: thinner rows keep that working set small on big volumes.
    """
    z, y, x = volume.shape
    if y % 8 or not volume.flags.c_contiguous:
        return volume
    return volume.reshape(z * 8, y // 8, x)


def tomogram_stats(volume: np.ndarray) -> tuple[float, float]:
    """The z-score (mean, std) of a whole tomogram, read slab by slab.

    Pages of a memory-mapped file are released as the sweep passes, so a
    tomogram larger than memory costs no more than a few slabs. `vpdetect pick`
    computes these once and hands them to both stages.
    """
    streamed = PageReleasingVolume(_finer_rows(volume))
    try:
        return zscore_params(streamed)
    finally:
        streamed.release()


def segment_volume(
    tomo,
    model,
    card: dict,
    options: LocalizeOptions,
    progress: Callable[[int, int], None] | None = None,
    stats: tuple[float, float] | None = None,
) -> tuple[np.ndarray, dict]:
    """The foreground probability map of a tomogram (float16; a disk-backed memmap when large).

    With a z range only the needed slices (plus one halo of context) go
    through the network; the rest of the map is 0. `stats` reuses (mean, std)
    from `tomogram_stats`. Returns (map, timings) with "load" (normalisation
    statistics), "network" and "stitch" seconds.
    """
    check_localizer(card)
    check_volume(tomo, model, card)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    volume = tomo.data
    mean, std = stats if stats is not None else tomogram_stats(volume)
    timings["load"] = time.perf_counter() - start

    halo = options.resolved_halo(model)
    z_lo, z_hi = _search_slices(volume.shape[0], options.z_range, halo)
    prob = allocate_map(volume.shape, np.float16, options.max_map_in_memory_voxels)
    model.to(options.device)
    predict_map(
        model,
        volume[z_lo:z_hi],
        mean,
        std,
        tile=options.tile,
        halo=halo,
        batch_size=options.batch_size,
        device=options.device,
        progress=progress,
        out=prob[z_lo:z_hi],
        precision=options.precision,
        timings=timings,
    )
    return prob, timings


def particles_from_map(
    prob: np.ndarray,
    tomo,
    options: LocalizeOptions,
    roi: np.ndarray | None = None,
    timings: dict | None = None,
):
    """Particles of a probability map as a ParticleTable of the tomogram (columns x, y, z,
    tomo_name, tomo_path, score, cluster_size). An empty table is valid; a warning says so."""
    from vpdetect.io.particles import ParticleTable

    start = time.perf_counter()
    bandwidth = options.resolved_bandwidth(tomo.voxel_size)
    found = find_particles(
        prob,
        threshold=options.threshold,
        opening_radius=options.opening_radius,
        bandwidth=bandwidth,
        min_size=options.min_size,
        roi=roi,
        z_range=options.z_range,
        merge_radius=options.merge_radius,
        max_centre_gap=options.max_centre_gap,
    )
    found.insert(3, "tomo_name", tomo.name)
    found.insert(4, "tomo_path", str(tomo.path.resolve()) if tomo.path is not None else "")
    table = ParticleTable(
        data=found.reset_index(drop=True), voxel_size=tomo.voxel_size, tomo_size=tomo.shape_xyz
    )
    if timings is not None:
        timings["cluster"] = timings.get("cluster", 0.0) + time.perf_counter() - start
    if len(table) == 0:
        log.warning(
            "no particles found in %s (threshold %g, min size %d): wrote an empty table",
            tomo.name, options.threshold, options.min_size,
        )
    return table


def localize_volume(
    tomo,
    model,
    card: dict,
    options: LocalizeOptions,
    roi: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
):
    """Stage 1 on one tomogram: (ParticleTable, timings).

    `model` is a loaded localizer (e.g. from `vpdetect.nn.checkpoint.load_model`)
    already on `options.device`; `roi` (same shape as the tomogram, nonzero =
    search) restricts the search. Timings hold seconds for "load", "network",
    "stitch" and "cluster".
    """
    options = options.with_model_defaults(card)
    prob, timings = segment_volume(tomo, model, card, options, progress)
    table = particles_from_map(prob, tomo, options, roi, timings)
    return table, timings


def format_timings(timings: dict) -> str:
    """`load 0.1 s, network 3.2 s, ...` in the order the phases run."""
    order = ["load", "network", "stitch", "cluster", "write"]
    names = [n for n in order if n in timings] + [n for n in timings if n not in order]
    total = sum(timings.values())
    return ", ".join(f"{n} {timings[n]:.2f} s" for n in names) + f" (total {total:.2f} s)"
