"""Training data: annotated tomograms -> class targets -> random, augmented crops.

Two steps keep sources and training classes apart:

1. An `AnnotatedVolume` holds a tomogram and a source label map whose ids name
   classes through `id_names` (occupancy ids of a SHREC folder -> the class on
   that line of particle_locations.txt; class_mask labels -> simulation.json's
   class table; painted spheres for coordinate-only data).
2. A `ClassMapping` (stage, selected/merged/excluded classes) turns source class
   names into target indices, giving a `TrainingVolume` (int16 targets, 0 =
   background) with the tomogram's own z-score statistics.

`CropDataset` cuts crops whose content depends only on (seed, index): the
training loop asks for indices epoch * n + i, so workers, processes (DDP
shards) and resumed runs all see exactly the same crops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.nn.losses import IGNORE_INDEX
from vpdetect.preprocess import (
    clip_of,
    contrast_sign,
    detect_contrast,
    normalisation_params,
    normalise,
    subtract_background,
)
from vpdetect.spectrum import match_spectrum

BACKGROUND = "background"
# Structure-centred crops (`CropDataset.structure_share`): band-passed energy this many times the
# tomogram's median marks non-particle structure, sampled on a grid of this stride, at most this
# many centres per tomogram, at least STRUCTURE_MARGIN voxels from any particle.
STRUCTURE_FLOOR = 4.0
STRUCTURE_STRIDE = 3
MAX_STRUCTURE_CENTRES = 4096
STRUCTURE_MARGIN = 8  # the band energy of a particle reaches ~8 voxels beyond it
# Not particles to pick: vesicles are membranes, excluded from targets unless asked for.
DEFAULT_EXCLUDE = ("vesicle",)


# --------------------------------------------------------------------------- sources


@dataclass
class AnnotatedVolume:
    """A tomogram with a source label map and the class name of every source id."""

    name: str
    volume: np.ndarray  # [z, y, x], raw values (may be memory-mapped)
    label_map: np.ndarray  # [z, y, x] int, 0 = background
    id_names: dict[int, str]  # source id -> class name
    centres_zyx: np.ndarray  # (n, 3) particle centres in voxels
    centre_names: list[str]  # class name of each centre
    voxel_size: float | None = None
    radii_vox: dict[str, float] = field(default_factory=dict)  # effective radius per class, voxels
    source: str = ""
    contrast: str | None = None  # "dark"/"bright" when known (a simulation record), else None


def equivalent_radius(n_voxels: float) -> float:
    """Radius of the sphere with the given volume (the effective radius of a sphere, 3V/A)."""
    return float((3.0 * n_voxels / (4.0 * math.pi)) ** (1.0 / 3.0))


def radii_from_occupancy(occupancy: np.ndarray, id_names: Mapping[int, str]) -> dict[str, float]:
    """Per class, the equivalent-sphere radius of its particles' mean voxel count."""
    counts = np.bincount(occupancy.ravel().astype(np.int64).clip(0))
    per_class: dict[str, list[int]] = {}
    for pid, name in id_names.items():
        if 0 < pid < counts.size and counts[pid] > 0:
            per_class.setdefault(name, []).append(int(counts[pid]))
    return {name: equivalent_radius(float(np.mean(v))) for name, v in per_class.items()}


def paint_spheres(
    shape: Sequence[int], centres_zyx: np.ndarray, ids: Sequence[int], radii_vox: Sequence[float]
) -> np.ndarray:
    """Label map with a ball of radius r_i and value ids[i] around each centre.

    Larger balls are painted first so a small particle touching a large one keeps its voxels.
    """
    labels = np.zeros(tuple(shape), dtype=np.int16)
    order = np.argsort(-np.asarray(radii_vox, dtype=np.float64), kind="stable")
    for i in order:
        r = float(radii_vox[i])
        c = np.asarray(centres_zyx[i], dtype=np.float64)
        lo = np.maximum(np.floor(c - r).astype(int), 0)
        hi = np.minimum(np.ceil(c + r).astype(int) + 1, labels.shape)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        inside = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][inside] = ids[i]
    return labels


# --------------------------------------------------------------------------- classes


def parse_merge(specs: Sequence[str]) -> dict[str, str]:
    """`NEW=OLD1,OLD2` options -> {old: new}: the old classes are trained as one class NEW."""
    mapping: dict[str, str] = {}
    for spec in specs:
        new, sep, olds = spec.partition("=")
        new = new.strip()
        old_names = [o.strip() for o in olds.split(",") if o.strip()]
        if not sep or not new or not old_names:
            raise VPDetectError(f"--merge expects NEW=OLD[,OLD...], got {spec!r}")
        for old in old_names:
            if old in mapping and mapping[old] != new:
                raise VPDetectError(f"--merge puts class {old!r} into both {mapping[old]!r} and {new!r}")
            mapping[old] = new
    return mapping


@dataclass
class ClassMapping:
    """Source class names -> target indices for one stage."""

    stage: str
    class_names: list[str]  # index 0 = background
    index_of: dict[str, int]  # every source name seen -> target index (0 = background)

    def index(self, name: str) -> int:
        return self.index_of.get(name, 0)


def build_class_mapping(
    names_seen: Sequence[str],
    stage: str,
    select: Sequence[str] | None = None,
    merge: Mapping[str, str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> ClassMapping:
    """Target classes from the class names in the data.

    Merging renames first; excluded names (case-insensitive, before or after
    merging) and, when `select` is given, names not selected become background.
    The localizer has one target class, "particle"; the classifier's classes
    follow `select`'s order, or sorted names.
    """
    if stage not in ("localizer", "classifier"):
        raise VPDetectError(f"unknown stage {stage!r} (expected localizer or classifier)")
    merge = dict(merge or {})
    excluded = {e.lower() for e in exclude}
    unknown_merge = sorted(set(merge) - set(names_seen))
    if unknown_merge:
        raise VPDetectError(f"--merge names classes not in the data: {', '.join(unknown_merge)}")
    renamed = {}
    for name in dict.fromkeys(names_seen):
        new = merge.get(name, name)
        if name.lower() == BACKGROUND or name.lower() in excluded or new.lower() in excluded:
            continue
        renamed[name] = new
    available = sorted(set(renamed.values()))
    if select:
        missing = [s for s in select if s not in available]
        if missing:
            raise VPDetectError(
                f"--classes names classes not in the data: {', '.join(missing)} "
                f"(available: {', '.join(available) or 'none'})"
            )
        chosen = list(dict.fromkeys(select))
    else:
        chosen = available
    if not chosen:
        raise VPDetectError("no particle classes left to train on (all excluded or none in the data)")
    if stage == "localizer":
        class_names = [BACKGROUND, "particle"]
        index_of = {old: 1 for old, new in renamed.items() if new in chosen}
    else:
        class_names = [BACKGROUND, *chosen]
        index_of = {old: chosen.index(new) + 1 for old, new in renamed.items() if new in chosen}
    return ClassMapping(stage=stage, class_names=class_names, index_of=index_of)


def merged_radii(annotated: Sequence[AnnotatedVolume], mapping: ClassMapping) -> dict[str, float]:
    """Effective radius of each target class: the mean over the sources that know it."""
    values: dict[str, list[float]] = {}
    for av in annotated:
        for name, r in av.radii_vox.items():
            idx = mapping.index(name)
            if idx > 0:
                values.setdefault(mapping.class_names[idx], []).append(float(r))
    return {name: float(np.mean(v)) for name, v in values.items()}


# --------------------------------------------------------------------------- targets


@dataclass
class TrainingVolume:
    """A tomogram ready for crop sampling: raw values, its z-score stats, int16 targets."""

    name: str
    volume: np.ndarray
    mean: float
    std: float
    targets: np.ndarray  # [z, y, x] int16, index into the mapping's class_names
    centres_zyx: np.ndarray  # (n, 3) int centres of target particles
    centre_classes: np.ndarray  # (n,) target index of each centre (>= 1)
    voxel_size: float | None = None
    clip: float | None = None  # clip after normalising (robust normalisation)
    contrast: str = "dark"  # the tomogram's own contrast (std < 0 when it is flipped)
    centre_radii: np.ndarray | None = None  # (n,) radius of each centre's class in voxels (NaN: unknown)


def prepare_volume(
    av: AnnotatedVolume,
    mapping: ClassMapping,
    normalisation: str = "zscore",
    contrast: str = "auto",
    expected_contrast: str = "dark",
    background_sigma: float = 0.0,
) -> TrainingVolume:
    """Map source ids to target classes and compute the tomogram's normalisation.

    With `background_sigma` the tomogram minus its smooth background
    (`vpdetect.preprocess.subtract_background`, as at inference) is what
    crops are cut from, held in memory as float32.

    The tomogram's contrast is its simulation record's, else `contrast`
    ("auto": detected); one whose contrast is not `expected_contrast` (what
    the model will expect) is negated through a negative scale.
    """
    if av.label_map.shape != av.volume.shape:
        raise VPDetectError(
            f"{av.source or av.name}: labels {av.label_map.shape} and tomogram {av.volume.shape} differ in shape"
        )
    max_id = int(max(av.id_names, default=0))
    lut = np.zeros(max(max_id, int(av.label_map.max(initial=0))) + 1, dtype=np.int16)
    for pid, name in av.id_names.items():
        if pid > 0:
            lut[pid] = mapping.index(name)
    targets = lut[np.asarray(av.label_map).clip(0).astype(np.int64, copy=False)]
    classes = np.array([mapping.index(n) for n in av.centre_names], dtype=np.int64)
    keep = classes > 0
    centres = np.rint(np.asarray(av.centres_zyx, dtype=np.float64).reshape(-1, 3)[keep]).astype(np.int64)
    volume = av.volume if not background_sigma else np.asarray(subtract_background(av.volume, background_sigma))
    try:
        mean, std = normalisation_params(volume, normalisation)
        own = av.contrast or (detect_contrast(volume)[0] if contrast == "auto" else contrast)
        std *= contrast_sign(own, expected_contrast)
    except VPDetectError as exc:
        raise VPDetectError(f"{av.name}: {exc}") from None
    return TrainingVolume(
        name=av.name,
        volume=volume,
        mean=mean,
        std=std,
        targets=targets,
        centres_zyx=centres,
        centre_classes=classes[keep],
        voxel_size=av.voxel_size,
        clip=clip_of(normalisation),
        contrast=own,
        centre_radii=np.array([av.radii_vox.get(n, np.nan) for n in av.centre_names], dtype=np.float64)[keep],
    )


def spectrum_matched(tv: TrainingVolume, reference, normalisation: str) -> TrainingVolume:
    """`tv` with its tomogram filtered towards the radial amplitude spectrum `reference`
    (`vpdetect.spectrum.match_spectrum`, as `localize --match-spectrum` filters a user's) and
    its normalisation measured again on the filtered tomogram, the contrast sign kept."""
    volume = match_spectrum(np.asarray(tv.volume, dtype=np.float32), reference)
    try:
        mean, std = normalisation_params(volume, normalisation)
    except VPDetectError as exc:
        raise VPDetectError(f"{tv.name}: {exc}") from None
    return replace(tv, volume=volume, mean=mean, std=float(np.copysign(std, tv.std)))


def streaks_removed(tv: TrainingVolume, normalisation: str) -> TrainingVolume:
    """`tv` with its gold beads' streaks subtracted (`vpdetect.localize.gold_streaks`, as `localize`
    subtracts a user's: after the background, before any spectrum matching) and its
    normalisation measured again, the contrast sign kept."""
    from vpdetect.localize.gold_streaks import remove_gold_streaks

    volume = np.asarray(tv.volume, dtype=np.float32)
    centre, scale = normalisation_params(volume, "robust")
    volume, beads, _ = remove_gold_streaks(volume, centre, scale)
    if not beads:
        return tv
    try:
        mean, std = normalisation_params(volume, normalisation)
    except VPDetectError as exc:
        raise VPDetectError(f"{tv.name}: {exc}") from None
    return replace(tv, volume=volume, mean=mean, std=float(np.copysign(std, tv.std)))


def membranes_erased(tv: TrainingVolume) -> TrainingVolume:
    """`tv` with its membranes replaced by noise (`vpdetect.localize.membranes`, as `localize`
    erases a user's: last, with the normalisation measured before, which stays). Labels are
    kept: a particle on a membrane is still a particle."""
    from vpdetect.localize.membranes import erase_membranes

    # Dense matter is dark in the model's input: the scale's sign says whether it is here too.
    dense_sign = -np.sign(tv.std)
    voxel_nm = (tv.voxel_size or 10.0) / 10.0  # as `localize` assumes without a voxel size
    volume, _ = erase_membranes(np.asarray(tv.volume, dtype=np.float32), tv.mean, tv.std, dense_sign, voxel_nm)
    return replace(tv, volume=volume)


def class_voxel_counts(volumes: Sequence[TrainingVolume], n_classes: int) -> np.ndarray:
    """Voxels per target class over all volumes (for --alpha frequency)."""
    total = np.zeros(n_classes, dtype=np.int64)
    for tv in volumes:
        total += np.bincount(tv.targets.ravel().astype(np.int64), minlength=n_classes)[:n_classes]
    return total


# --------------------------------------------------------------------------- crops


def cut_crop(volume: np.ndarray, corner: Sequence[int], size: int, fill) -> np.ndarray:
    """volume[corner : corner + size] along each axis, `fill` where it lies outside."""
    out = np.full((size, size, size), fill, dtype=volume.dtype)
    src, dst = [], []
    for c, n in zip(corner, volume.shape, strict=True):
        lo, hi = max(c, 0), min(c + size, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - c, hi - c))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flip of each of z, y and x (eight variants).

    A single-axis tilt series about y misses a wedge of the kx-kz plane around
    kx; flipping any axis maps that wedge onto itself, while a 90-degree turn
    about z (swapping x and y) would move it to the ky-kz plane, where real
    data never have it. So no turns: flips only.
    """
    flips = rng.random(3) < 0.5
    axes = tuple(a for a, f in zip((0, 1, 2), flips, strict=True) if f)
    if axes:
        image, labels = np.flip(image, axes), np.flip(labels, axes)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def structure_centres(tv: TrainingVolume, seed: int, index: int) -> np.ndarray:
    """(n, 3) voxels [z, y, x] of strong structure that is not a particle.

    Gold, membranes, a carbon edge or the surfaces of the ice slab are what a
    localizer mistakes for particles, and a uniformly placed crop rarely holds
    one. They stand out from ice by their band-passed energy (a difference of
    Gaussians of sigma 1 and 4 voxels, squared and smoothed at 2), far above the
    median, which the noise sets. Voxels within STRUCTURE_MARGIN of a particle
    are left out; a deterministic subsample of at most MAX_STRUCTURE_CENTRES is kept.
    """
    from scipy import ndimage

    image = normalise(np.asarray(tv.volume, dtype=np.float32), tv.mean, tv.std, tv.clip)
    band = ndimage.gaussian_filter(image, 1.0)
    band -= ndimage.gaussian_filter(image, 4.0)
    del image
    np.square(band, out=band)
    energy = ndimage.gaussian_filter(band, 2.0)
    del band
    grid = (slice(None, None, STRUCTURE_STRIDE),) * 3
    particle = ndimage.maximum_filter((tv.targets > 0).astype(np.uint8), size=2 * STRUCTURE_MARGIN + 1)
    strong = (energy[grid] > STRUCTURE_FLOOR * float(np.median(energy))) & (particle[grid] == 0)
    centres = np.argwhere(strong) * STRUCTURE_STRIDE
    if len(centres) > MAX_STRUCTURE_CENTRES:
        rng = np.random.default_rng([seed, index])
        centres = centres[np.sort(rng.choice(len(centres), MAX_STRUCTURE_CENTRES, replace=False))]
    return centres.astype(np.int64)


class CropDataset:
    """Crops (1, s, s, s) float32 and targets (s, s, s) int64, a pure function of (seed, index).

    A share `particle_share` of crops is centred near a particle (class chosen
    uniformly, then a particle of it, then a shift of up to a quarter crop);
    a share `structure_share` is centred near strong non-particle structure
    (`structure_centres`: gold, membranes, carbon, slab surfaces), so that the
    model sees enough of what it must not pick; the rest are placed uniformly
    at random, tomograms weighted by size.
    `size_balance` P picks a class's particles with weight radius^-P instead of
    uniformly: a small particle holds few voxels, so in a localizer (one class for
    all sizes) it weighs little in the loss unless more crops are centred on it.
    Outside a tomogram the image is 0 (its mean) and the target is ignored.
    """

    def __init__(
        self,
        volumes: Sequence[TrainingVolume],
        crop_size: int,
        seed: int,
        particle_share: float = 0.5,
        augment: bool = True,
        stream: int = 0,
        size_balance: float = 0.0,
        structure_share: float = 0.0,
    ) -> None:
        if not volumes:
            raise VPDetectError("no training volumes")
        if crop_size < 1:
            raise VPDetectError(f"crop size must be positive, got {crop_size}")
        if not 0.0 <= particle_share <= 1.0:
            raise VPDetectError(f"particle share must lie in [0, 1], got {particle_share}")
        if not 0.0 <= structure_share <= 1.0 - particle_share + 1e-9:  # 1 - 0.9 < 0.1 in floats
            raise VPDetectError(
                f"structure share must lie in [0, 1 - particle share = {1.0 - particle_share:g}], got {structure_share}"
            )
        self.volumes = list(volumes)
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.particle_share = float(particle_share)
        self.augment = augment
        self.stream = int(stream)  # separates e.g. training and validation crops drawn from one seed
        sizes = np.array([tv.targets.size for tv in self.volumes], dtype=np.float64)
        self.volume_weights = sizes / sizes.sum()
        # (volume index, particle index) grouped by target class, for class-balanced centring.
        self.by_class: dict[int, np.ndarray] = {}
        for v, tv in enumerate(self.volumes):
            for c in np.unique(tv.centre_classes):
                rows = np.flatnonzero(tv.centre_classes == c)
                pairs = np.stack([np.full(rows.size, v), rows], axis=1)
                self.by_class[int(c)] = np.concatenate([self.by_class.get(int(c), np.empty((0, 2), int)), pairs])
        self.classes_with_particles = sorted(self.by_class)
        if not np.isfinite(size_balance) or size_balance < 0:
            raise VPDetectError(f"size balance must be 0 or positive, got {size_balance}")
        self.size_balance = float(size_balance)
        # Per class, the probability of each (volume, particle) pair: radius^-P (None: uniform).
        self.pair_weights: dict[int, np.ndarray | None] = {c: None for c in self.by_class}
        if self.size_balance:
            for c, pairs in self.by_class.items():
                radii = np.array([self._radius(int(v), int(p)) for v, p in pairs])
                known = np.isfinite(radii) & (radii > 0)
                fill = float(np.median(radii[known])) if known.any() else 1.0
                weights = np.where(known, radii, fill) ** -self.size_balance
                self.pair_weights[c] = weights / weights.sum()
        self.structure_share = float(structure_share)
        # (volume index, z, y, x) of every structure centre; empty: such crops are placed at random.
        self.structure = np.empty((0, 4), np.int64)
        if self.structure_share:
            found = [np.column_stack([np.full(len(c), v), c])
                     for v, tv in enumerate(self.volumes) if len(c := structure_centres(tv, self.seed, v))]
            if found:
                self.structure = np.concatenate(found)

    def _corner(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        s = self.crop_size
        # One draw chooses the kind of crop (none without particles or structure crops, as before these).
        u = rng.random() if self.classes_with_particles or self.structure_share else 1.0
        if self.classes_with_particles and u < self.particle_share:
            cls = self.classes_with_particles[int(rng.integers(len(self.classes_with_particles)))]
            weights = self.pair_weights[cls]
            row = int(rng.integers(len(self.by_class[cls]))) if weights is None else \
                int(rng.choice(len(weights), p=weights))
            v, p = self.by_class[cls][row]
            return int(v), self._around(int(v), self.volumes[int(v)].centres_zyx[int(p)], rng)
        if len(self.structure) and u < self.particle_share + self.structure_share:
            v, *centre = self.structure[int(rng.integers(len(self.structure)))]
            return int(v), self._around(int(v), np.array(centre), rng)
        v = int(rng.choice(len(self.volumes), p=self.volume_weights))
        dims = np.array(self.volumes[v].targets.shape)
        corner = np.array(
            [int(rng.integers(0, d - s + 1)) if d >= s else (d - s) // 2 for d in dims], dtype=np.int64
        )
        return v, corner

    def _around(self, v: int, centre: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The corner of a crop holding `centre`, shifted by up to a quarter crop."""
        s = self.crop_size
        shift = rng.integers(-(s // 4), s // 4 + 1, size=3)
        corner = centre + shift - s // 2
        dims = np.array(self.volumes[v].targets.shape)
        # Stay inside the tomogram where it is big enough, so crops are not padded needlessly.
        return np.where(dims >= s, np.clip(corner, 0, dims - s), (dims - s) // 2)

    def _radius(self, v: int, p: int) -> float:
        radii = self.volumes[v].centre_radii
        return float(radii[p]) if radii is not None else np.nan

    def __getitem__(self, index: int):
        import torch

        rng = np.random.default_rng([self.seed, self.stream, int(index)])
        v, corner = self._corner(rng)
        tv = self.volumes[v]
        # Slicing reads only the crop from a memory-mapped tomogram.
        raw = cut_crop(tv.volume, corner, self.crop_size, fill=tv.mean)
        image = normalise(raw, tv.mean, tv.std, tv.clip)
        labels = cut_crop(tv.targets, corner, self.crop_size, fill=IGNORE_INDEX).astype(np.int64)
        if self.augment:
            image, labels = augment(image, labels, rng)
        return torch.from_numpy(image[None]), torch.from_numpy(labels)


def shard_indices(first: int, count: int, rank: int, world: int) -> list[int]:
    """Indices first..first+count-1 that process `rank` of `world` takes (every world-th)."""
    return list(range(first + rank, first + count, world))


# --------------------------------------------------------------------------- loading


def load_shrec_folder(folder, voxel_size: float | None = None) -> AnnotatedVolume:
    """A SHREC-layout folder: reconstruction.mrc plus occupancy_mask.mrc + particle_locations.txt
    (preferred: works for real SHREC data and vpdetect's simulations) or class_mask.mrc with the
    class table of simulation.json."""
    from vpdetect.io.mrc import read_tomogram
    from vpdetect.io.particles import read_particles
    from vpdetect.io.shrec import SIMULATION_FILE, read_label_mask, read_simulation_record

    folder = Path(folder)
    if not folder.is_dir():
        raise VPDetectError(f"training folder not found: {folder}")
    recon = folder / "reconstruction.mrc"
    if not recon.is_file():
        raise VPDetectError(f"training folder {folder} has no reconstruction.mrc")
    tomo = read_tomogram(recon, voxel_size=voxel_size)
    occupancy_path = folder / "occupancy_mask.mrc"
    locations_path = folder / "particle_locations.txt"
    simulation = read_simulation_record(folder)
    sim_classes = simulation["classes"] if simulation and "classes" in simulation else None
    radii: dict[str, float] = {}
    if occupancy_path.is_file() and locations_path.is_file():
        occupancy = read_label_mask(occupancy_path)
        table = read_particles(locations_path, fmt="shrec")
        names = [str(n) for n in table.data["class_name"]]
        id_names = {k: name for k, name in enumerate(names, start=1)}
        if int(occupancy.max(initial=0)) > len(names):
            raise VPDetectError(
                f"{occupancy_path}: particle id {int(occupancy.max())} but particle_locations.txt has "
                f"{len(names)} lines"
            )
        label_map = occupancy
        centres = table.data[["z", "y", "x"]].to_numpy(dtype=np.float64)
        radii = radii_from_occupancy(occupancy, id_names)
    else:
        class_path = folder / "class_mask.mrc"
        if not class_path.is_file():
            raise VPDetectError(
                f"training folder {folder} has neither occupancy_mask.mrc + particle_locations.txt "
                "nor class_mask.mrc"
            )
        if sim_classes is None:
            raise VPDetectError(
                f"{class_path}: class labels need names; add particle_locations.txt + occupancy_mask.mrc "
                f"or {SIMULATION_FILE}"
            )
        label_map = read_label_mask(class_path)
        id_names = {int(c["label"]): str(c["name"]) for c in sim_classes if "label" in c}
        names, centres = [], np.empty((0, 3))
        if locations_path.is_file():
            table = read_particles(locations_path, fmt="shrec")
            names = [str(n) for n in table.data["class_name"]]
            centres = table.data[["z", "y", "x"]].to_numpy(dtype=np.float64)
    if sim_classes:
        # The simulator's effective radii (3V/A of the true shape) beat voxel-count estimates.
        for c in sim_classes:
            if c.get("effective_radius_voxels"):
                radii[str(c["name"])] = float(c["effective_radius_voxels"])
    return AnnotatedVolume(
        name=folder.name,
        volume=tomo.data,
        label_map=label_map,
        id_names=id_names,
        centres_zyx=centres,
        centre_names=names,
        voxel_size=tomo.voxel_size,
        radii_vox=radii,
        source=str(folder),
        # vpdetect's simulations before the contrast record were all dark
        contrast=simulation.get("contrast", "dark") if simulation else None,
    )


def annotate_from_table(
    name: str,
    volume: np.ndarray,
    voxel_size: float | None,
    table_data,
    radius_default: float | None,
    radius_per_class: Mapping[str, float],
    radius_unit: str,
    source: str = "",
) -> AnnotatedVolume:
    """Targets from coordinates only: a ball of the class's radius around each particle.

    `table_data` is a ParticleTable's DataFrame (x, y, z in voxels; class_name
    or class_number optional, otherwise every particle is class "particle").
    """
    if radius_unit not in ("angstrom", "voxel"):
        raise VPDetectError(f"radius unit must be angstrom or voxel, got {radius_unit!r}")
    if radius_unit == "angstrom" and voxel_size is None:
        raise VPDetectError(
            f"{source or name}: radii in Angstrom need the voxel size; give --pixel-size or --radius-unit voxel"
        )
    frame = table_data
    if "class_name" in frame.columns:
        names = [str(n) for n in frame["class_name"]]
    elif "class_number" in frame.columns:
        names = [f"class_{int(n)}" for n in frame["class_number"]]
    else:
        names = ["particle"] * len(frame)
    scale = 1.0 / voxel_size if radius_unit == "angstrom" else 1.0
    classes = sorted(set(names))
    radii_vox: dict[str, float] = {}
    for cls in classes:
        r = radius_per_class.get(cls, radius_default)
        if r is None:
            raise VPDetectError(f"no radius for class {cls!r}: give --radius {cls}=R or a default --radius R")
        radii_vox[cls] = r * scale
    ids = {cls: i for i, cls in enumerate(classes, start=1)}
    centres = frame[["z", "y", "x"]].to_numpy(dtype=np.float64)
    label_map = paint_spheres(volume.shape, centres, [ids[n] for n in names], [radii_vox[n] for n in names])
    return AnnotatedVolume(
        name=name,
        volume=volume,
        label_map=label_map,
        id_names={i: cls for cls, i in ids.items()},
        centres_zyx=centres,
        centre_names=names,
        voxel_size=voxel_size,
        radii_vox=radii_vox,
        source=source,
    )


def load_coordinate_volume(
    tomogram_path,
    table_path,
    radius_default: float | None,
    radius_per_class: Mapping[str, float],
    radius_unit: str = "angstrom",
    voxel_size: float | None = None,
    tomograms=None,
) -> AnnotatedVolume:
    """A tomogram plus a STAR/CSV/SHREC particle table (rows of other tomograms are dropped);
    `tomograms` (RELION 5 tomograms.star) places the table's binned coordinates."""
    from vpdetect.io.mrc import read_tomogram, tomogram_name
    from vpdetect.io.particles import check_table_against_tomogram, read_particles

    tomo = read_tomogram(tomogram_path, voxel_size=voxel_size)
    name = tomogram_name(tomogram_path)
    if tomograms is not None:
        name = tomograms.match(name, tomogram_path)
    # The tomogram's size centres RELION 5 coordinates when the table has no tomogram block.
    size = None if tomograms is not None else tomo.shape_xyz
    table = read_particles(table_path, voxel_size=voxel_size, tomo_size=size, tomograms=tomograms)
    check_table_against_tomogram(table, name, tomo.shape_xyz, tomo.voxel_size, str(table_path))
    frame = table.data
    if "tomo_name" in frame.columns and (frame["tomo_name"].nunique() > 1 or tomograms is not None):
        frame = frame[frame["tomo_name"].astype(str) == name]
        if frame.empty:
            raise VPDetectError(f"{table_path} has no particles of tomogram {name!r}")
    if frame.empty:
        raise VPDetectError(f"{table_path} holds no particles")
    vs = tomo.voxel_size if tomo.voxel_size is not None else table.voxel_size
    return annotate_from_table(
        name, tomo.data, vs, frame, radius_default, radius_per_class, radius_unit, source=str(table_path)
    )


def load_copick_volumes(
    config,
    runs: Sequence[str] | None,
    voxel_spacing: float,
    tomo_type: str,
    user_id: str | None,
    radius_default: float | None,
    radius_per_class: Mapping[str, float],
    radius_unit: str = "angstrom",
) -> list[AnnotatedVolume]:
    """The runs of a copick project: each run's tomogram with its picks as targets. Classes
    without a --radius take their pickable object's radius (Angstrom) from the project."""
    from vpdetect.io.mrc import read_tomogram
    from vpdetect.io.particles.copick_picks import copick_tomograms, open_copick, read_copick_picks

    root = open_copick(config)
    per_class = dict(radius_per_class)
    if radius_unit == "angstrom" and radius_default is None:
        for obj in root.config.pickable_objects:
            if obj.radius:
                per_class.setdefault(obj.name, float(obj.radius))
    picks = read_copick_picks(root, voxel_spacing, list(runs) if runs else None, user_id=user_id).data
    volumes = []
    for path in copick_tomograms(root, list(runs) if runs else None, voxel_spacing, tomo_type):
        tomo = read_tomogram(path)
        frame = picks[picks["tomo_name"] == tomo.name]
        if frame.empty:
            raise VPDetectError(f"copick run {tomo.name!r} has no picks{f' of user {user_id!r}' if user_id else ''}")
        volumes.append(annotate_from_table(
            tomo.name, tomo.data, tomo.voxel_size or voxel_spacing, frame, radius_default, per_class,
            radius_unit, source=f"{config}:{tomo.name}",
        ))
    return volumes
