"""Stage 1 end to end on one tomogram: normalise -> tiled MSDNet -> map -> particles.

`localize_volume` is the whole stage for library callers; `segment_volume`
and `particles_from_map` are its two halves, which `vpdetect localize` (that
may save the map) and `vpdetect pick` call themselves. `model_input` brings
the tomogram to the model: its voxel size (Fourier resampling), its
normalisation and its contrast. No file is read or written here: the CLI
opens the tomogram and writes the table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.localize.cluster import find_particles
from vpdetect.localize.fiducials import (
    Bead,
    find_beads,
    gold_beads,
    picks_on_beads,
)
from vpdetect.localize.gold_streaks import remove_gold_streaks
from vpdetect.localize.membranes import drop_remnants, erase_membranes
from vpdetect.localize.tiling import (
    DEFAULT_HALO_CAP,
    MAP_IN_MEMORY_VOXELS,
    allocate_map,
    choose_tile,
    predict_map,
    recompute_factor,
    tile_shape,
)
from vpdetect.localize.verify import score_picks
from vpdetect.nn.checkpoint import check_inference_card
from vpdetect.nn.flips import resolve_flips
from vpdetect.preprocess import (
    CONTRASTS,
    NORMALISATION,
    clip_of,
    contrast_sign,
    detect_contrast,
    robust_from_sample,
    streamed_zscore_params,
    subtract_background,
)
from vpdetect.resample import (
    fourier_resample,
    grid_scale,
    nearest_resample,
    resampled_shape,
    rescale_factor,
)
from vpdetect.spectrum import match_spectrum

log = logging.getLogger("vpdetect.localize")

# Built-in post-processing defaults, used where neither the command line nor the
# model card (`postprocess`, chosen by `vpdetect tune` on validation tomograms) sets a value.
DEFAULT_THRESHOLD = 0.5
DEFAULT_OPENING_RADIUS = 1
# SHREC particles are 2.5-6 nm in radius at 1 nm voxels: a 5-voxel flat kernel
# covers the large ones without merging small touching neighbours.
DEFAULT_BANDWIDTH = 5.0
DEFAULT_MIN_SIZE = 10
# Least mean probability of a cluster's voxels (0: keep all, as older models did).
DEFAULT_MIN_SCORE = 0.0
# The mean of a two-lobed particle's voxels can sit in the gap between its lobes, 1-2 voxels off
# the particle (SHREC's GET3 dimer); a ring's hole is wider and keeps its centre.
DEFAULT_SNAP_DISTANCE = 2.0
# Components larger than this many balls of the bandwidth are dropped (0: none): off unless the
# card (`vpdetect tune`) or the user sets it, so older models keep their behaviour.
DEFAULT_MAX_COMPONENT = 0.0
# Small components left unopened (0: the opening acts on all, as the paper's method does).
DEFAULT_SPARE_SMALL = 0.0


@dataclass
class LocalizeOptions:
    """Everything that steers stage 1 besides the model and the tomogram.

    bandwidth: mean-shift bandwidth in voxels; None = particle_diameter / 2 in
    voxels when a diameter (Angstrom) is given, else DEFAULT_BANDWIDTH.
    tile: tile edge in voxels; on the CPU the x-y edge of the full-depth columns an
    MSDNet streams along z. None = on the CPU the widest columns that fit CPU_MEMORY_SHARE
    of the free memory, on a GPU the largest cubic tile that fits half its free memory
    (`tiling.choose_tile`, which also refuses a tile too large).
    halo: context voxels per tile side (x and y only for z-streamed columns, which see the
    network's whole reach along z); None = min(model.halo, DEFAULT_HALO_CAP).
    z_range: first and last slice (0-based, inclusive) to search, or None.
    device: a concrete torch device string ("cpu", "cuda:0").
    precision: a `vpdetect.nn.precision` name (auto, fp32, tf32, bf16, fp16; CUDA only).
    contrast: the tomogram's particle contrast, "dark", "bright" or "auto"
    (detected); a tomogram of the other sign than the model expects is negated.
    rescale: resample a tomogram whose voxel size differs from the model's by
    more than 10 % to the model's (coordinates are mapped back). When that
    happens, bandwidth, min size and the other sizes in voxels are the model
    grid's (as `vpdetect tune` chose them); --particle-diameter stays in Angstrom.
    """

    threshold: float | None = None
    opening_radius: int | None = None
    bandwidth: float | None = None
    particle_diameter: float | None = None
    min_size: int | None = None
    # Drop clusters whose voxels' mean probability is below this; None = the card's tuned value, else 0.
    min_score: float | None = None
    merge_radius: float | None = None
    # Drop hollow components (membranes) whose centroid is this far outside them; None = bandwidth.
    max_centre_gap: float | None = None
    # A centre off the foreground moves to the nearest foreground voxel within this many voxels.
    snap_distance: float = DEFAULT_SNAP_DISTANCE
    # Drop components with more voxels than this many balls of the bandwidth (membranes,
    # carbon); None = the card's tuned value, else DEFAULT_MAX_COMPONENT (0: keep all).
    max_component: float | None = None
    # Drop the fragments the opening leaves of thin extended structures (membranes);
    # None = the card's tuned value, else off.
    drop_thin: bool | None = None
    # Components of at most this many typical particles are not opened (faint particles at low
    # SNR); None = the card's tuned value, else 0 (open all).
    spare_small: float | None = None
    # Drop picks on gold beads (`vpdetect.localize.fiducials`); None = the card's "drop_gold",
    # else off (SHREC'21 scores beads as its class `fiducial`).
    drop_gold: bool | None = None
    # Score every pick with the model's pick verifier and drop those under `min_verified`
    # (`vpdetect.localize.verify`); None = on when the model has one.
    verify: bool | None = None
    # None = the card's verifier min_score.
    min_verified: float | None = None
    # Bandwidth (and merge radius) as multiples of the particles' radius measured on the map,
    # used when neither bandwidth nor particle_diameter is set (from a tuned model card).
    bandwidth_factor: float | None = None
    merge_factor: float | None = None
    # The map averaged over this many axis flips of each tile (`vpdetect.nn.flips`; each
    # costs one more network pass); None = the model card's "test_time_flips", else 1.
    flips: int | None = None
    tile: int | None = None
    halo: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    precision: str = "auto"
    z_range: tuple[int, int] | None = None
    max_map_in_memory_voxels: int = MAP_IN_MEMORY_VOXELS
    contrast: str = "auto"
    rescale: bool = True
    # Filter the tomogram so its radial amplitude spectrum follows the model's training data
    # (`vpdetect.spectrum`); None = the card's "match_spectrum", else off.
    match_spectrum: bool | None = None
    # Replace large thin dense sheets (membranes, gold streak fans) by background noise before
    # the network (`vpdetect.localize.membranes`); None = the card's "erase_membranes", else off.
    erase_membranes: bool | None = None
    # Subtract the streaks of gold beads before the network (`vpdetect.localize.fiducials`);
    # None = the card's "remove_gold_streaks", else off.
    remove_gold_streaks: bool | None = None

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
            ("min_score", DEFAULT_MIN_SCORE),
            ("max_component", DEFAULT_MAX_COMPONENT),
            ("spare_small", DEFAULT_SPARE_SMALL),
        ):
            if getattr(self, name) is None:
                updates[name] = type(default)(tuned.get(name, default))
        if self.drop_thin is None:
            updates["drop_thin"] = bool(tuned.get("drop_thin", False))
        if self.drop_gold is None:
            updates["drop_gold"] = bool(card.get("drop_gold", False))
        verifier = card.get("verifier") or {}
        if self.verify and not verifier:
            raise VPDetectError("this localizer has no pick verifier (`vpdetect train-verifier` adds one): "
                                "run without --verify")
        if self.verify is None:
            updates["verify"] = bool(verifier)
        if self.min_verified is None:
            updates["min_verified"] = float(verifier.get("min_score", 0.0))
        elif not 0.0 <= self.min_verified <= 1.0:
            raise VPDetectError(f"the minimum verifier score must lie in [0, 1], got {self.min_verified:g}")
        updates["flips"] = resolve_flips(self.flips, card)
        user_size = self.bandwidth is not None or self.particle_diameter is not None
        if not user_size and self.bandwidth_factor is None and tuned.get("bandwidth_factor") is not None:
            updates["bandwidth_factor"] = float(tuned["bandwidth_factor"])
            if self.merge_radius is None and tuned.get("merge_factor") is not None:
                updates["merge_factor"] = float(tuned["merge_factor"])
        elif not user_size and self.bandwidth_factor is None and tuned.get("bandwidth") is not None:
            updates["bandwidth"] = float(tuned["bandwidth"])
            if self.merge_radius is None and tuned.get("merge_radius") is not None:
                updates["merge_radius"] = float(tuned["merge_radius"])
        return replace(self, **updates)

    def adaptive(self) -> bool:
        """True when the bandwidth is measured on the map (no bandwidth or diameter given)."""
        return self.bandwidth is None and self.particle_diameter is None and self.bandwidth_factor is not None

    def resolved_tile(self, model, volume_shape, free: int | None = None):
        """The tile (an edge, or (z, y, x) edges) for a volume on this device, checked
        against the free memory."""
        from vpdetect.nn.precision import resolve_precision

        bytes_per_value = resolve_precision(self.precision, self.device).dtype.itemsize
        return choose_tile(model, tuple(volume_shape), self.device, self.batch_size, bytes_per_value,
                           self.tile, free, self.resolved_halo(model))

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


def check_volume(volume: np.ndarray, model, card: dict) -> None:
    """One-line errors for volumes the localizer cannot use (too small, not 3D)."""
    shape = tuple(volume.shape)
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


def tomogram_stats(volume: np.ndarray, method: str = NORMALISATION) -> tuple[float, float]:
    """The (centre, scale) of a whole tomogram for a normalisation method, read block by block.

    Pages of a memory-mapped file are released as the sweep passes, so a
    tomogram larger than memory costs no more than a few blocks. The robust
    statistics come from a strided sample after that checked sweep.
    """
    mean, std = streamed_zscore_params(volume)
    if method == "robust":
        return robust_from_sample(volume, std)
    return mean, std


@dataclass
class ModelInput:
    """The tomogram as the localizer sees it: at the model's voxel size, normalised and with
    the model's contrast. `scale_zyx` is original voxels per model voxel (None: not resampled)."""

    volume: np.ndarray
    centre: float
    scale: float  # negative when the contrast is flipped
    clip: float | None
    contrast: str
    contrast_score: float | None
    scale_zyx: tuple[float, float, float] | None
    erased: np.ndarray | None = None  # voxels replaced by noise (`--erase-membranes`), model grid
    beads: list[Bead] | None = None  # gold beads on the model grid (None: not looked for)


# Steps of `model_input` timed as phases of their own (the rest of it is "load").
CLEANING_PHASES = ("gold", "membranes")


def _chosen(value: bool | None, card: dict, key: str) -> bool:
    """An on/off option: as given, else the model card's choice, else off."""
    return bool(card.get(key, False)) if value is None else value


def model_input(tomo, card: dict, options: LocalizeOptions, timings: dict | None = None) -> ModelInput:
    """Resample (if the voxel sizes differ), subtract the smooth background (where the card asks),
    measure the normalisation and decide the contrast."""
    start = time.perf_counter()
    volume = tomo.data
    scale_zyx = None
    factor = rescale_factor(tomo.voxel_size, card.get("voxel_size")) if options.rescale else None
    if factor is not None:
        shape = resampled_shape(volume.shape, factor)
        volume = fourier_resample(volume, shape)
        scale_zyx = tuple(float(v) for v in grid_scale(tomo.data.shape, shape))
        log.info(
            "%s: voxel size %.3g A, model %.3g A: resampled by %.3f to %d x %d x %d voxels (--no-rescale to keep it)",
            tomo.name, tomo.voxel_size, card["voxel_size"], factor, shape[2], shape[1], shape[0],
        )
        if timings is not None:
            timings["rescale"] = time.perf_counter() - start
    start = time.perf_counter()
    phases: dict[str, float] = {}  # the cleaning steps that ran
    volume = subtract_background(volume, card.get("background_sigma"))
    method = card.get("normalisation", NORMALISATION)
    beads = None
    remove_streaks = _chosen(options.remove_gold_streaks, card, "remove_gold_streaks")
    if remove_streaks or _chosen(options.drop_gold, card, "drop_gold"):
        # Before the spectrum is matched: the beads' far excess is what finds them.
        phase_start = time.perf_counter()
        volume = np.asarray(volume, dtype=np.float32)
        stats = tomogram_stats(volume, "robust")
        beads = find_beads(volume, *stats)
        if remove_streaks and beads:
            volume, _, tilt_range = remove_gold_streaks(volume, *stats, beads)
            if tilt_range is not None:
                log.info("%s: streaks of %d gold bead(s) subtracted, fitted over tilts %+.0f..%+.0f deg "
                         "(--keep-gold-streaks to keep them)", tomo.name, len(beads), *tilt_range)
        phases["gold"] = time.perf_counter() - phase_start
    # Matched as the model sees the tomogram: after the background subtraction, so that a
    # carbon film or thick ice is not clipped into a plateau before it is filtered.
    if _chosen(options.match_spectrum, card, "match_spectrum"):
        reference = card.get("spectrum_reference")
        if not reference:
            raise VPDetectError(
                "this localizer's card records no reference spectrum (`vpdetect train` records one): "
                "run without --match-spectrum"
            )
        volume = match_spectrum(volume, reference)
        log.info("%s: amplitude spectrum matched to the model's training data", tomo.name)
    centre, scale = tomogram_stats(volume, method)
    # Models of version 0.1 record no contrast: they get the tomogram as it is.
    expected = card.get("contrast")
    score = None
    if options.contrast not in (*CONTRASTS, "auto"):
        raise VPDetectError(f"contrast must be dark, bright or auto, got {options.contrast!r}")
    if expected is None:
        contrast = options.contrast
    elif options.contrast == "auto":
        contrast, score = detect_contrast(volume)
        log.info("%s: particles look %s (contrast score %+.2f; --contrast to set it)", tomo.name, contrast, score)
    else:
        contrast = options.contrast
    if expected is not None:
        scale *= contrast_sign(contrast, expected)
    erased = None
    if _chosen(options.erase_membranes, card, "erase_membranes"):
        # Dense matter is dark in the network's input where the model expects dark particles
        # (a model that records no contrast gets the tomogram as given: dark unless told bright).
        dense_sign = np.sign(scale) * (1.0 if (expected or contrast) == "bright" else -1.0)
        voxel_a = card.get("voxel_size") if factor is not None else (tomo.voxel_size or card.get("voxel_size"))
        phase_start = time.perf_counter()
        volume, erased = erase_membranes(volume, centre, scale, dense_sign, (voxel_a or 10.0) / 10.0)
        log.info("%s: %.1f %% of the voxels on membranes erased (--keep-membranes to keep them)",
                 tomo.name, 100.0 * erased.mean())
        phases["membranes"] = time.perf_counter() - phase_start
    if timings is not None:
        timings["load"] = timings.get("load", 0.0) + time.perf_counter() - start - sum(phases.values())
        for phase, seconds in phases.items():
            timings[phase] = timings.get(phase, 0.0) + seconds
    return ModelInput(volume, centre, scale, clip_of(method), contrast, score, scale_zyx, erased, beads)


def segment_volume(
    tomo,
    model,
    card: dict,
    options: LocalizeOptions,
    progress: Callable[[int, int], None] | None = None,
    prepared: ModelInput | None = None,
) -> tuple[np.ndarray, dict]:
    """The foreground probability map of a tomogram (float16; a disk-backed memmap when large).

    The map is on the model's grid (`model_input`): the tomogram's own unless
    it was resampled to the model's voxel size; `particles_from_map` maps
    coordinates back. With a z range only the needed slices (plus one halo of
    context) go through the network; the rest of the map is 0. `prepared`
    reuses a `model_input` result. Returns (map, timings) with "load"
    (statistics and contrast), "rescale" (if resampled), "network" and "stitch" seconds.
    """
    check_localizer(card)
    timings: dict[str, float] = {"load": 0.0}
    prepared = prepared or model_input(tomo, card, options, timings)
    volume = prepared.volume
    check_volume(volume, model, card)

    halo = options.resolved_halo(model)
    z_range = _model_z_range(options.z_range, prepared.scale_zyx)
    z_lo, z_hi = _search_slices(volume.shape[0], z_range, halo)
    # Before the map is allocated: a tile too large for the device fails at once, in one line.
    tile = options.resolved_tile(model, (z_hi - z_lo, *volume.shape[1:]))
    log.debug("%s: tiles of %s voxels (z, y, x), halo %d, batch %d on %s, %.2f x the voxels computed",
              tomo.name, tile_shape((z_hi - z_lo, *volume.shape[1:]), tile), halo, options.batch_size,
              options.device, recompute_factor((z_hi - z_lo, *volume.shape[1:]), tile, halo))
    prob = allocate_map(volume.shape, np.float16, options.max_map_in_memory_voxels)
    model.to(options.device)
    predict_map(
        model,
        volume[z_lo:z_hi],
        prepared.centre,
        prepared.scale,
        tile=tile,
        halo=halo,
        batch_size=options.batch_size,
        device=options.device,
        progress=progress,
        out=prob[z_lo:z_hi],
        precision=options.precision,
        timings=timings,
        clip=prepared.clip,
        flips=resolve_flips(options.flips, card),
    )
    if prepared.erased is not None:
        # Pieces as the card's (or the given) threshold and opening cut them; `tune` then
        # searches its thresholds on the cleaned map.
        resolved = options.with_model_defaults(card)
        dropped = drop_remnants(prob, prepared.erased, resolved.threshold, resolved.opening_radius)
        log.debug("%s: %d leftover piece(s) of erased membranes removed from the map", tomo.name, dropped)
    return prob, timings


def _model_z_range(z_range, scale_zyx):
    """A z range of the tomogram's slices on the model grid (widened to whole slices)."""
    if z_range is None or scale_zyx is None:
        return z_range
    return (int(np.floor(z_range[0] / scale_zyx[0])), int(np.ceil(z_range[1] / scale_zyx[0])))


def particles_from_map(
    prob: np.ndarray,
    tomo,
    options: LocalizeOptions,
    roi: np.ndarray | None = None,
    timings: dict | None = None,
    model=None,
    prepared: ModelInput | None = None,
):
    """Particles of a probability map as a ParticleTable of the tomogram (columns x, y, z,
    tomo_name, tomo_path, score, cluster_size; `data.attrs["bandwidth"]` the mean-shift
    bandwidth used). An empty table is valid; a warning says so. With `options.verify`,
    `model` (the localizer, holding its `verifier`) and `prepared` (the map's `model_input`)
    are needed: picks the verifier scores under `options.min_verified` are dropped."""
    from vpdetect.io.particles import ParticleTable

    start = time.perf_counter()
    # A map of another shape is on the model grid: sizes there, coordinates mapped back.
    scale_zyx = None if prob.shape == tomo.data.shape else grid_scale(tomo.data.shape, prob.shape)
    voxel_size = tomo.voxel_size
    if scale_zyx is not None:
        roi = nearest_resample(roi, prob.shape) if roi is not None else None
        voxel_size = tomo.voxel_size * float(np.mean(scale_zyx)) if tomo.voxel_size else None
    bandwidth = None if options.adaptive() else options.resolved_bandwidth(voxel_size)
    found = find_particles(
        prob,
        threshold=options.threshold,
        opening_radius=options.opening_radius,
        bandwidth=bandwidth,
        min_size=options.min_size,
        min_score=options.min_score,
        roi=roi,
        z_range=_model_z_range(options.z_range, scale_zyx),
        merge_radius=options.merge_radius,
        max_centre_gap=options.max_centre_gap,
        bandwidth_factor=options.bandwidth_factor,
        merge_factor=options.merge_factor,
        snap_distance=options.snap_distance,
        max_component=options.max_component,
        drop_thin=bool(options.drop_thin),
        spare_small=float(options.spare_small or 0.0),
    )
    if options.drop_gold and len(found):
        on_gold = _picks_on_gold(found[["z", "y", "x"]].to_numpy(), tomo, prepared, scale_zyx)
        if on_gold.any():
            log.info("%s: %d pick(s) on gold beads dropped (--keep-gold keeps them)", tomo.name, int(on_gold.sum()))
        found = found[~on_gold]
    verify_seconds = 0.0
    if options.verify and len(found):
        verify_start = time.perf_counter()
        found = _verified(found, prob, tomo, options, model, prepared)
        verify_seconds = time.perf_counter() - verify_start
    if bandwidth is None:
        log.info("%s: mean-shift bandwidth %.1f voxels (%g x the particles' radius measured on the map; "
                 "--bandwidth or --particle-diameter to set it)", tomo.name, found.attrs["bandwidth"],
                 options.bandwidth_factor)
    if scale_zyx is not None:
        for axis, column in enumerate(("z", "y", "x")):
            found[column] = found[column] * scale_zyx[axis]
        if options.z_range is not None:  # the widened model-grid range may reach past the asked one
            z0, z1 = options.z_range
            found = found[(found["z"] >= z0 - 0.5) & (found["z"] <= z1 + 0.5)]
    found.insert(3, "tomo_name", tomo.name)
    found.insert(4, "tomo_path", str(tomo.path.resolve()) if tomo.path is not None else "")
    used_bandwidth = found.attrs["bandwidth"]
    table = ParticleTable(
        data=found.reset_index(drop=True), voxel_size=tomo.voxel_size, tomo_size=tomo.shape_xyz
    )
    table.data.attrs["bandwidth"] = used_bandwidth  # model-grid voxels, for provenance records
    if timings is not None:
        timings["cluster"] = timings.get("cluster", 0.0) + time.perf_counter() - start - verify_seconds
        if options.verify:
            timings["verify"] = timings.get("verify", 0.0) + verify_seconds
    if len(table) == 0:
        log.warning(
            "no particles found in %s (threshold %g, min size %d): wrote an empty table",
            tomo.name, options.threshold, options.min_size,
        )
    return table


def _picks_on_gold(centres_zyx: np.ndarray, tomo, prepared: ModelInput | None, scale_zyx) -> np.ndarray:
    """Which picks (model grid) sit on a gold bead: a bead found on the model grid whose peak
    contrast in the tomogram passes `fiducials.gold_beads` against the picks'."""
    beads = _model_grid_beads(tomo, prepared, scale_zyx)
    if not beads:
        return np.zeros(len(centres_zyx), dtype=bool)
    to_tomogram = np.ones(3) if scale_zyx is None else np.asarray(scale_zyx, dtype=np.float64)
    gold = gold_beads(tomo.data, np.array([b.centre for b in beads]) * to_tomogram, centres_zyx * to_tomogram)
    return picks_on_beads(centres_zyx, [b for b, is_gold in zip(beads, gold, strict=True) if is_gold])


def _model_grid_beads(tomo, prepared: ModelInput | None, scale_zyx) -> list[Bead]:
    """The tomogram's gold beads on the model grid: as `model_input` found them, else found in
    the tomogram and scaled (`scale_zyx`: original voxels per model voxel, None = the same grid;
    a scaled bead's centre and radius are the model grid's, its core box stays the tomogram's)."""
    if prepared is not None and prepared.beads is not None:
        return prepared.beads
    volume = np.asarray(tomo.data, dtype=np.float32)
    beads = find_beads(volume, *tomogram_stats(volume, "robust"))
    if scale_zyx is None:
        return beads
    scale = np.asarray(scale_zyx, dtype=np.float64)
    return [replace(b, centre=b.centre / scale, radius=b.radius / float(scale.mean())) for b in beads]


def _verified(found, prob, tomo, options: LocalizeOptions, model, prepared: ModelInput | None):
    """`found` (model-grid picks) without those the model's verifier scores under the minimum."""
    verifier = getattr(model, "verifier", None)
    if verifier is None or prepared is None:
        raise ValueError("verifying picks needs the localizer holding a verifier and the map's model input")
    scores = score_picks(verifier, prepared, prob, found[["z", "y", "x"]].to_numpy(), options.device)
    rejected = scores < options.min_verified
    if rejected.any():
        log.info("%s: pick verifier dropped %d of %d pick(s) under %g (--no-verify keeps them)",
                 tomo.name, int(rejected.sum()), len(found), options.min_verified)
    return found[~rejected]


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
    input_timings: dict[str, float] = {}
    prepared = model_input(tomo, card, options, input_timings)
    prob, timings = segment_volume(tomo, model, card, options, progress, prepared=prepared)
    for phase, seconds in input_timings.items():
        timings[phase] = timings.get(phase, 0.0) + seconds
    table = particles_from_map(prob, tomo, options, roi, timings, model=model, prepared=prepared)
    return table, timings


def format_timings(timings: dict) -> str:
    """`load 0.1 s, network 3.2 s, ...` in the order the phases run."""
    order = ["load", *CLEANING_PHASES, "network", "stitch", "cluster", "verify", "write"]
    names = [n for n in order if n in timings] + [n for n in timings if n not in order]
    total = sum(timings.values())
    return ", ".join(f"{n} {timings[n]:.2f} s" for n in names) + f" (total {total:.2f} s)"
