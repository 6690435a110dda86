"""A small tomogram simulator that shares no code with `vpdetect.simulate` (test data only).

The generalization benchmark scores vpdetect on tomograms made by code that did
not make its training data: other particle shapes, another projector and
another reconstruction. Nothing here imports `vpdetect.simulate`.

Scene (units nm; arrays [z, y, x], voxel centres at integer indices):
- Particles from a shape family reserved for testing: clouds of Gaussian
  pseudo-atoms along random smooth 3D curves (`curve`), lumpy clusters of
  pseudo-atoms (`cluster`) and superellipsoids (`superellipsoid`), 5-12 nm
  across, uniformly random orientation, placed without overlap in an ice slab.
  Protein density is 1.35 against ice 1.0 (particles displace the ice).
- Context (not in the truth): lipid membranes (vesicle shells and a plane,
  bilayer profile), gold beads (density 10), a carbon edge (a textured dense
  region on one side of a line), an ice-thickness gradient (the projected ice
  ramping from half to one and a half times the slab's across x, added as a
  density ramp 0.5 -> 1.5 inside the slab after the particles are placed: a
  thicker column of ice adds along the whole ray, and the particles keep their
  contrast against the ice around them), particles on the membranes
  (`membrane_proteins`, with `membranes`: a fifth as many again, each touching
  a vesicle's outer leaflet or the plane membrane).

Imaging: tilt axis y. Each x-z slice is projected with scikit-image's `radon`;
the projections of one tilt form an image that is multiplied by a contrast
transfer function (300 kV, Cs 2.7 mm, 7 % amplitude contrast, B 200 A^2; own
implementation), white Gaussian noise is added to the images, and every x-z
slice is reconstructed with `iradon` (ramp filter by default). Dense matter
comes out dark (standard reconstructions); `contrast="bright"` negates the
result. Signal and noise are reconstructed apart (reconstruction is linear) and
the noise scaled so that the particles' SNR = var(signal) / var(noise) over the
whole reconstruction is the target (the particles imaged alone give their
signal; without context that is all the signal). Context thus adds matter
without drowning the particles in more noise; `snr_measured` is the SNR of
the whole final float32 volume, context included.

Ground truth: `occupancy` [z, y, x] int32 (0 background, k = row k-1 of
`centres_xyz`, i.e. particle k in SHREC's 1-based numbering), centres in
voxels (the density centroid, moved to the nearest mask voxel when the centroid
falls outside the particle, so that every centre lies on its particle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

SHAPES = ("curve", "cluster", "superellipsoid")
CONTEXTS = ("membranes", "gold", "carbon", "ice_gradient", "membrane_proteins")
# With "membrane_proteins": this many particles per 100 free ones sit on the membranes.
MEMBRANE_PROTEINS_PER_100 = 20
CONTRASTS = ("dark", "bright")
FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")
# Particles per 1e6 nm^3 of ice slab.
CROWDING = {"sparse": 40.0, "moderate": 150.0, "dense": 400.0}

ICE = 1.0
PROTEIN_EXCESS = 0.35  # protein 1.35 g/cm^3 against ice 1.0
GOLD = 10.0
LIPID = 0.5  # head-group excess density of each leaflet's peak
CARBON = 0.6
MASK_LEVEL = 0.25  # a voxel belongs to a particle where its own density (peak 1) reaches this
MARGIN_NM = 1.0  # free space between particles' bounding spheres

# Microscope (300 kV).
WAVELENGTH_NM = 1.9687e-3
CS_NM = 2.7e6
AMPLITUDE_CONTRAST = 0.07
B_FACTOR_NM2 = 2.0  # 200 A^2


@dataclass(frozen=True)
class IndependentParams:
    """One tomogram's settings. `shape_xyz` in voxels; everything physical in nm / um / degrees."""

    shape_xyz: tuple[int, int, int] = (128, 128, 64)
    voxel_nm: float = 1.0
    slab_fraction: float = 0.75  # ice slab thickness as a fraction of the z size
    crowding: str = "moderate"
    size_nm: tuple[float, float] = (5.0, 12.0)
    snr: float = 0.5
    contrast: str = "dark"
    defocus_um: float = 3.0
    tilt_range: tuple[float, float] = (-60.0, 60.0)
    tilt_step: float = 3.0
    filter_name: str = "ramp"
    context: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {CONTRASTS}, got {self.contrast!r}")
        if self.filter_name not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {self.filter_name!r}")
        if self.crowding not in CROWDING:
            raise ValueError(f"crowding must be one of {tuple(CROWDING)}, got {self.crowding!r}")
        unknown = set(self.context) - set(CONTEXTS)
        if unknown:
            raise ValueError(f"unknown context {sorted(unknown)}; choose from {CONTEXTS}")
        if "membrane_proteins" in self.context and "membranes" not in self.context:
            raise ValueError("context membrane_proteins needs membranes to sit on")
        if not self.snr > 0:
            raise ValueError(f"snr must be positive, got {self.snr}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class IndependentTomogram:
    volume: np.ndarray  # float32 [z, y, x]
    occupancy: np.ndarray  # int32 [z, y, x]
    centres_xyz: np.ndarray  # (n, 3) float64 voxels
    shapes: list[str]
    radii_vox: np.ndarray  # (n,) equivalent-sphere radius of each particle's mask, voxels
    snr_measured: float  # over the whole reconstruction, context included
    snr_particles: float  # of the particles alone (the target; equal to snr_measured without context)
    params: IndependentParams
    seed: int

    @property
    def voxel_size_angstrom(self) -> float:
        return self.params.voxel_nm * 10.0


# --------------------------------------------------------------------------- particle shapes


def _curve_atoms(rng: np.random.Generator, extent: float) -> tuple[np.ndarray, float]:
    """Pseudo-atoms (nm) along a smooth random 3D curve (persistent random walk)."""
    sigma = rng.uniform(1.0, 1.4)
    step = 0.6
    n = max(4, int(rng.uniform(1.2, 2.2) * extent / step))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    points = [np.zeros(3)]
    for _ in range(n - 1):
        direction = direction + rng.normal(scale=0.35, size=3)
        direction /= np.linalg.norm(direction)
        points.append(points[-1] + step * direction)
    atoms = np.asarray(points)
    return atoms, sigma


def _cluster_atoms(rng: np.random.Generator, extent: float) -> tuple[np.ndarray, float]:
    """Pseudo-atoms (nm) in 2-5 lumps of different sizes: a lumpy, irregular blob."""
    sigma = rng.uniform(0.8, 1.2)
    n_lumps = int(rng.integers(2, 6))
    lumps = rng.normal(scale=extent / 5.0, size=(n_lumps, 3))
    spreads = rng.uniform(0.6, 1.6, size=n_lumps) * extent / 8.0
    counts = rng.integers(15, 60, size=n_lumps)
    atoms = np.concatenate(
        [c + rng.normal(scale=s, size=(k, 3)) for c, s, k in zip(lumps, spreads, counts, strict=True)]
    )
    return atoms, sigma


def _scale_to_extent(atoms: np.ndarray, sigma: float, extent: float) -> np.ndarray:
    """Centre the atoms and scale their spread so that the cloud (atoms +- 1.5 sigma) spans `extent`."""
    atoms = atoms - atoms.mean(axis=0)
    span = 2.0 * np.max(np.linalg.norm(atoms, axis=1)) + 3.0 * sigma
    factor = max(extent - 3.0 * sigma, 0.5) / max(span - 3.0 * sigma, 1e-6)
    return atoms * factor


def _render_atoms(atoms_nm: np.ndarray, sigma_nm: float, rotation: np.ndarray, voxel: float):
    """Local density box (peak 1) of rotated pseudo-atoms, and the box origin offset (voxels)."""
    positions = atoms_nm @ rotation.T / voxel
    sigma = sigma_nm / voxel
    reach = np.max(np.abs(positions)) + 3.5 * sigma + 2
    half = int(np.ceil(reach))
    size = 2 * half + 1
    grid = np.zeros((size, size, size), np.float64)
    # Trilinear splat of each atom onto the grid, then one Gaussian blur.
    p = positions[:, ::-1] + half  # z, y, x
    base = np.floor(p).astype(int)
    frac = p - base
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                w = (
                    (frac[:, 0] if dz else 1 - frac[:, 0])
                    * (frac[:, 1] if dy else 1 - frac[:, 1])
                    * (frac[:, 2] if dx else 1 - frac[:, 2])
                )
                np.add.at(grid, (base[:, 0] + dz, base[:, 1] + dy, base[:, 2] + dx), w)
    density = ndimage.gaussian_filter(grid, sigma, mode="constant", truncate=3.5)
    return density / density.max(), half


def _render_superellipsoid(rng: np.random.Generator, extent: float, rotation: np.ndarray, voxel: float):
    """Local box (values in [0, 1], the covered fraction of each voxel) of a random superellipsoid."""
    axes = extent / 2.0 * np.sort(rng.uniform(0.55, 1.0, size=3))[::-1]
    axes[0] = extent / 2.0
    e1, e2 = rng.uniform(0.3, 2.2, size=2)  # < 1 boxy, 1 ellipsoid, > 1 pinched
    half = int(np.ceil(extent / 2.0 / voxel)) + 2
    sub = 3  # 3^3 samples per voxel
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    line = (np.arange(-half, half + 1)[:, None] + offsets[None, :]).ravel() * voxel
    z, y, x = np.meshgrid(line, line, line, indexing="ij")
    world = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    local = np.abs(world @ rotation) / axes  # rotation.T applied to each point
    local = np.maximum(local, 1e-12)
    inside = ((local[:, 0] ** (2 / e2) + local[:, 1] ** (2 / e2)) ** (e2 / e1) + local[:, 2] ** (2 / e1)) <= 1.0
    size = 2 * half + 1
    fine = inside.reshape(size * sub, size * sub, size * sub).astype(np.float64)
    density = fine.reshape(size, sub, size, sub, size, sub).mean(axis=(1, 3, 5))
    return density, half


def render_particle(rng: np.random.Generator, shape: str, extent_nm: float, voxel_nm: float):
    """(density box with peak 1, half width in voxels) of one particle of `shape`, randomly turned."""
    rotation = Rotation.random(random_state=rng).as_matrix()
    if shape == "superellipsoid":
        return _render_superellipsoid(rng, extent_nm, rotation, voxel_nm)
    make = _curve_atoms if shape == "curve" else _cluster_atoms
    atoms, sigma = make(rng, extent_nm)
    atoms = _scale_to_extent(atoms, sigma, extent_nm)
    return _render_atoms(atoms, sigma, rotation, voxel_nm)


# --------------------------------------------------------------------------- scene


@dataclass
class _Scene:
    density: np.ndarray  # grand model [z, y, x]
    occupancy: np.ndarray
    particles: np.ndarray  # the particles' share of `density` (all of it without context)
    centres: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    radii: list = field(default_factory=list)
    placed_centres: list = field(default_factory=list)  # voxels, for the overlap test
    placed_reach: list = field(default_factory=list)


def _slab_bounds(params: IndependentParams) -> tuple[float, float]:
    nz = params.shape_xyz[2]
    thickness = params.slab_fraction * nz
    z0 = (nz - thickness) / 2.0
    return z0, z0 + thickness


def _bilayer(distance_nm: np.ndarray) -> np.ndarray:
    """Excess density across a lipid bilayer: two head-group peaks 4 nm apart."""
    return LIPID * (np.exp(-0.5 * ((distance_nm - 2.0) / 0.8) ** 2) + np.exp(-0.5 * ((distance_nm + 2.0) / 0.8) ** 2))


def _context(rng: np.random.Generator, params: IndependentParams, density: np.ndarray, coords_nm,
             surfaces: list | None = None):
    """Add the context to `density` in place; return obstacle tests for particle placement.

    Each obstacle is a function (centre_nm, radius_nm) -> True when a particle there would touch it.
    `surfaces` receives one (obstacle, touching_centre) per membrane: touching_centre(rng, radius_nm)
    is the centre (nm) of a particle of that bounding radius touching the membrane's outer leaflet.
    """
    surfaces = [] if surfaces is None else surfaces
    x, y, z = coords_nm
    v = params.voxel_nm
    nx, ny, nz = params.shape_xyz
    z0, z1 = (b * v for b in _slab_bounds(params))
    size = np.array([nx, ny, nz]) * v
    in_slab = (z >= z0) & (z <= z1)
    obstacles = []
    if "carbon" in params.context:
        angle = rng.uniform(-0.5, 0.5)
        normal = np.array([np.cos(angle), np.sin(angle)])
        cut = rng.uniform(0.2, 0.3) * size[0]
        side = (x - size[0] / 2) * normal[0] + (y - size[1] / 2) * normal[1] + size[0] / 2 - cut
        texture = ndimage.gaussian_filter(rng.normal(size=density.shape), 1.5 / v)
        texture /= texture.std() + 1e-12
        carbon = (side < 0) & in_slab
        density += np.where(carbon, CARBON * (1.0 + 0.3 * texture), 0.0)

        def touches_carbon(c, r, normal=normal, cut=cut):
            s = (c[0] - size[0] / 2) * normal[0] + (c[1] - size[1] / 2) * normal[1] + size[0] / 2 - cut
            return s < r + 2.0

        obstacles.append(touches_carbon)
    if "membranes" in params.context:
        for _ in range(int(rng.integers(1, 3))):
            radius = rng.uniform(0.15, 0.3) * min(size[0], size[1])
            radius = min(radius, (z1 - z0) / 2 - 3.0)  # the vesicle stays in the ice
            centre = np.array([rng.uniform(radius, size[0] - radius), rng.uniform(radius, size[1] - radius),
                               (z0 + z1) / 2])
            distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) - radius
            density += np.where(np.abs(distance) < 5.0, _bilayer(distance), 0.0)

            def touches_shell(c, r, centre=centre, radius=radius):
                return abs(np.linalg.norm(np.asarray(c) - centre) - radius) < r + 4.0

            obstacles.append(touches_shell)

            def on_shell(rng, r, centre=centre, radius=radius):
                direction = rng.normal(size=3)
                return centre + direction / np.linalg.norm(direction) * (radius + 3.0 + r)

            surfaces.append((touches_shell, on_shell))
        # A nearly vertical plane membrane across the volume.
        normal = np.array([1.0, rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.2)])
        normal /= np.linalg.norm(normal)
        offset = rng.uniform(0.7, 0.85) * size[0]
        distance = x * normal[0] + y * normal[1] + (z - (z0 + z1) / 2) * normal[2] - offset
        density += np.where((np.abs(distance) < 5.0) & in_slab, _bilayer(distance), 0.0)

        def touches_plane(c, r, normal=normal, offset=offset):
            d = c[0] * normal[0] + c[1] * normal[1] + (c[2] - (z0 + z1) / 2) * normal[2] - offset
            return abs(d) < r + 4.0

        obstacles.append(touches_plane)

        def on_plane(rng, r, normal=normal, offset=offset):
            side = 1.0 if rng.random() < 0.5 else -1.0
            y_nm, z_nm = rng.uniform(0, size[1]), rng.uniform(z0, z1)
            x_nm = (offset + side * (3.0 + r) - y_nm * normal[1] - (z_nm - (z0 + z1) / 2) * normal[2]) / normal[0]
            return np.array([x_nm, y_nm, z_nm])

        surfaces.append((touches_plane, on_plane))
    if "gold" in params.context:
        beads = []
        for _ in range(int(rng.integers(5, 10))):
            radius = rng.uniform(2.5, 5.0)
            for _attempt in range(50):
                centre = np.array([rng.uniform(radius, size[0] - radius), rng.uniform(radius, size[1] - radius),
                                   rng.uniform(z0 + radius, z1 - radius)])
                if all(np.linalg.norm(centre - c) > radius + r + 2 for c, r in beads):
                    beads.append((centre, radius))
                    break
        for centre, radius in beads:
            r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
            # Smooth edge over ~half a nm so that coarse voxels still see a sphere.
            density += (GOLD - ICE - density) / (1.0 + np.exp((r - radius) / 0.25))

        def touches_gold(c, r, beads=beads):
            return any(np.linalg.norm(np.asarray(c) - b) < r + rb + 1.0 for b, rb in beads)

        obstacles.append(touches_gold)
    return obstacles


def _place_particles(rng: np.random.Generator, params: IndependentParams, scene: _Scene, obstacles,
                     target: int | None = None, surfaces: list | None = None) -> None:
    """Place particles until `target` in all (default: the crowding's count) or 30 failures running.

    `surfaces` (from `_context`): each particle touches one of these membranes, drawn at random,
    instead of lying anywhere in the slab away from every obstacle."""
    v = params.voxel_nm
    nx, ny, nz = params.shape_xyz
    z0, z1 = _slab_bounds(params)
    slab_nm3 = nx * ny * (z1 - z0) * v**3
    if target is None:
        target = int(round(CROWDING[params.crowding] * slab_nm3 / 1e6))
    placed_c = scene.placed_centres  # centres in voxels
    placed_r = scene.placed_reach  # bounding radii plus margin, voxels
    failures = 0
    while len(scene.centres) < target and failures < 30:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        extent = rng.uniform(*params.size_nm)
        box, half = render_particle(rng, shape, extent, v)
        member = box >= MASK_LEVEL
        idx = np.argwhere(member) - half
        bound = float(np.max(np.linalg.norm(idx, axis=1))) + 0.5
        reach = bound + MARGIN_NM / v
        for _attempt in range(200):
            blocking = obstacles
            if surfaces:
                own, touching_centre = surfaces[int(rng.integers(len(surfaces)))]
                centre = np.round(touching_centre(rng, bound * v) / v)
                blocking = [hit for hit in obstacles if hit is not own]
                if not (reach <= centre[0] <= nx - 1 - reach and reach <= centre[1] <= ny - 1 - reach
                        and z0 + bound <= centre[2] <= z1 - 1 - bound):
                    continue
            else:
                centre = np.array([
                    rng.uniform(reach, nx - 1 - reach), rng.uniform(reach, ny - 1 - reach),
                    rng.uniform(z0 + bound, z1 - 1 - bound),
                ])
                centre = np.round(centre)
            if placed_c:
                gaps = np.linalg.norm(np.asarray(placed_c) - centre, axis=1) - np.asarray(placed_r)
                if np.any(gaps < reach):
                    continue
            if any(hit(centre * v, bound * v) for hit in blocking):
                continue
            break
        else:
            failures += 1
            continue
        failures = 0
        cx, cy, cz = (int(c) for c in centre)
        zs, ys, xs = (slice(c - half, c + half + 1) for c in (cz, cy, cx))
        # Boxes may reach out of the volume (the mask never does: reach keeps it inside).
        lo = np.array([cz - half, cy - half, cx - half])
        src = tuple(slice(max(0, -lo[i]), box.shape[i] - max(0, lo[i] + box.shape[i] - s))
                    for i, s in enumerate((nz, ny, nx)))
        dst = tuple(slice(max(0, sl.start), min(s, sl.stop)) for sl, s in zip((zs, ys, xs), (nz, ny, nx), strict=True))
        local = box[src]
        excess = scene.density[dst]
        # Protein displaces ice: the voxel's density moves from the local ice's towards 1.35 by the
        # covered fraction (densities here are the excess over the uniform ice slab).
        added = np.clip(local, 0, 1) * (PROTEIN_EXCESS - excess)
        scene.density[dst] = excess + added
        scene.particles[dst] += added
        label = len(scene.centres) + 1
        mine = member[src]
        scene.occupancy[dst][mine] = label
        zz, yy, xx = np.nonzero(mine)
        weights = local[mine]
        zz, yy, xx = zz + dst[0].start, yy + dst[1].start, xx + dst[2].start
        centroid = np.array([np.average(xx, weights=weights), np.average(yy, weights=weights),
                             np.average(zz, weights=weights)])
        rounded = np.floor(centroid + 0.5).astype(int)
        if scene.occupancy[rounded[2], rounded[1], rounded[0]] != label:
            nearest = np.argmin((xx - centroid[0]) ** 2 + (yy - centroid[1]) ** 2 + (zz - centroid[2]) ** 2)
            centroid = np.array([xx[nearest], yy[nearest], zz[nearest]], dtype=np.float64)
        scene.centres.append(centroid)
        scene.shapes.append(shape)
        scene.radii.append(float(np.cbrt(3.0 * len(xx) / (4.0 * np.pi))))
        placed_c.append(centre)
        placed_r.append(reach)


def build_scene(params: IndependentParams, rng: np.random.Generator) -> _Scene:
    """The grand model (density over the uniform ice slab) with context and particles, and the truth."""
    nx, ny, nz = params.shape_xyz
    v = params.voxel_nm
    z0, z1 = _slab_bounds(params)
    zc = np.arange(nz)[:, None, None]
    # The uniform ice slab is left out (see `project`): this is the density in excess of it.
    density = np.zeros((nz, ny, nx))
    coords_nm = tuple(
        np.broadcast_to(a * v, (nz, ny, nx))
        for a in (np.arange(nx)[None, None, :], np.arange(ny)[None, :, None], zc)
    )
    surfaces: list = []
    obstacles = _context(rng, params, density, coords_nm, surfaces) if params.context else []
    scene = _Scene(density=density, occupancy=np.zeros((nz, ny, nx), np.int32),
                   particles=np.zeros((nz, ny, nx)))
    _place_particles(rng, params, scene, obstacles)
    if "membrane_proteins" in params.context and surfaces:
        extra = int(round(len(scene.centres) * MEMBRANE_PROTEINS_PER_100 / 100))
        _place_particles(rng, params, scene, obstacles, target=len(scene.centres) + extra, surfaces=surfaces)
    if "ice_gradient" in params.context:
        # Thicker ice adds projected density along every ray, particles' included; added after
        # them so that protein (1.35) still displaces ice of 1.0 (a denser-ice ramp past 1.35
        # would leave particles without contrast, which no thickness gradient does).
        in_slab = (coords_nm[2] >= z0 * v) & (coords_nm[2] <= z1 * v)
        ramp = 0.5 + coords_nm[0] / (nx * v)  # projected ice 0.5 -> 1.5 times the slab's across x
        scene.density += np.where(in_slab, ramp - ICE, 0.0)
    return scene


# --------------------------------------------------------------------------- imaging


def tilt_angles(params: IndependentParams) -> np.ndarray:
    low, high = params.tilt_range
    return np.arange(low, high + params.tilt_step / 2, params.tilt_step, dtype=np.float64)


def ctf_2d(shape: tuple[int, int], voxel_nm: float, defocus_um: float) -> np.ndarray:
    """Phase + amplitude CTF with a B-factor envelope on an rfft2 grid of `shape` (underfocus positive)."""
    ky = np.fft.fftfreq(shape[0], d=voxel_nm)[:, None]
    kx = np.fft.rfftfreq(shape[1], d=voxel_nm)[None, :]
    k2 = kx**2 + ky**2
    dz = defocus_um * 1e3
    chi = np.pi * WAVELENGTH_NM * dz * k2 - 0.5 * np.pi * CS_NM * WAVELENGTH_NM**3 * k2**2
    transfer = np.sqrt(1 - AMPLITUDE_CONTRAST**2) * np.sin(chi) + AMPLITUDE_CONTRAST * np.cos(chi)
    return transfer * np.exp(-B_FACTOR_NM2 * k2 / 4.0)


FADE = 8  # columns over which context fades out beside the field of view


def _square_side(nx: int, nz: int) -> int:
    # radon(circle=True) needs everything inside the inscribed circle: the slice, widened by
    # FADE columns each side, fits.
    return int(np.ceil(2 * np.hypot(nx / 2 + FADE + 1, nz / 2 + 1))) + 2


def tilt_images(density: np.ndarray, angles: np.ndarray, params: IndependentParams) -> np.ndarray:
    """Noise-free tilt images [tilt, y, detector]: projections through the CTF."""
    images = project(density, angles)
    transfer = ctf_2d(images.shape[1:], params.voxel_nm, params.defocus_um)
    # Dense matter comes out dark: the image is minus the CTF-filtered projected density.
    return -np.fft.irfft2(np.fft.rfft2(images) * transfer, s=images.shape[1:])


def project(density: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Projections [tilt, y, detector] of a [z, y, x] volume, one `radon` per x-z slice.

    `density` is the excess over a uniform ice slab. A laterally infinite uniform slab
    projects to a constant per tilt, which the CTF (k = 0) and the reconstruction filter
    remove, so it is left out: the field of view then has no ice edges. Context that runs
    out of the field of view (a carbon edge, a membrane plane, a gradient) is continued
    past its sides by edge replication, faded out before the projector's circle.
    """
    from skimage.transform import radon

    nz, ny, nx = density.shape
    side = _square_side(nx, nz)
    top, left = (side - nz) // 2, (side - nx) // 2
    # FADE columns each side continue the edge columns, faded out by a half cosine.
    fade = np.cos(0.5 * np.pi * np.arange(1, FADE + 1) / (FADE + 1)) ** 2
    padded = np.zeros((side, side), np.float64)
    out = np.empty((len(angles), ny, side), np.float64)
    for y in range(ny):
        plane = density[:, y, :]
        padded[top:top + nz, left:left + nx] = plane
        padded[top:top + nz, left - FADE:left] = plane[:, :1] * fade[::-1][None, :]
        padded[top:top + nz, left + nx:left + nx + FADE] = plane[:, -1:] * fade[None, :]
        out[:, y, :] = radon(padded, theta=angles, circle=True).T
    return out


def reconstruct(images: np.ndarray, angles: np.ndarray, shape_zyx, filter_name: str) -> np.ndarray:
    """Filtered back-projection (`iradon`) of every y-slice: [z, y, x]."""
    from skimage.transform import iradon

    nz, ny, nx = shape_zyx
    side = images.shape[2]
    top, left = (side - nz) // 2, (side - nx) // 2
    out = np.empty((nz, ny, nx), np.float64)
    for y in range(ny):
        full = iradon(images[:, y, :].T, theta=angles, output_size=side, filter_name=filter_name, circle=True)
        out[:, y, :] = full[top:top + nz, left:left + nx]
    return out


def simulate(params: IndependentParams, seed: int) -> IndependentTomogram:
    """One tomogram; the same params and seed give the same bytes."""
    params.validate()
    scene_seed, noise_seed = np.random.SeedSequence([20261201, seed]).spawn(2)
    scene = build_scene(params, np.random.default_rng(scene_seed))
    angles = tilt_angles(params)
    shape = scene.density.shape
    images = tilt_images(scene.density, angles, params)
    noise = np.random.default_rng(noise_seed).normal(size=images.shape)
    # Reconstruction is linear: reconstruct signal and unit noise apart, then scale the noise.
    signal = reconstruct(images, angles, shape, params.filter_name)
    unit_noise = reconstruct(noise, angles, shape, params.filter_name)
    # The particles' own SNR is the target, so that context adds matter without hiding them.
    particle_signal = (
        reconstruct(tilt_images(scene.particles, angles, params), angles, shape, params.filter_name)
        if params.context else signal
    )
    scale = np.sqrt(np.var(particle_signal) / (params.snr * np.var(unit_noise)))
    volume = (signal + scale * unit_noise).astype(np.float32)
    noise_var = np.var(volume - signal)
    snr_measured = float(np.var(signal) / noise_var)
    snr_particles = float(np.var(particle_signal) / noise_var)
    if params.contrast == "bright":
        volume = -volume
    return IndependentTomogram(
        volume=volume,
        occupancy=scene.occupancy,
        centres_xyz=np.asarray(scene.centres, dtype=np.float64).reshape(-1, 3),
        shapes=list(scene.shapes),
        radii_vox=np.asarray(scene.radii, dtype=np.float64),
        snr_measured=snr_measured,
        snr_particles=snr_particles,
        params=params,
        seed=seed,
    )


def with_changes(params: IndependentParams, **changes) -> IndependentParams:
    """`params` with some fields replaced (tuples kept as tuples)."""
    return replace(params, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})
