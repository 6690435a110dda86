"""Synthetic macromolecules, vesicles and gold fiducials, rendered analytically.

Every shape is a union of simple solids (spheres, ellipsoids, capsules,
spherical shells) described in its own body frame in nanometres. A shape is
rendered by evaluating its signed distance function (SDF, negative inside) at
the voxel centres of a box around the particle, after rotating the voxel
coordinates into the body frame. No volume is ever interpolated, so small
particles keep sharp outlines; a one-voxel linear ramp across the surface
(`fraction = clip(0.5 - sdf, 0, 1)`) anti-aliases the density, and the voxels
with fraction >= 0.5 (sdf <= 0) form the particle's mask, which is the same
"density > 0.5" threshold the SHREC'21 paper uses for its class table.

The 12 protein classes imitate the 12 SHREC'21 complexes (paper table 1): the
same ordering by molecular weight and similar volumes, effective radii and
sphericities, with distinct shapes (rings, barrels, clamps, arcs, knobbly
assemblies) so that classes of the same size differ only in shape. Their
measured geometry is reported by `shape_geometry`.

Rotation convention (shared with `vpdetect.simulate.scene`): a particle with
ZXZ Euler angles (phi, theta, psi) in degrees occupies world point
x = c + R p for body point p, R = Rz(phi) Rx(theta) Rz(psi): an active,
intrinsic z-x'-z'' rotation by phi, theta, psi (identically an extrinsic
rotation about the fixed z by psi, then x by theta, then z by phi), the same
matrix as `scipy.spatial.transform.Rotation.from_euler("ZXZ", ...)`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from vpdetect.errors import VPDetectError

KINDS = ("protein", "vesicle", "fiducial")
SIZE_GROUPS = ("small", "medium", "large")


@dataclass(frozen=True)
class Shape:
    """A union of solids in a body frame (nm). Arrays are read-only rows.

    spheres:    (K, 4)  centre x, y, z, radius
    ellipsoids: (E, 3), (E, 3), (E, 3, 3) centres, semi-axes, axes rotation (body <- ellipsoid)
    capsules:   (M, 7)  end a (x, y, z), end b (x, y, z), radius
    shells:     (S, 5)  centre x, y, z, mid-radius, thickness (lipid-like bilayer)
    """

    spheres: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    ellipsoid_centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    ellipsoid_axes: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    ellipsoid_rotations: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 3)))
    capsules: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    shells: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))

    def __hash__(self) -> int:  # shapes are immutable; hash by content for caching
        return hash(
            tuple(np.asarray(a, dtype=np.float64).tobytes() for a in self._arrays())
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, Shape) and all(
            a.shape == b.shape and np.array_equal(a, b)
            for a, b in zip(self._arrays(), other._arrays(), strict=True)
        )

    def _arrays(self):
        return (
            self.spheres,
            self.ellipsoid_centres,
            self.ellipsoid_axes,
            self.ellipsoid_rotations,
            self.capsules,
            self.shells,
        )

    @property
    def bounding_radius(self) -> float:
        """Radius (nm) of a sphere about the body origin that contains the whole shape."""
        extents = [0.0]
        if len(self.spheres):
            extents.append(float(np.max(np.linalg.norm(self.spheres[:, :3], axis=1) + self.spheres[:, 3])))
        if len(self.ellipsoid_centres):
            extents.append(
                float(np.max(np.linalg.norm(self.ellipsoid_centres, axis=1) + self.ellipsoid_axes.max(axis=1)))
            )
        if len(self.capsules):
            ends = np.maximum(
                np.linalg.norm(self.capsules[:, 0:3], axis=1), np.linalg.norm(self.capsules[:, 3:6], axis=1)
            )
            extents.append(float(np.max(ends + self.capsules[:, 6])))
        if len(self.shells):
            extents.append(
                float(np.max(np.linalg.norm(self.shells[:, :3], axis=1) + self.shells[:, 3] + self.shells[:, 4] / 2))
            )
        return max(extents)

    def sdf(self, points: np.ndarray) -> np.ndarray:
        """Signed distance (nm, negative inside) of body-frame points (N, 3).

        Exact for spheres, capsules and shells; the usual first-order
        approximation for ellipsoids (exact on the surface, so the mask is exact).
        """
        points = np.asarray(points, dtype=np.float64)
        result = np.full(len(points), np.inf)
        if len(self.spheres):
            centres = self.spheres[:, :3]
            # |p - c|^2 = |p|^2 - 2 p.c + |c|^2 as one matrix product for all spheres
            sq = (
                np.einsum("ij,ij->i", points, points)[:, None]
                - 2.0 * points @ centres.T
                + np.einsum("ij,ij->i", centres, centres)[None, :]
            )
            dist = np.sqrt(np.maximum(sq, 0.0)) - self.spheres[None, :, 3]
            np.minimum(result, dist.min(axis=1), out=result)
        for centre, axes, rotation in zip(
            self.ellipsoid_centres, self.ellipsoid_axes, self.ellipsoid_rotations, strict=True
        ):
            local = (points - centre) @ rotation  # rotation columns are the ellipsoid axes
            k0 = np.linalg.norm(local / axes, axis=1)
            k1 = np.linalg.norm(local / axes**2, axis=1)
            dist = np.where(k1 > 0, k0 * (k0 - 1.0) / np.maximum(k1, 1e-12), -axes.min())
            np.minimum(result, dist, out=result)
        for capsule in self.capsules:
            a, b, radius = capsule[0:3], capsule[3:6], capsule[6]
            ab = b - a
            t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
            dist = np.linalg.norm(points - a - t[:, None] * ab, axis=1) - radius
            np.minimum(result, dist, out=result)
        for shell in self.shells:
            centre, mid_radius, thickness = shell[0:3], shell[3], shell[4]
            dist = np.abs(np.linalg.norm(points - centre, axis=1) - mid_radius) - thickness / 2.0
            np.minimum(result, dist, out=result)
        return result

    def profile(self, points: np.ndarray) -> np.ndarray | None:
        """Relative density inside the solid (None = uniform). Shells are lipid
        bilayers: dense head-group leaflets, a lighter tail region between them."""
        if not len(self.shells):
            return None
        value = np.ones(len(points))
        for shell in self.shells:
            centre, mid_radius = shell[0:3], shell[3]
            across = np.linalg.norm(points - centre, axis=1) - mid_radius
            value = np.minimum(value, 1.0 - 0.45 * np.exp(-0.5 * (across / 0.8) ** 2))
        return value


@dataclass(frozen=True)
class ParticleClass:
    """One kind of particle: its name, what it imitates, kind, size group, contrast, shape."""

    name: str
    imitates: str
    kind: str
    size_group: str | None
    contrast: float  # density above the surrounding ice, protein = 1
    shape: Shape


def euler_zxz_matrix(phi: float, theta: float, psi: float) -> np.ndarray:
    """R = Rz(phi) Rx(theta) Rz(psi), angles in degrees (intrinsic ZXZ, active)."""
    p, t, s = np.deg2rad([phi, theta, psi])

    def rz(a):
        c, n = np.cos(a), np.sin(a)
        return np.array([[c, -n, 0.0], [n, c, 0.0], [0.0, 0.0, 1.0]])

    ct, st = np.cos(t), np.sin(t)
    rx = np.array([[1.0, 0.0, 0.0], [0.0, ct, -st], [0.0, st, ct]])
    return rz(p) @ rx @ rz(s)


def _rotation_to(direction) -> np.ndarray:
    """A rotation whose third column points along `direction` (for ellipsoid axes)."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(helper, d)
    u /= np.linalg.norm(u)
    v = np.cross(d, u)
    return np.stack([u, v, d], axis=1)


def _fibonacci_points(n: int) -> np.ndarray:
    """n nearly evenly spread unit vectors (golden-angle spiral), deterministic."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(1.0 - z**2)
    angle = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([r * np.cos(angle), r * np.sin(angle), z], axis=1)


def _ring(n: int, ring_radius: float, z: float, radius: float, phase_deg: float = 0.0) -> list:
    angles = np.deg2rad(phase_deg) + 2.0 * np.pi * np.arange(n) / n
    return [[ring_radius * np.cos(a), ring_radius * np.sin(a), z, radius] for a in angles]


def _knobs(centre, semi_axes, n: int, knob_radius: float, depth: float = 0.85) -> list:
    """Spheres centred on an ellipsoid surface (scaled by depth): a knobbly, protein-like outline."""
    points = _fibonacci_points(n) * np.asarray(semi_axes) * depth + np.asarray(centre)
    return [[*p, knob_radius] for p in points]


def _shape(spheres=(), ellipsoids=(), capsules=(), shells=(), recentre: bool = True) -> Shape:
    """Build a Shape; `ellipsoids` rows are (centre, semi_axes, long-axis direction or None)."""
    spheres = np.asarray(spheres, dtype=np.float64).reshape(-1, 4)
    capsules = np.asarray(capsules, dtype=np.float64).reshape(-1, 7)
    centres = np.asarray([e[0] for e in ellipsoids], dtype=np.float64).reshape(-1, 3)
    axes = np.asarray([e[1] for e in ellipsoids], dtype=np.float64).reshape(-1, 3)
    rotations = np.asarray(
        [np.eye(3) if e[2] is None else _rotation_to(e[2]) for e in ellipsoids], dtype=np.float64
    ).reshape(-1, 3, 3)
    shells = np.asarray(shells, dtype=np.float64).reshape(-1, 5)
    shape = Shape(spheres, centres, axes, rotations, capsules, shells)
    if recentre:
        shape = _recentred(shape)
    for array in shape._arrays():
        array.setflags(write=False)
    return shape


def _recentred(shape: Shape) -> Shape:
    """Move the body origin to the solid's centre of mass, so that a particle's
    written coordinate is its centre (what pickers aim at)."""
    step = 0.5
    half = int(np.ceil(shape.bounding_radius / step)) + 2
    sdf, _ = sdf_on_grid(shape, np.eye(3), half, step)
    z, y, x = np.nonzero(sdf <= 0)
    shift = (np.stack([x, y, z], axis=1).mean(axis=0) - half) * step
    # The written centre must lie on the particle (a pick there must hit it):
    # when the centre of mass falls outside (butterflies, arcs), take the
    # nearest point at least half a nanometre inside.
    if shape.sdf(shift[None, :])[0] > -0.5:
        z, y, x = np.nonzero(sdf * step <= -0.5)
        inside = (np.stack([x, y, z], axis=1) - half) * step
        shift = inside[np.argmin(np.linalg.norm(inside - shift, axis=1))]
    return Shape(
        spheres=np.column_stack([shape.spheres[:, :3] - shift, shape.spheres[:, 3]]),
        ellipsoid_centres=shape.ellipsoid_centres - shift,
        ellipsoid_axes=shape.ellipsoid_axes,
        ellipsoid_rotations=shape.ellipsoid_rotations,
        capsules=np.column_stack(
            [shape.capsules[:, 0:3] - shift, shape.capsules[:, 3:6] - shift, shape.capsules[:, 6]]
        ),
        shells=np.column_stack([shape.shells[:, :3] - shift, shape.shells[:, 3:]]),
    )


def _arc_capsules(arc_radius: float, start_deg: float, stop_deg: float, n: int, radius: float) -> list:
    """A bent tube: n capsules along a circular arc in the x-y plane."""
    angles = np.deg2rad(np.linspace(start_deg, stop_deg, n + 1))
    points = np.stack([arc_radius * np.cos(angles), arc_radius * np.sin(angles), np.zeros(n + 1)], axis=1)
    return [[*points[i], *points[i + 1], radius] for i in range(n)]


@functools.lru_cache(maxsize=1)
def protein_classes() -> tuple[ParticleClass, ...]:
    """The 12 synthetic protein classes, smallest molecular weight first (as SHREC'21 table 1)."""

    def protein(name, imitates, group, shape, contrast=1.0):
        return ParticleClass(name, imitates, "protein", group, contrast, shape)

    classes = [
        # Hsp70 ATPase domain: two lobes around a nucleotide cleft.
        protein("syn-atpase", "1s3x Hsp70 ATPase", "small", _shape(
            spheres=[[-1.2, 0.0, 0.0, 2.3], [1.3, 0.35, 0.0, 2.2], [0.0, -1.5, 1.5, 1.5]])),
        # LJ0536 esterase: a compact alpha/beta globule with a lid and a cap helix.
        protein("syn-esterase", "3qm1 LJ0536 S106A", "small", _shape(
            ellipsoids=[((0, 0, 0), (3.4, 2.9, 2.6), None)],
            spheres=[[0.8, 0.6, 2.2, 1.6], [-2.2, -1.2, -1.4, 1.4]])),
        # Ssb1 (Hsp70): nucleotide-binding and substrate-binding domains in a row.
        protein("syn-hsp70", "3gl1 Ssb1 Hsp70", "small", _shape(
            spheres=[[-1.9, 0.0, 0.0, 3.1], [2.6, 0.4, 0.0, 2.45], [0.4, -2.0, 1.7, 1.6]])),
        # GET3 dimer: a butterfly of two arms over a shared base.
        protein("syn-get3", "3h84 GET3", "small", _shape(
            ellipsoids=[((0, 0, -1.5), (3.8, 2.6, 2.3), None)],
            capsules=[[-1.2, 0, -1.0, -5.8, 0.4, 5.6, 2.1], [1.2, 0, -1.0, 5.8, -0.4, 5.6, 2.1]])),
        # Hsp90-Sba1: a long closed clamp of two protomers with a small co-chaperone.
        protein("syn-hsp90", "2cg9 Hsp90-Sba1", "small", _shape(
            capsules=[[-2.2, 0, -6.6, -0.9, 0, 6.0, 2.1], [2.2, 0, -6.6, 0.9, 0, 6.0, 2.1]],
            spheres=[[0.0, 2.2, 4.0, 1.8]])),
        # Sse1p: a globular nucleotide-binding domain with a long bent arm.
        protein("syn-sse1", "3d2f Sse1p Hsp70", "medium", _shape(
            ellipsoids=[((-2.6, 0, 0), (4.6, 3.9, 3.7), None)],
            capsules=[[0.5, 0, 0.5, 6.5, 0, 5.2, 2.3], [6.5, 0, 5.2, 7.2, 4.0, 1.3, 2.0]])),
        # Cand1-Cul1-Roc1: a curved solenoid wrapped around a long cullin, with a RING globule.
        protein("syn-cand1", "1u6g Cand1-Cul1-Roc1", "medium", _shape(
            capsules=_arc_capsules(6.8, -105.0, 105.0, 7, 2.0) + [[-3.0, -1.0, 0.0, 5.5, 1.0, 0.5, 1.6]],
            spheres=[[-6.3, 2.4, 0.0, 2.7]])),
        # p97/VCP: two stacked hexameric rings around a narrow (closed at 1 nm) pore, with N-domains.
        protein("syn-p97", "3cf3 p97/VCP", "medium", _shape(
            spheres=_ring(6, 4.0, 1.8, 2.9) + _ring(6, 3.9, -1.9, 2.8)
            + _ring(6, 6.6, 2.6, 2.0, phase_deg=30.0),
            capsules=[[0.0, 0.0, -2.5, 0.0, 0.0, 2.5, 1.6]])),
        # Rubisco L8S8: a compact D4 block of eight large and eight small subunits.
        protein("syn-rubisco", "1bxn Rubisco", "medium", _shape(
            spheres=[[sx * 2.4, sy * 2.4, sz * 2.2, 3.1] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
            + _ring(4, 2.4, 4.9, 1.9, phase_deg=45.0) + _ring(4, 2.4, -4.9, 1.9, phase_deg=45.0),
            ellipsoids=[((0, 0, 0), (3.6, 3.6, 3.6), None)])),
        # ClpB: a wide hexameric ring of tall subunits with coiled-coil arms, its
        # channel closed at one end like a cup (so the centre lies on the particle).
        protein("syn-clpb", "1qvr ClpB", "medium", _shape(
            spheres=[[0.0, 0.0, -1.5, 3.6]],
            ellipsoids=[((6.0 * np.cos(a), 6.0 * np.sin(a), 0.0), (2.8, 2.9, 5.2), None)
                        for a in np.deg2rad(np.arange(6) * 60.0)],
            capsules=[[8.0 * np.cos(a), 8.0 * np.sin(a), 1.0, 11.5 * np.cos(a), 11.5 * np.sin(a), 2.5, 1.2]
                      for a in np.deg2rad(np.arange(6) * 60.0 + 20.0)])),
        # 26S proteasome: a 20S barrel of four heptameric rings capped by two
        # asymmetric regulatory particles.
        protein("syn-proteasome", "4cr2 26S proteasome", "large", _shape(
            spheres=_ring(7, 4.5, -5.4, 2.4) + _ring(7, 4.5, -1.8, 2.4, 25.7)
            + _ring(7, 4.5, 1.8, 2.4) + _ring(7, 4.5, 5.4, 2.4, 25.7)
            + _knobs((1.5, 0.0, 11.4), (5.8, 4.8, 3.6), 10, 2.4)
            + _knobs((-1.5, 0.0, -11.4), (5.8, 4.8, 3.6), 10, 2.4),
            ellipsoids=[((1.5, 0.0, 11.4), (5.0, 4.1, 3.0), None),
                        ((-1.5, 0.0, -11.4), (5.0, 4.1, 3.0), None),
                        ((0.0, 0.0, 0.0), (2.4, 2.4, 7.5), None)])),  # the barrel's filled core
        # Mitochondrial ribosome: a knobbly large subunit, a smaller head-and-body
        # small subunit and protruding stalks.
        protein("syn-ribosome", "5mrc yeast mito ribosome", "large", _shape(
            ellipsoids=[((0, 0, -3.0), (9.5, 8.5, 7.0), None), ((0.5, 1.0, 7.5), (8.0, 5.5, 3.8), None)],
            spheres=_knobs((0, 0, -3.0), (10.5, 9.5, 8.0), 60, 2.6, depth=0.97)
            + _knobs((0.5, 1.0, 7.5), (9.0, 6.5, 4.6), 24, 2.1, depth=0.97),
            capsules=[[7.0, 0.0, -1.0, 14.0, 1.0, 2.0, 1.6], [-7.0, 1.0, 0.0, -13.0, -1.0, 4.5, 1.8]]),
            contrast=1.15),  # RNA-rich: denser than protein
    ]
    return tuple(classes)


def vesicle_class(outer_radius_nm: float, thickness_nm: float = 4.0) -> ParticleClass:
    """A lipid vesicle: a spherical bilayer shell (no size group: not a protein)."""
    if thickness_nm <= 0 or outer_radius_nm <= thickness_nm:
        raise VPDetectError(
            f"vesicle outer radius {outer_radius_nm} nm must exceed its membrane thickness {thickness_nm} nm"
        )
    shape = _shape(shells=[[0.0, 0.0, 0.0, outer_radius_nm - thickness_nm / 2.0, thickness_nm]],
                   recentre=False)
    return ParticleClass("vesicle", "lipid vesicle", "vesicle", None, 0.8, shape)


def fiducial_class(radius_nm: float = 5.0, contrast: float = 6.0) -> ParticleClass:
    """A gold fiducial bead: a small, very dense sphere."""
    if radius_nm <= 0:
        raise VPDetectError(f"fiducial radius must be positive, got {radius_nm} nm")
    shape = _shape(spheres=[[0.0, 0.0, 0.0, radius_nm]], recentre=False)
    return ParticleClass("fiducial", "gold bead", "fiducial", None, contrast, shape)


def class_by_name(name: str) -> ParticleClass:
    for particle_class in protein_classes():
        if particle_class.name == name:
            return particle_class
    known = ", ".join(c.name for c in protein_classes())
    raise VPDetectError(f"unknown particle class {name!r} (known: {known})")


def box_half_size(shape: Shape, voxel_size_nm: float) -> int:
    """Half edge (voxels) of the box that holds the shape's ramp at any orientation."""
    return int(np.ceil(shape.bounding_radius / voxel_size_nm + 1.0))


def _sub_box(centre_vox: np.ndarray, reach_vox: float, half: int) -> tuple[slice, slice, slice] | None:
    """[z, y, x] slices of a (2 half + 1)^3 box covering a ball of `reach_vox` about a centre (x, y, z)."""
    lo = np.maximum(np.floor(centre_vox - reach_vox).astype(int) + half, 0)
    hi = np.minimum(np.ceil(centre_vox + reach_vox).astype(int) + half + 1, 2 * half + 1)
    if np.any(hi <= lo):
        return None
    return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _box_points(box: tuple[slice, slice, slice], half: int, step: float) -> np.ndarray:
    """World offsets (x, y, z), in nm, of the voxel centres of a sub-box, in [z, y, x] C order."""
    z, y, x = np.meshgrid(
        *(np.arange(s.start, s.stop, dtype=np.float64) - half for s in box), indexing="ij"
    )
    return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1) * step


def sdf_on_grid(
    shape: Shape, rotation: np.ndarray, half: int, step: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Signed distance (in units of `step`) of the rotated shape on a (2 half + 1)^3 grid [z, y, x].

    Each solid is evaluated only inside its own bounding box (plus a one-step
    margin for the anti-aliasing ramp), in world coordinates where possible,
    so a knobbly assembly of many spheres costs the sum of small boxes rather
    than solids x voxels. Voxels farther than one step from every solid hold
    +inf. Also returns the relative density profile (None = uniform).
    """
    edge = 2 * half + 1
    sdf = np.full((edge, edge, edge), np.inf)
    margin = 1.0 + 1e-9  # in grid steps: the ramp reaches sdf = 0.5 step
    for row in shape.spheres:
        centre = rotation @ row[:3]  # spheres are rotation invariant: place the centre only
        box = _sub_box(centre / step, row[3] / step + margin, half)
        if box is None:
            continue
        dist = np.linalg.norm(_box_points(box, half, step) - centre, axis=1) - row[3]
        np.minimum(sdf[box], dist.reshape(sdf[box].shape) / step, out=sdf[box])
    for centre_body, axes, axes_rotation in zip(
        shape.ellipsoid_centres, shape.ellipsoid_axes, shape.ellipsoid_rotations, strict=True
    ):
        centre = rotation @ centre_body
        box = _sub_box(centre / step, axes.max() / step + margin, half)
        if box is None:
            continue
        # world -> ellipsoid frame: the ellipsoid's axes in world are rotation @ axes_rotation
        local = (_box_points(box, half, step) - centre) @ (rotation @ axes_rotation)
        k0 = np.linalg.norm(local / axes, axis=1)
        k1 = np.linalg.norm(local / axes**2, axis=1)
        dist = np.where(k1 > 0, k0 * (k0 - 1.0) / np.maximum(k1, 1e-12), -axes.min())
        np.minimum(sdf[box], dist.reshape(sdf[box].shape) / step, out=sdf[box])
    for capsule in shape.capsules:
        a, b, radius = rotation @ capsule[0:3], rotation @ capsule[3:6], capsule[6]
        middle = (a + b) / 2.0
        box = _sub_box(middle / step, (np.linalg.norm(b - a) / 2.0 + radius) / step + margin, half)
        if box is None:
            continue
        points = _box_points(box, half, step)
        ab = b - a
        t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        dist = np.linalg.norm(points - a - t[:, None] * ab, axis=1) - radius
        np.minimum(sdf[box], dist.reshape(sdf[box].shape) / step, out=sdf[box])
    profile = None
    if len(shape.shells):
        points = _box_points((slice(0, edge),) * 3, half, step)
        body = points @ rotation
        sdf = np.minimum(sdf, (shape.sdf(body) / step).reshape(sdf.shape))
        profile = shape.profile(body).reshape(sdf.shape)
    return sdf, profile


def render(
    particle_class: ParticleClass,
    angles_zxz: tuple[float, float, float] = (0.0, 0.0, 0.0),
    voxel_size_nm: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a particle centred on the middle voxel of a cube.

    Returns (density float32 [z, y, x], mask bool) of edge 2 * box_half_size + 1;
    density is `contrast * fraction * profile`, mask is fraction >= 0.5 (sdf <= 0).
    """
    if voxel_size_nm <= 0:
        raise VPDetectError(f"voxel size must be positive, got {voxel_size_nm} nm")
    shape = particle_class.shape
    half = box_half_size(shape, voxel_size_nm)
    signed, profile = sdf_on_grid(shape, euler_zxz_matrix(*angles_zxz), half, voxel_size_nm)
    fraction = np.clip(0.5 - signed, 0.0, 1.0)
    density = particle_class.contrast * fraction
    if profile is not None:
        density *= profile
    return density.astype(np.float32), signed <= 0.0


@functools.lru_cache(maxsize=64)
def shape_geometry(shape: Shape, step_nm: float = 0.4) -> dict:
    """Volume (nm^3), surface area (nm^2), sphericity and effective radius 3V/A (nm),
    measured on a fine grid with marching cubes (paper eqs. 1-2)."""
    from skimage.measure import marching_cubes, mesh_surface_area

    half = int(np.ceil(shape.bounding_radius / step_nm)) + 2
    sdf, _ = sdf_on_grid(shape, np.eye(3), half, step_nm)
    sdf = np.minimum(sdf, 2.0)  # marching cubes needs finite values; only the zero level matters
    verts, faces, _, _ = marching_cubes(sdf, level=0.0, spacing=(step_nm,) * 3)
    area = float(mesh_surface_area(verts, faces))
    volume = float(np.count_nonzero(sdf <= 0)) * step_nm**3
    return {
        "volume_nm3": volume,
        "area_nm2": area,
        "sphericity": float(np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area),
        "effective_radius_nm": 3.0 * volume / area,
    }
