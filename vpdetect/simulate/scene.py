"""Crowded cell-like scenes: particles placed without overlap in an ice slab.

A scene is built in the tomogram's own grid ([z, y, x] arrays, 0-based voxel
centres at integers). Each particle sits on an integer voxel, with a random
orientation drawn uniformly over SO(3) and stored as ZXZ Euler angles in
degrees (phi, theta, psi), meaning x_world = centre + R p_body with
R = Rz(phi) Rx(theta) Rz(psi) (intrinsic z-x'-z''; see `phantoms`). Angles are
rounded to 0.01 degree before rendering so that the written angles reproduce
the rendered particle exactly.

Placement is exact at voxel level: a candidate is rendered once and accepted
only if its mask covers no voxel already owned by another particle, so
particles may touch but never overlap. The occupancy mask is each particle's
solid, except that a vesicle also owns its lumen (its centre lies there), so
nothing is placed inside vesicles.

Membrane proteins (`membrane_share`): a share of the proteins sits on the
vesicles' outer surface. Each is slid outward along a random ray from a
vesicle's centre until it no longer overlaps anything, and kept only if it then
touches that vesicle's membrane; otherwise it is placed free in the ice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from vpdetect.errors import VPDetectError
from vpdetect.simulate.phantoms import ParticleClass, box_half_size, render

ANGLE_DECIMALS = 2
# Random positions tried per orientation, and orientations tried per particle.
POSITIONS_PER_ORIENTATION = 40
ORIENTATIONS_PER_PARTICLE = 4


@dataclass
class Placement:
    """One placed particle: its class (index into Scene.classes), centre (x, y, z) and ZXZ angles."""

    class_index: int
    x: int
    y: int
    z: int
    phi: float
    theta: float
    psi: float


@dataclass
class Scene:
    """Rendered ground truth of one tomogram.

    density: float32 [z, y, x], particle density above the surrounding ice.
    class_mask: int16, 0 background, `labels[i]` for voxels of classes[i].
    occupancy: int16/int32, 0 background, k for the k-th placement (1-based).
    """

    density: np.ndarray
    class_mask: np.ndarray
    occupancy: np.ndarray
    classes: list[ParticleClass]
    labels: list[int]
    placements: list[Placement] = field(default_factory=list)
    slab: tuple[int, int] = (0, 0)  # z range [z0, z1) of the ice slab
    unplaced: dict[str, int] = field(default_factory=dict)  # class name -> particles with no room
    on_membrane: list[int] = field(default_factory=list)  # 1-based ids of proteins placed touching a vesicle


def random_orientations(rng: np.random.Generator, n: int) -> np.ndarray:
    """n ZXZ Euler triples (degrees) uniform over SO(3) (Haar measure).

    For ZXZ angles the Haar density is proportional to sin(theta), so phi and
    psi are uniform on [0, 360) and cos(theta) is uniform on [-1, 1].
    """
    phi = rng.uniform(0.0, 360.0, n)
    psi = rng.uniform(0.0, 360.0, n)
    theta = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    angles = np.round(np.stack([phi, theta, psi], axis=1), ANGLE_DECIMALS)
    return np.where(angles >= 360.0, angles - 360.0, angles)


def slab_range(nz: int, slab_thickness: int) -> tuple[int, int]:
    """z range [z0, z1) of a slab centred in the volume."""
    z0 = (nz - slab_thickness) // 2
    return z0, z0 + slab_thickness


def check_fits(shape_xyz: Sequence[int], slab_thickness: int, particle_class: ParticleClass, voxel_size_nm: float) -> None:
    """Raise if the class cannot fit at all in the volume or slab at any orientation."""
    edge = 2 * box_half_size(particle_class.shape, voxel_size_nm) + 1
    nx, ny, _ = shape_xyz
    if edge > min(nx, ny, slab_thickness):
        raise VPDetectError(
            f"particles cannot fit: {particle_class.name} needs a {edge}-voxel box but the volume is "
            f"{nx} x {ny} with a {slab_thickness}-voxel slab; enlarge --shape/--slab-thickness or drop the class"
        )


def _box(x: int, y: int, z: int, half: int) -> tuple[slice, slice, slice]:
    """The [z, y, x] slices of the cube of half-size `half` centred on voxel (x, y, z)."""
    return slice(z - half, z + half + 1), slice(y - half, y + half + 1), slice(x - half, x + half + 1)


class _Placer:
    """Places rendered particles into the scene arrays, refusing overlaps."""

    def __init__(self, scene: Scene, voxel_size_nm: float, rng: np.random.Generator):
        self.scene = scene
        self.voxel_size_nm = voxel_size_nm
        self.rng = rng
        self.nz, self.ny, self.nx = scene.density.shape

    def _centre_bounds(self, half: int) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) of (x, y, z) centres that keep a box of half-size `half` inside the volume and slab."""
        z0, z1 = self.scene.slab
        return np.array([half, half, z0 + half]), np.array([self.nx - half, self.ny - half, z1 - half])

    def try_place(self, class_index: int, angles: np.ndarray) -> bool:
        scene = self.scene
        particle_class = scene.classes[class_index]
        density, mask = render(particle_class, tuple(angles), self.voxel_size_nm)
        # A vesicle owns its lumen in the occupancy mask, so that its written
        # centre lies on it; its class mask is the membrane only.
        owned = ndimage.binary_fill_holes(mask) if particle_class.kind == "vesicle" else mask
        half = mask.shape[0] // 2
        lo, hi = self._centre_bounds(half)
        if np.any(hi <= lo):
            return False
        for _ in range(POSITIONS_PER_ORIENTATION):
            x, y, z = (int(v) for v in self.rng.integers(lo, hi))
            box = _box(x, y, z, half)
            if scene.occupancy[box][owned].any():
                continue
            self._commit(class_index, angles, (x, y, z), density, mask, owned)
            return True
        return False

    def _commit(self, class_index: int, angles, centre, density, mask, owned) -> None:
        scene = self.scene
        x, y, z = centre
        half = mask.shape[0] // 2
        box = _box(x, y, z, half)
        occupied = scene.occupancy[box]
        particle_id = len(scene.placements) + 1
        free = occupied == 0
        region = scene.density[box]
        # the particle's own voxels take its density exactly; its soft edge
        # may only brighten free voxels, never another particle's voxels
        np.maximum(region, np.where(free, density, 0.0), out=region)
        region[owned] = density[owned]
        occupied[owned] = particle_id
        scene.class_mask[box][mask] = scene.labels[class_index]
        scene.placements.append(Placement(class_index, x, y, z, *(float(a) for a in angles)))

    def try_place_on_vesicle(self, class_index: int, angles: np.ndarray, vesicles: list[int]) -> bool:
        """Place the protein touching one of `vesicles` (0-based placement indices), or return False."""
        scene = self.scene
        density, mask = render(scene.classes[class_index], tuple(angles), self.voxel_size_nm)
        half = mask.shape[0] // 2
        lo, hi = self._centre_bounds(half)
        # voxels just outside the particle: the membrane must reach one of them
        rim = ndimage.binary_dilation(mask, iterations=1) & ~mask
        for _ in range(POSITIONS_PER_ORIENTATION // 4):
            index = vesicles[int(self.rng.integers(len(vesicles)))]
            vesicle = scene.placements[index]
            direction = self.rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            outer = scene.classes[vesicle.class_index].shape.bounding_radius / self.voxel_size_nm
            reach = scene.classes[class_index].shape.bounding_radius / self.voxel_size_nm
            start = np.array([vesicle.x, vesicle.y, vesicle.z], float)
            # slide outward from inside the membrane until nothing overlaps
            for distance in np.arange(outer - 1.0, outer + reach + 2.0, 1.0):
                centre = np.rint(start + distance * direction).astype(int)
                if np.any(centre < lo) or np.any(centre >= hi):
                    break
                x, y, z = (int(v) for v in centre)
                box = _box(x, y, z, half)
                occupied = scene.occupancy[box]
                if occupied[mask].any():
                    continue
                if np.any(occupied[rim] == index + 1):
                    self._commit(class_index, angles, (x, y, z), density, mask, mask)
                    scene.on_membrane.append(len(scene.placements))
                    return True
                break  # free, but off the membrane (another particle was in the way)
        return False

    def place(self, class_index: int, random_angles: bool, vesicles: list[int] | None = None) -> bool:
        """Place one particle; with `vesicles`, first try touching one of them, then free."""
        if vesicles:
            for _ in range(ORIENTATIONS_PER_PARTICLE):
                if self.try_place_on_vesicle(class_index, random_orientations(self.rng, 1)[0], vesicles):
                    return True
        for _ in range(ORIENTATIONS_PER_PARTICLE):
            angles = random_orientations(self.rng, 1)[0] if random_angles else np.zeros(3)
            if self.try_place(class_index, angles):
                return True
        return False


def build_scene(
    shape_xyz: Sequence[int],
    slab_thickness: int,
    classes: Sequence[ParticleClass],
    labels: Sequence[int],
    counts: Sequence[int],
    rng: np.random.Generator,
    voxel_size_nm: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    strict: bool = True,
    membrane_share: float = 0.0,
) -> Scene:
    """Place counts[i] copies of classes[i] in a centred slab.

    Non-protein classes (vesicles, fiducials; spherically symmetric) are placed
    first with zero angles, then proteins, largest first so that crowding
    leaves room for the small ones. When a particle finds no room, `strict`
    raises VPDetectError naming the class; otherwise it is skipped and counted
    in `Scene.unplaced`. Each protein goes onto a vesicle's surface with
    probability `membrane_share` (when a vesicle was placed).
    """
    nx, ny, nz = (int(v) for v in shape_xyz)
    if slab_thickness > nz:
        raise VPDetectError(f"slab thickness {slab_thickness} exceeds the volume depth {nz}")
    for particle_class, count in zip(classes, counts, strict=True):
        if count > 0:
            check_fits(shape_xyz, slab_thickness, particle_class, voxel_size_nm)
    n_total = int(sum(counts))
    occupancy_dtype = np.int16 if n_total < 32767 else np.int32
    scene = Scene(
        density=np.zeros((nz, ny, nx), np.float32),
        class_mask=np.zeros((nz, ny, nx), np.int16),
        occupancy=np.zeros((nz, ny, nx), occupancy_dtype),
        classes=list(classes),
        labels=[int(v) for v in labels],
        slab=slab_range(nz, slab_thickness),
    )
    order = np.repeat(np.arange(len(classes)), np.asarray(counts, dtype=int))
    # shuffle, then a stable sort: non-proteins first, then by size (largest first)
    order = order[rng.permutation(len(order))]
    priority = np.array(
        [(classes[i].kind == "protein", -classes[i].shape.bounding_radius) for i in order],
        dtype=[("protein", bool), ("size", float)],
    )
    order = order[np.argsort(priority, order=("protein", "size"), kind="stable")]
    placer = _Placer(scene, voxel_size_nm, rng)
    placed_vesicles = None  # indices of the placed vesicles, listed once the proteins' turn comes
    for done, class_index in enumerate(order):
        particle_class = classes[class_index]
        vesicles = None
        # no draw at share 0, so that scenes without membrane proteins are unchanged
        if membrane_share > 0 and particle_class.kind == "protein" and rng.random() < membrane_share:
            if placed_vesicles is None:
                placed_vesicles = [i for i, p in enumerate(scene.placements) if classes[p.class_index].kind == "vesicle"]
            vesicles = placed_vesicles
        if not placer.place(class_index, random_angles=particle_class.kind == "protein", vesicles=vesicles):
            if not strict:
                scene.unplaced[particle_class.name] = scene.unplaced.get(particle_class.name, 0) + 1
                continue
            raise VPDetectError(
                f"particles cannot fit: placed {len(scene.placements)} of {n_total} particles, no room left for "
                f"{particle_class.name} in a {nx} x {ny} x {nz} volume with a {slab_thickness}-voxel slab; "
                "request fewer particles or a larger --shape/--slab-thickness"
            )
        if progress is not None:
            progress(done + 1, n_total)
    return scene
