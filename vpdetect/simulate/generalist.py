"""Randomised tomograms for training pickers that must work on data they never saw.

A tomogram of the `generalist` preset draws, from its own random stream,
everything a real tomogram may differ in: SNR, defocus, tilt range and step,
reconstruction filter, contrast sign, crowding, slab thickness, context
(vesicles, gold of 6-40 times a protein's contrast, a granular carbon edge,
large membranes crossing the volume, an ice-thickness gradient, proteins sitting
on the vesicles' membranes) and a handful of
procedurally generated particle shapes of 2.5-15 nm beside some of the 12
`syn-*` classes. Every drawn value goes into `simulation.json` under
`randomized`, so a tomogram can be re-made or filtered by what it contains.

Shapes are unions of the same solids as the `syn-*` classes (spheres,
ellipsoids, capsules) in four families: compact knobbly globules, elongated
bent rods, rings and barrels, and multi-lobe clusters. A benchmark that wants
shapes a model has never seen must use another generator.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vpdetect.simulate.microscope import RECONSTRUCTION_FILTERS
from vpdetect.simulate.phantoms import (
    ParticleClass,
    _arc_capsules,
    _knobs,
    _shape,
    box_half_size,
    protein_classes,
)
from vpdetect.simulate.scene import slab_range

SHAPE_FAMILIES = ("compact", "elongated", "ring", "multilobe")
# Every parameter the preset draws; naming one on the command line fixes it.
RANDOMIZABLE = (
    "snr", "defocus", "tilt_range", "tilt_step", "recon_filter", "contrast", "crowding", "slab_thickness",
    "shapes", "vesicles", "fiducials", "carbon_edge", "ice_gradient", "b_factor", "shifts", "membranes",
    "membrane_proteins",
)
# Ranges of the draws (diameters in nm; SNR log-uniform).
DIAMETER_NM = (2.5, 15.0)
SNR_RANGE = (0.02, 6.0)
DEFOCUS_UM = (1.0, 6.0)
MAX_TILT_DEG = (40.0, 70.0)
PROTEINS_PER_MVOX = (6.0, 60.0)
RANDOM_SHAPES_PER_TOMOGRAM = (3, 8)
# Thinnest solid part (radius or semi-axis, nm): thinner parts vanish at 1 nm voxels.
MIN_THICKNESS_NM = 1.0
# Gold against protein contrast: real gold (19.3 g/cm^3) is ~50 times a protein's excess over ice;
# its streaks hide particles, which a picker must learn to see through.
FIDUCIAL_CONTRAST = (6.0, 40.0)
# Large membranes (plasma membrane, ER sheets, big organelles): spherical caps of these radii
# (nm) through the slab, nearly flat at the scale of a tomogram; a bilayer of two leaflets.
MEMBRANE_RADIUS_NM = (60.0, 600.0)
MEMBRANE_LEAFLET_NM = 1.6  # leaflet peaks at +-this from the mid-plane (a ~4 nm bilayer)
MEMBRANE_DENSITY = 0.8  # peak density of a leaflet (protein = 1), as the vesicles'
# Share of the proteins sitting on the vesicles (membrane proteins), one of these per tomogram.
MEMBRANE_PROTEIN_SHARES = (0.0, 0.0, 0.15, 0.3, 0.5)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def random_protein_class(rng: np.random.Generator, family: str, name: str) -> ParticleClass:
    """A particle shape of one family, its largest extent drawn log-uniformly in DIAMETER_NM."""
    diameter = _log_uniform(rng, *DIAMETER_NM)
    half = diameter / 2.0
    if family == "compact":
        axes = np.maximum(half * np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.55, 1.0)]), MIN_THICKNESS_NM)
        knob = diameter * rng.uniform(0.1, 0.2)
        shape = _shape(
            ellipsoids=[([0.0, 0.0, 0.0], np.maximum(axes - knob * 0.5, MIN_THICKNESS_NM), rng.normal(size=3))],
            spheres=_knobs([0.0, 0.0, 0.0], axes - knob, int(rng.integers(4, 13)), knob),
        )
    elif family == "elongated":
        aspect = rng.uniform(2.0, 4.0)
        radius = max(half / aspect, MIN_THICKNESS_NM)
        n = int(rng.integers(1, 4))
        bend = rng.uniform(-0.5, 0.5, size=(n + 1, 3)) * radius
        points = np.column_stack([np.linspace(-half + radius, half - radius, n + 1), np.zeros(n + 1), np.zeros(n + 1)]) + bend
        shape = _shape(capsules=[[*points[i], *points[i + 1], radius] for i in range(n)])
    elif family == "ring":
        tube = max(diameter * rng.uniform(0.17, 0.25), MIN_THICKNESS_NM)  # a small hole: the centre stays near the solid
        ring_radius = max(half - tube, tube * 1.5)
        layers = int(rng.integers(1, 3))
        capsules = []
        for layer in range(layers):
            z = (layer - (layers - 1) / 2.0) * 2.0 * tube
            arcs = _arc_capsules(ring_radius, 0.0, 360.0, int(rng.integers(6, 11)), tube)
            capsules += [[c[0], c[1], z, c[3], c[4], z, c[6]] for c in arcs]
        shape = _shape(capsules=capsules)
    elif family == "multilobe":
        n = int(rng.integers(2, 6))
        radii = diameter * rng.uniform(0.17, 0.3, size=n)
        centres = [np.zeros(3)]
        for i in range(1, n):
            anchor = centres[int(rng.integers(len(centres)))]
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            centres.append(anchor + direction * (radii[i] + radii[i - 1]) * 0.7)
        centres = np.array(centres)
        centres -= centres.mean(axis=0)
        reach = np.max(np.linalg.norm(centres, axis=1) + radii)
        scale = min(1.0, half / reach)  # keep the cluster within the drawn extent
        shape = _shape(spheres=np.column_stack([centres * scale, np.maximum(radii * scale, MIN_THICKNESS_NM)]))
    else:
        raise ValueError(f"unknown shape family {family!r}")
    extent = 2.0 * shape.bounding_radius
    group = "small" if extent < 7.0 else "medium" if extent < 11.0 else "large"
    return ParticleClass(name, f"procedural {family}", "protein", group, float(rng.uniform(0.8, 1.2)), shape)


@dataclasses.dataclass(frozen=True)
class Context:
    """Large-scale structure added to the scene density after placement (densities: protein = 1)."""

    # {"normal_deg", "offset_vox", "density", "width_vox"} and, for a granular carbon,
    # {"texture", "texture_sigma_vox", "texture_seed"} (relative amplitude, grain size, noise seed)
    carbon_edge: dict | None = None
    ice_gradient: dict | None = None  # {"direction_deg", "amplitude"}
    # Each {"point_vox": [x, y, z], "normal": [x, y, z] unit, "radius_nm"}: a bilayer on the sphere
    # of that radius through the point, its centre along the normal.
    membranes: tuple = ()


def add_context(density: np.ndarray, slab: tuple[int, int], context: Context, voxel_nm: float = 1.0) -> None:
    """Add a carbon edge (a dense half-plane region across the slab, soft edge, optionally
    granular), a linear ice-thickness gradient inside the slab and large membranes, in place."""
    for membrane in context.membranes:
        add_membrane(density, slab, membrane, voxel_nm)
    if context.carbon_edge is None and context.ice_gradient is None:
        return
    nz, ny, nx = density.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    x -= (nx - 1) / 2.0
    y -= (ny - 1) / 2.0
    plane = np.zeros((ny, nx), np.float32)
    edge, carbon = context.carbon_edge, None
    if edge is not None:
        angle = np.deg2rad(edge["normal_deg"])
        distance = x * np.cos(angle) + y * np.sin(angle) - edge["offset_vox"]
        carbon = edge["density"] / (1.0 + np.exp(-distance / edge["width_vox"]))
        plane += carbon
    if context.ice_gradient is not None:
        gradient = context.ice_gradient
        angle = np.deg2rad(gradient["direction_deg"])
        along = (x * np.cos(angle) + y * np.sin(angle)) / max(nx, ny)
        plane += gradient["amplitude"] * along
    z0, z1 = slab
    density[z0:z1] += plane[None]
    if carbon is not None and edge.get("texture"):
        # Amorphous carbon is granular: its density varies by grains of a nm or two.
        from scipy import ndimage

        grains = np.random.default_rng(int(edge["texture_seed"])).standard_normal((z1 - z0, ny, nx))
        grains = ndimage.gaussian_filter(grains, float(edge["texture_sigma_vox"]))
        grains *= float(edge["texture"]) / (grains.std() + 1e-12)
        density[z0:z1] += (grains * carbon[None]).astype(density.dtype)


def add_membrane(density: np.ndarray, slab: tuple[int, int], membrane: dict, voxel_nm: float = 1.0) -> None:
    """Add one large membrane (`Context.membranes`) inside the slab, in place: two leaflets of
    Gaussian profile at +-MEMBRANE_LEAFLET_NM from a sphere of `radius_nm` through `point_vox`."""
    z0, z1 = slab
    _, ny, nx = density.shape
    normal = np.asarray(membrane["normal"], dtype=np.float64)
    radius = float(membrane["radius_nm"]) / voxel_nm
    centre = np.asarray(membrane["point_vox"], dtype=np.float64) + radius * normal  # [x, y, z]
    leaflet = MEMBRANE_LEAFLET_NM / voxel_nm
    sigma = max(0.5 * leaflet, 0.5)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    for z in range(z0, z1):
        signed = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) - radius
        near = np.abs(signed) < leaflet + 4.0 * sigma
        if near.any():
            d = signed[near]
            profile = np.exp(-0.5 * ((d - leaflet) / sigma) ** 2) + np.exp(-0.5 * ((d + leaflet) / sigma) ** 2)
            density[z][near] += (MEMBRANE_DENSITY * profile).astype(density.dtype)


def draw_tomogram(params, rng: np.random.Generator):
    """Concrete parameters for one randomised tomogram.

    Returns (params with every drawn field set and `randomize` emptied,
    extra protein classes, Context, record of the draws). Fields not listed
    in `params.randomize` keep their values.
    """
    todo = set(params.randomize)
    micro: dict = {}
    changes: dict = {}
    record: dict = {}
    nx, ny, nz = params.shape_xyz

    def draw(name, value):
        record[name] = value
        return value

    if "snr" in todo:
        micro["snr"] = draw("snr", round(_log_uniform(rng, *SNR_RANGE), 4))
    if "defocus" in todo:
        defocus = draw("defocus_um", round(float(rng.uniform(*DEFOCUS_UM)), 3))
        changes["defocus_range_um"] = (defocus, defocus)
    if "tilt_range" in todo:
        top = float(rng.uniform(*MAX_TILT_DEG))
        bottom = -top + float(rng.uniform(-6.0, 6.0))
        micro["tilt_min"], micro["tilt_max"] = draw("tilt_range_deg", [round(bottom, 1), round(top, 1)])
    if "tilt_step" in todo:
        micro["tilt_step"] = draw("tilt_step_deg", float(rng.choice([2.0, 3.0])))
    if "recon_filter" in todo:
        micro["recon_filter"] = draw("recon_filter", str(rng.choice(RECONSTRUCTION_FILTERS)))
    if "b_factor" in todo:
        micro["b_factor_nm2"] = draw("b_factor_nm2", round(float(rng.uniform(2.0, 12.0)), 2))
    if "shifts" in todo:
        micro["max_shift_nm"] = draw("max_shift_nm", round(float(rng.uniform(0.0, 1.5)), 2))
    if "contrast" in todo:
        changes["contrast"] = draw("contrast", str(rng.choice(["dark", "bright"])))
    if "slab_thickness" in todo:
        changes["slab_thickness"] = draw("slab_thickness", int(round(nz * rng.uniform(0.45, 0.95))))
    if "crowding" in todo:
        rate = round(_log_uniform(rng, *PROTEINS_PER_MVOX), 2)
        changes["proteins_per_mvox"] = draw("proteins_per_mvox", (rate, rate))
    extra: list[ParticleClass] = []
    if "shapes" in todo:
        n_random = int(rng.integers(RANDOM_SHAPES_PER_TOMOGRAM[0], RANDOM_SHAPES_PER_TOMOGRAM[1] + 1))
        families = rng.choice(SHAPE_FAMILIES, size=n_random)
        extra = [random_protein_class(rng, str(f), f"gen-{f}-{i:02d}") for i, f in enumerate(families)]
        known = [c.name for c in protein_classes() if c.name in params.classes]
        keep = rng.random(len(known)) < rng.uniform(0.0, 0.6)
        changes["classes"] = tuple(name for name, k in zip(known, keep, strict=True) if k)
        record["shapes"] = [{"name": c.name, "family": c.imitates.split()[-1],
                             "extent_nm": round(2.0 * c.shape.bounding_radius, 2)} for c in extra]
        record["syn_classes"] = list(changes["classes"])
    if "vesicles" in todo and params.vesicles:
        changes["n_vesicles"] = draw("n_vesicles", int(rng.choice([0, 0, 1, 2, 3])))
        changes["vesicle_radius_nm"] = (10.0, 40.0)
    if "fiducials" in todo and params.fiducials:
        changes["n_fiducials"] = draw("n_fiducials", int(rng.choice([0, 0, 1, 3, 6, 10])))
        changes["fiducial_radius_nm"] = draw("fiducial_radius_nm", round(float(rng.uniform(2.5, 6.0)), 2))
    carbon = gradient = None
    if "carbon_edge" in todo and rng.random() < 0.25:
        carbon = draw("carbon_edge", {
            "normal_deg": round(float(rng.uniform(0, 360)), 1),
            "offset_vox": round(float(rng.uniform(0.1, 0.4) * min(nx, ny)), 1),
            "density": round(float(rng.uniform(0.3, 1.2)), 3),
            "width_vox": round(float(rng.uniform(1.0, 4.0)), 2),
        })
    if "ice_gradient" in todo and rng.random() < 0.3:
        gradient = draw("ice_gradient", {
            "direction_deg": round(float(rng.uniform(0, 360)), 1),
            "amplitude": round(float(rng.uniform(0.2, 1.5)), 3),
        })
    # Drawn after everything above, so that the draws of tomograms made before these existed
    # are unchanged (their volumes gain the new context).
    if "fiducials" in todo and params.fiducials:
        changes["fiducial_contrast"] = draw("fiducial_contrast", round(_log_uniform(rng, *FIDUCIAL_CONTRAST), 2))
    if carbon is not None and rng.random() < 0.7:
        carbon = draw("carbon_edge", {**carbon, "texture": round(float(rng.uniform(0.1, 0.6)), 3),
                                      "texture_sigma_vox": round(float(rng.uniform(0.7, 2.0)), 2),
                                      "texture_seed": int(rng.integers(2**31))})
    membranes = []
    if "membranes" in todo:
        z_lo, z_hi = slab_range(nz, changes.get("slab_thickness", params.slab_thickness))
        for _ in range(int(rng.choice([0, 0, 0, 1, 1, 2]))):
            normal = rng.normal(size=3)
            membranes.append({
                "point_vox": [round(float(rng.uniform(0, nx)), 1), round(float(rng.uniform(0, ny)), 1),
                              round(float(rng.uniform(z_lo, z_hi)), 1)],
                "normal": [round(float(v), 4) for v in normal / np.linalg.norm(normal)],
                "radius_nm": round(_log_uniform(rng, *MEMBRANE_RADIUS_NM), 1),
            })
        draw("membranes", membranes)
    if "membrane_proteins" in todo and params.vesicles:
        share = float(rng.choice(MEMBRANE_PROTEIN_SHARES))
        changes["membrane_protein_share"] = draw("membrane_protein_share", share)
    # classes too large for this volume's slab are left out rather than refused
    room = min(nx, ny, changes.get("slab_thickness", params.slab_thickness))
    fits = lambda c: 2 * box_half_size(c.shape, params.voxel_size_nm) + 1 <= room  # noqa: E731
    extra = [c for c in extra if fits(c)]
    if "classes" in changes or extra:
        chosen = changes.get("classes", params.classes)
        changes["classes"] = tuple(c.name for c in protein_classes() if c.name in chosen and fits(c))
    microscope = dataclasses.replace(params.microscope, **micro)
    params = dataclasses.replace(params, microscope=microscope, randomize=(), **changes)
    return params, extra, Context(carbon, gradient, tuple(membranes)), record


# The `generalist-context` preset: every tomogram with this many gold beads and every second one
# (of those the draw left without) with a textured carbon edge - the context a localizer's
# false picks come from, for training its pick verifier (`vpdetect train-verifier`).
CONTEXT_BEADS = (12, 25)
CONTEXT_CARBON_SHARE = 0.5


def enrich_context(params, context: Context, record: dict, rng: np.random.Generator):
    """A `draw_tomogram` result with many beads and often a carbon edge, drawn from `rng`, which
    continues the stream `draw_tomogram` used (so the rest of the tomogram is the generalist one)."""
    extra = np.random.default_rng(int(rng.integers(2**31)))
    n = int(extra.integers(CONTEXT_BEADS[0], CONTEXT_BEADS[1] + 1))
    params = dataclasses.replace(params, fiducials=True, n_fiducials=n)
    record["n_fiducials"] = n
    if context.carbon_edge is None and extra.random() < CONTEXT_CARBON_SHARE:
        nx, ny, _ = params.shape_xyz
        carbon = {"normal_deg": round(float(extra.uniform(0, 360)), 1),
                  "offset_vox": round(float(extra.uniform(0.1, 0.4) * min(nx, ny)), 1),
                  "density": round(float(extra.uniform(0.3, 1.2)), 3),
                  "width_vox": round(float(extra.uniform(1.0, 4.0)), 2),
                  "texture": round(float(extra.uniform(0.1, 0.6)), 3),
                  "texture_sigma_vox": round(float(extra.uniform(0.7, 2.0)), 2),
                  "texture_seed": int(extra.integers(2**31))}
        context = dataclasses.replace(context, carbon_edge=carbon)
        record["carbon_edge"] = carbon
    return params, context

