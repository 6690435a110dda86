"""One simulated tomogram from parameters and a seed: scene, imaging, ground truth.

`simulate_tomogram(params, seed)` is pure compute (arrays and tables in,
arrays and tables out); `vpdetect simulate` writes the result in the SHREC
layout. Randomness comes from `numpy.random.SeedSequence(seed)` split into
independent streams for the per-tomogram draws, the scene and the
microscope, so the same seed gives the same tomogram and changing, say, the
SNR leaves the particle positions unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.io.particles import ParticleTable
from vpdetect.simulate.generalist import (
    RANDOMIZABLE,
    Context,
    add_context,
    draw_tomogram,
    enrich_context,
)
from vpdetect.simulate.microscope import MicroscopeParams, image_and_reconstruct
from vpdetect.simulate.phantoms import (
    ParticleClass,
    fiducial_class,
    protein_classes,
    shape_geometry,
    vesicle_class,
)
from vpdetect.simulate.scene import Scene, build_scene

# Numbers per million voxels of slab (SHREC'21: 1,000-3,000 proteins, 2-7
# vesicles and 7-14 fiducials in a 512 x 512 x 200 slab = 52.4 M voxels).
SHREC_SLAB_MVOX = 512 * 512 * 200 / 1e6
VESICLE_LABEL_NAME = "vesicle"
FIDUCIAL_LABEL_NAME = "fiducial"
# Smallest vesicle worth drawing (outer radius, nm): below it a shell is a blob.
MIN_VESICLE_RADIUS_NM = 8.0


@dataclass(frozen=True)
class SimulationParams:
    """Everything that defines a simulated tomogram except the seed.

    shape_xyz: volume size in voxels (x, y, z); slab_thickness: ice slab (z) in voxels.
    proteins_per_mvox: (low, high) range for the number of proteins per million
    slab voxels, drawn per tomogram; n_proteins overrides it. Vesicle and
    fiducial counts likewise (None = drawn from the SHREC'21 rates, at least
    one each when enabled).
    """

    preset: str = "custom"
    shape_xyz: tuple[int, int, int] = (512, 512, 512)
    slab_thickness: int = 200
    voxel_size_nm: float = 1.0
    classes: tuple[str, ...] = tuple(c.name for c in protein_classes())
    proteins_per_mvox: tuple[float, float] = (30.0, 45.0)
    n_proteins: int | None = None
    vesicles: bool = True
    n_vesicles: int | None = None
    vesicle_radius_nm: tuple[float, float] = (15.0, 35.0)
    membrane_thickness_nm: float = 4.0
    # Share of the proteins placed on the vesicles' outer surface, touching the membrane.
    membrane_protein_share: float = 0.0
    fiducials: bool = True
    n_fiducials: int | None = None
    fiducial_radius_nm: float = 5.0
    fiducial_contrast: float = 6.0
    ice_density: float = 0.93 / 0.42  # ice in units of protein contrast (0.93 vs 1.35 g/cm^3)
    defocus_range_um: tuple[float, float] = (2.0, 5.0)
    microscope: MicroscopeParams = field(default_factory=MicroscopeParams)
    contrast: str = "dark"  # "bright" negates the reconstruction (a contrast-inverted tomogram)
    # Parameters drawn per tomogram (see `vpdetect.simulate.generalist.RANDOMIZABLE`).
    randomize: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise VPDetectError with one line naming the first impossible parameter."""
        if len(self.shape_xyz) != 3 or any(int(v) <= 0 for v in self.shape_xyz):
            raise VPDetectError(f"shape must be three positive sizes (x y z), got {tuple(self.shape_xyz)}")
        if self.slab_thickness <= 0:
            raise VPDetectError(f"slab thickness must be positive, got {self.slab_thickness}")
        if self.slab_thickness > self.shape_xyz[2] and "slab_thickness" not in self.randomize:
            raise VPDetectError(
                f"slab thickness {self.slab_thickness} exceeds the volume depth z = {self.shape_xyz[2]}"
            )
        if self.voxel_size_nm <= 0:
            raise VPDetectError(f"voxel size must be positive, got {self.voxel_size_nm} nm")
        known = {c.name for c in protein_classes()}
        unknown = [name for name in self.classes if name not in known]
        if unknown:
            raise VPDetectError(f"unknown particle class {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if len(set(self.classes)) != len(self.classes):
            raise VPDetectError("particle classes are listed twice")
        low, high = self.proteins_per_mvox
        if low < 0 or high < low:
            raise VPDetectError(f"protein density range must be 0 <= low <= high, got {low}..{high}")
        for name, value in (("proteins", self.n_proteins), ("vesicles", self.n_vesicles),
                            ("fiducials", self.n_fiducials)):
            if value is not None and value < 0:
                raise VPDetectError(f"number of {name} must be non-negative, got {value}")
        if not self.classes and (self.n_proteins or 0) > 0:
            raise VPDetectError("proteins requested but no protein classes selected")
        rmin, rmax = self.vesicle_radius_nm
        if self.membrane_thickness_nm <= 0 or rmin <= self.membrane_thickness_nm or rmax < rmin:
            raise VPDetectError(
                f"vesicle radius range {rmin}..{rmax} nm must exceed the membrane thickness "
                f"{self.membrane_thickness_nm} nm and be ordered"
            )
        if not 0.0 <= self.membrane_protein_share <= 1.0:
            raise VPDetectError(
                f"membrane protein share must be between 0 and 1, got {self.membrane_protein_share}"
            )
        if self.fiducial_radius_nm <= 0 or self.fiducial_contrast <= 0:
            raise VPDetectError("fiducial radius and contrast must be positive")
        if self.ice_density < 0:
            raise VPDetectError(f"ice density must be non-negative, got {self.ice_density}")
        dmin, dmax = self.defocus_range_um
        if dmin <= 0 or dmax < dmin:
            raise VPDetectError(f"defocus range must be positive and ordered, got {dmin}..{dmax} um")
        dataclasses.replace(self.microscope, defocus_um=dmin).validate()
        if self.contrast not in ("dark", "bright"):
            raise VPDetectError(f"contrast must be dark or bright, got {self.contrast!r}")
        unknown = sorted(set(self.randomize) - set(RANDOMIZABLE))
        if unknown:
            raise VPDetectError(f"cannot randomize {unknown[0]!r} (known: {', '.join(RANDOMIZABLE)})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # SHREC'21-like: 512^3 with a 200-voxel slab, crowded, all 12 classes,
    # vesicles and fiducials, uncorrected CTF; SNR in the upper part of the
    # SHREC'21 range (0.12-0.58) so that CPU-trained pickers can learn it.
    "shrec21": {
        "shape_xyz": (512, 512, 512),
        "slab_thickness": 200,
        "proteins_per_mvox": (30.0, 45.0),
        "microscope": MicroscopeParams(snr=0.5),
    },
    # Small, clean and quick: demos and tests.
    "easy": {
        "shape_xyz": (128, 128, 64),
        "slab_thickness": 48,
        "proteins_per_mvox": (40.0, 50.0),
        "vesicle_radius_nm": (10.0, 18.0),
        "defocus_range_um": (2.0, 3.0),
        "microscope": MicroscopeParams(snr=4.0, max_shift_nm=0.0, tilt_min=-60, tilt_max=60, tilt_step=3.0),
    },
    # Training data for a localizer that must work on anyone's data: every
    # tomogram draws SNR, defocus, tilts, filter, contrast, crowding, context
    # and procedural particle shapes (`vpdetect.simulate.generalist`).
    "generalist": {
        "shape_xyz": (192, 192, 96),
        "slab_thickness": 80,
        "randomize": RANDOMIZABLE,
    },
    # The same with 12-25 gold beads in every tomogram and a textured carbon edge in about every
    # second one (`generalist.enrich_context`): training data for a localizer's pick verifier.
    "generalist-context": {
        "shape_xyz": (192, 192, 96),
        "slab_thickness": 80,
        "randomize": RANDOMIZABLE,
    },
}

# Which randomized parameter an explicit setting fixes.
FIXES = {
    "snr": "snr", "tilt_min": "tilt_range", "tilt_max": "tilt_range", "tilt_step": "tilt_step",
    "defocus_range_um": "defocus", "recon_filter": "recon_filter", "contrast": "contrast",
    "n_proteins": "crowding", "proteins_per_mvox": "crowding", "slab_thickness": "slab_thickness",
    "n_vesicles": "vesicles", "n_fiducials": "fiducials", "membrane_protein_share": "membrane_proteins", "b_factor_nm2": "b_factor", "max_shift_nm": "shifts",
}


def preset_params(name: str, **overrides) -> SimulationParams:
    """Parameters of a named preset, with fields overridden (`microscope` fields too)."""
    if name not in PRESETS:
        raise VPDetectError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    values = dict(PRESETS[name])
    microscope_fields = {f.name for f in dataclasses.fields(MicroscopeParams)}
    micro = {k: overrides.pop(k) for k in list(overrides) if k in microscope_fields}
    values.update({k: v for k, v in overrides.items()})
    values["microscope"] = dataclasses.replace(values.get("microscope", MicroscopeParams()), **micro)
    fixed = {FIXES[k] for k in [*overrides, *micro] if k in FIXES}
    values["randomize"] = tuple(n for n in values.get("randomize", ()) if n not in fixed)
    return SimulationParams(preset=name, **values)


@dataclass
class SimulationResult:
    """A simulated tomogram and its full ground truth (arrays indexed [z, y, x]).

    particles: a ParticleTable (voxel size in Angstrom, tomo_size) with one
    row per occupancy id (row k-1 is id k): class_name, class_number (its
    class_mask label), x, y, z (int voxels), phi, theta, psi (ZXZ degrees), kind.
    """

    reconstruction: np.ndarray
    grandmodel: np.ndarray
    class_mask: np.ndarray
    occupancy: np.ndarray
    particles: ParticleTable
    metadata: dict


def class_table(params: SimulationParams, extra: Sequence[ParticleClass] = ()) -> list[dict]:
    """The classes a tomogram may contain, with their class_mask labels and geometry
    (`extra`: procedurally generated protein classes, after the selected `syn-*` ones)."""
    rows = []
    proteins = [c for c in protein_classes() if c.name in params.classes] + list(extra)
    for label, particle_class in enumerate(proteins, start=1):
        rows.append(_class_row(particle_class, label, params.voxel_size_nm))
    label = len(proteins)
    if params.vesicles:
        label += 1
        mean_radius = float(np.mean(params.vesicle_radius_nm))
        row = _class_row(vesicle_class(mean_radius, params.membrane_thickness_nm), label, params.voxel_size_nm)
        row["radius_range_nm"] = list(params.vesicle_radius_nm)
        row["geometry_of"] = f"a vesicle of outer radius {mean_radius:g} nm"
        rows.append(row)
    if params.fiducials:
        label += 1
        rows.append(_class_row(fiducial_class(params.fiducial_radius_nm, params.fiducial_contrast), label,
                               params.voxel_size_nm))
    return rows


def _class_row(particle_class: ParticleClass, label: int, voxel_size_nm: float) -> dict:
    geometry = shape_geometry(particle_class.shape)
    return {
        "name": particle_class.name,
        "label": label,
        "kind": particle_class.kind,
        "imitates": particle_class.imitates,
        "size_group": particle_class.size_group,
        "volume": round(geometry["volume_nm3"], 2),
        "volume_unit": "nm^3",
        "area_nm2": round(geometry["area_nm2"], 2),
        "sphericity": round(geometry["sphericity"], 4),
        "radius_nm": round(geometry["effective_radius_nm"], 3),
        "effective_radius_voxels": round(geometry["effective_radius_nm"] / voxel_size_nm, 3),
        "bounding_radius_voxels": round(particle_class.shape.bounding_radius / voxel_size_nm, 3),
        "contrast": particle_class.contrast,
    }


def _count(rng: np.random.Generator, rate_range: tuple[float, float], slab_mvox: float) -> int:
    return int(round(rng.uniform(*rate_range) * slab_mvox))


def simulate_tomogram(
    params: SimulationParams,
    seed: int | Sequence[int],
    progress: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Simulate one tomogram with ground truth; the same params and seed give identical arrays."""
    params.validate()
    say = progress or (lambda message: None)
    entropy = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    if any(s < 0 for s in entropy):
        raise VPDetectError(f"seed must be non-negative, got {seed}")
    # A fourth stream for the randomised presets: spawn(4)[:3] equals spawn(3), so
    # fixed-parameter tomograms are unchanged by its existence.
    draws_seq, scene_seq, microscope_seq, randomize_seq = np.random.SeedSequence(entropy).spawn(4)
    draws = np.random.default_rng(draws_seq)
    extra: list[ParticleClass] = []
    context, randomized = Context(), None
    if params.randomize:
        rng = np.random.default_rng(randomize_seq)
        preset = params.preset
        params, extra, context, randomized = draw_tomogram(params, rng)
        if preset == "generalist-context":
            params, context = enrich_context(params, context, randomized, rng)
        params.validate()
    nx, ny, nz = (int(v) for v in params.shape_xyz)
    slab_mvox = nx * ny * params.slab_thickness / 1e6
    table = class_table(params, extra)
    labels_by_name = {row["name"]: row["label"] for row in table}

    # per-tomogram draws (as SHREC'21 varies defocus and composition per tomogram)
    defocus = float(np.round(draws.uniform(*params.defocus_range_um), 4))
    n_proteins = params.n_proteins if params.n_proteins is not None else _count(
        draws, params.proteins_per_mvox, slab_mvox)
    classes: list[ParticleClass] = []
    labels: list[int] = []
    counts: list[int] = []
    if params.vesicles:
        n_vesicles = params.n_vesicles if params.n_vesicles is not None else max(
            1, _count(draws, (2 / SHREC_SLAB_MVOX, 7 / SHREC_SLAB_MVOX), slab_mvox))
        # a vesicle must fit in the slab and leave room beside it
        room_nm = min(params.slab_thickness / 2.0 - 2.0, min(nx, ny) / 6.0) * params.voxel_size_nm
        rmin, rmax = params.vesicle_radius_nm
        rmax = min(rmax, room_nm)
        if params.n_vesicles is not None and n_vesicles > 0 and rmax < rmin:
            raise VPDetectError(
                f"particles cannot fit: vesicles of radius >= {rmin:g} nm need a slab of at least "
                f"{int(np.ceil((2 * rmin + 4) / params.voxel_size_nm))} voxels and x, y of {int(np.ceil(4 * rmin / params.voxel_size_nm))}"
            )
        if rmax < max(MIN_VESICLE_RADIUS_NM, params.membrane_thickness_nm + 2.0):
            n_vesicles = 0  # on by default, but this volume has no room for a vesicle
        rmin = min(rmin, rmax)
        for _ in range(n_vesicles):
            radius = float(np.round(draws.uniform(rmin, rmax), 2))
            classes.append(vesicle_class(radius, params.membrane_thickness_nm))
            labels.append(labels_by_name[VESICLE_LABEL_NAME])
            counts.append(1)
    if params.fiducials:
        n_fiducials = params.n_fiducials if params.n_fiducials is not None else max(
            1, _count(draws, (7 / SHREC_SLAB_MVOX, 14 / SHREC_SLAB_MVOX), slab_mvox))
        classes.append(fiducial_class(params.fiducial_radius_nm, params.fiducial_contrast))
        labels.append(labels_by_name[FIDUCIAL_LABEL_NAME])
        counts.append(n_fiducials)
    proteins = [c for c in protein_classes() if c.name in params.classes] + extra
    if proteins:
        per_class = draws.multinomial(n_proteins, np.full(len(proteins), 1.0 / len(proteins)))
        for particle_class, count in zip(proteins, per_class, strict=True):
            classes.append(particle_class)
            labels.append(labels_by_name[particle_class.name])
            counts.append(int(count))

    say(f"placing {sum(counts)} particles")
    # counts drawn from the preset's crowding are a target (what finds no room
    # is skipped and reported); counts the user asked for must all be placed
    explicit = params.n_proteins is not None or params.n_vesicles is not None or params.n_fiducials is not None
    scene = build_scene(params.shape_xyz, params.slab_thickness, classes, labels, counts,
                        np.random.default_rng(scene_seq), params.voxel_size_nm, strict=explicit,
                        membrane_share=params.membrane_protein_share)

    add_context(scene.density, scene.slab, context, params.voxel_size_nm)
    say("imaging and reconstructing")
    microscope = dataclasses.replace(params.microscope, defocus_um=defocus)
    reconstruction, acquisition = image_and_reconstruct(
        scene.density, scene.slab, microscope, np.random.default_rng(microscope_seq), params.voxel_size_nm,
        progress=lambda stage, done, total: say(stage) if done == 0 else None,
    )
    if params.contrast == "bright":
        np.negative(reconstruction, out=reconstruction)

    grandmodel = _grandmodel(scene, params.ice_density)
    particles = ParticleTable(
        data=_particle_frame(scene), voxel_size=params.voxel_size_nm * 10.0, tomo_size=(nx, ny, nz)
    )
    placed = particles.data["class_name"].value_counts().to_dict()
    metadata = {
        "format": "vpdetect-simulation",
        "seed": entropy[0],
        "seed_entropy": entropy,
        "parameters": params.to_dict(),
        "voxel_size_angstrom": params.voxel_size_nm * 10.0,
        "shape_xyz": [nx, ny, nz],
        "slab_z_range": list(scene.slab),
        "conventions": {
            "arrays": "MRC arrays are [z, y, x]; text coordinates are x y z, 0-based voxel indices",
            "euler": "ZXZ degrees (phi, theta, psi): x_world = c + R p_body, R = Rz(phi) Rx(theta) Rz(psi), "
                     "intrinsic z-x'-z'' (= extrinsic z, x, z by psi, theta, phi)",
            "tilt_axis": "y; tilting in the x-z plane, u = (x-cx) cos(t) + (z-cz) sin(t)",
            "contrast": f"reconstruction: CTF not corrected, dense particles {params.contrast}, zero mean unit variance; "
                        "grandmodel: ice inside the slab plus particle density above ice (protein = 1)",
            "occupancy": "id k = line k (1-based) of particle_locations.txt",
        },
        "classes": table,
        "placed": {
            "total": int(len(particles.data)),
            "per_class": {row["name"]: int(placed.get(row["name"], 0)) for row in table},
            "vesicle_outer_radii_nm": [
                round(scene.classes[p.class_index].shape.bounding_radius, 3)
                for p in scene.placements if scene.classes[p.class_index].kind == "vesicle"
            ],
            "not_placed_no_room": dict(scene.unplaced),
            # particle ids (line numbers of particle_locations.txt) touching a vesicle's membrane
            "on_membranes": list(scene.on_membrane),
        },
        "microscope": {
            **dataclasses.asdict(microscope),
            "defocus_um": defocus,
            **acquisition,
        },
        "snr_measured": acquisition["snr_measured"],
        "contrast": params.contrast,
    }
    if randomized is not None:
        metadata["randomized"] = randomized
    return SimulationResult(
        reconstruction=reconstruction,
        grandmodel=grandmodel,
        class_mask=scene.class_mask,
        occupancy=scene.occupancy,
        particles=particles,
        metadata=metadata,
    )


def _grandmodel(scene: Scene, ice_density: float) -> np.ndarray:
    """Noise-free density: ice inside the slab plus each particle's density above the ice."""
    grandmodel = scene.density  # reused in place: the scene's density is not needed any more
    z0, z1 = scene.slab
    grandmodel[z0:z1] += np.float32(ice_density)
    return grandmodel


def _particle_frame(scene: Scene):
    import pandas as pd

    rows = [
        {
            "class_name": scene.classes[p.class_index].name,
            "class_number": scene.labels[p.class_index],
            "kind": scene.classes[p.class_index].kind,
            "x": p.x,
            "y": p.y,
            "z": p.z,
            "phi": p.phi,
            "theta": p.theta,
            "psi": p.psi,
        }
        for p in scene.placements
    ]
    columns = ["class_name", "class_number", "kind", "x", "y", "z", "phi", "theta", "psi"]
    return pd.DataFrame(rows, columns=columns)
