"""Euler-angle conventions, converted through scipy's Rotation.

vpdetect's angles (SHREC convention, columns phi/theta/psi) are ZXZ in degrees and
describe the active rotation R = Rz(phi) Rx(theta) Rz(psi) that turns the reference
structure into its pose in the tomogram (x, y, z axes of the tomogram, right-handed,
counter-clockwise positive): scipy's intrinsic "ZXZ".

RELION's rot/tilt/psi give A = Euler_angles2matrix(rot, tilt, psi), which equals
(Rz(rot) Ry(tilt) Rz(psi))^T (RELION's passive form; checked against
src/jaz/math/Euler_angles_relion.h anglesToMatrix3, the same matrix as
src/euler.cpp). ParticleSet::getMatrix4x4 (src/jaz/tomography/particle_set.cpp)
"maps coordinates from particle space to tomogram space" with A, so A is our R.
Hence R = inverse of scipy's intrinsic "ZYZ" of (rot, tilt, psi).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial.transform import Rotation


def _rotation(seq: str, a, b, c) -> tuple[Rotation, tuple[int, ...]]:
    a, b, c = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (a, b, c)))
    angles = np.stack([a.ravel(), b.ravel(), c.ravel()], axis=-1)
    return Rotation.from_euler(seq, angles, degrees=True), a.shape


def _angles(rotation: Rotation, seq: str, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        # At gimbal lock (middle angle 0 or 180) scipy sets the third angle to 0 and warns;
        # the rotation is still represented exactly.
        warnings.filterwarnings("ignore", message=".*[Gg]imbal lock.*")
        angles = rotation.as_euler(seq, degrees=True)
    return tuple(angles[:, i].reshape(shape) for i in range(3))  # type: ignore[return-value]


def _inverse_angles(seq_in: str, seq_out: str, a, b, c) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Angles in `seq_out` of the inverse of the rotation with angles a, b, c in `seq_in`."""
    rotation, shape = _rotation(seq_in, a, b, c)
    return _angles(rotation.inv(), seq_out, shape)


def zxz_matrix(phi, theta, psi) -> np.ndarray:
    """Active rotation matrices Rz(phi) Rx(theta) Rz(psi) for angles in degrees, shape (..., 3, 3)."""
    rotation, shape = _rotation("ZXZ", phi, theta, psi)
    return rotation.as_matrix().reshape(*shape, 3, 3)


def relion_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's A = Euler_angles2matrix(rot, tilt, psi) = (Rz(rot) Ry(tilt) Rz(psi))^T."""
    rotation, shape = _rotation("ZYZ", rot, tilt, psi)
    return rotation.inv().as_matrix().reshape(*shape, 3, 3)


def matrix_to_zxz(matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vpdetect ZXZ angles (degrees, theta in [0, 180]) of active rotation matrices (..., 3, 3)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    shape = matrix.shape[:-2]
    return _angles(Rotation.from_matrix(matrix.reshape(-1, 3, 3)), "ZXZ", shape)


def zxz_to_relion(phi, theta, psi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vpdetect ZXZ angles -> RELION (rot, tilt, psi) describing the same rotation."""
    return _inverse_angles("ZXZ", "ZYZ", phi, theta, psi)


def relion_to_zxz(rot, tilt, psi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION (rot, tilt, psi) -> vpdetect ZXZ angles describing the same rotation."""
    return _inverse_angles("ZYZ", "ZXZ", rot, tilt, psi)


# Dynamo's (tdrot, tilt, narot): dynamo_euler2matrix(tdrot, tilt, narot) is
# Rz(narot) Rx(tilt) Rz(tdrot) (scipy's extrinsic "zxz"), and like RELION's matrix it
# is the inverse of the active rotation, so phi, theta, psi = -tdrot, -tilt, -narot
# up to the choice among equivalent triplets.


def zxz_to_dynamo(phi, theta, psi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vpdetect ZXZ angles -> Dynamo (tdrot, tilt, narot) describing the same rotation."""
    return _inverse_angles("ZXZ", "zxz", phi, theta, psi)


def dynamo_to_zxz(tdrot, tilt, narot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dynamo (tdrot, tilt, narot) -> vpdetect ZXZ angles describing the same rotation."""
    return _inverse_angles("zxz", "ZXZ", tdrot, tilt, narot)
