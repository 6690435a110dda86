"""Amplitude-spectrum matching: a tomogram filtered to look like a model's training data.

Tomograms differ in how their power falls off with spatial frequency (CTF
envelope and defocus, back-projection filter, denoising, dose). The way
membrain-seg and DeePiCt bring a user's tomogram closer to their training data
is a radial filter: the ratio of the training data's radially averaged
Fourier amplitude to the tomogram's own, applied in Fourier space. vpdetect
records the reference in the model card (`spectrum_reference`: the mean
profile of the training tomograms as the model sees them, each profile scaled
to unit RMS, so intensity units do not matter) and applies the filter when
asked (`--match-spectrum`, or `match_spectrum: true` in the card).

Profiles are measured on a central crop of at most PROFILE_CROP voxels per
axis, clipped at ROBUST_CLIP robust standard deviations (median / MAD) as the
robust normalisation clips (gold beads would otherwise own the spectrum),
mean removed and tapered by a Hann window (the box edges would otherwise add a
cross of power along the axes), in SHELLS shells of spatial frequency from 0 to
Nyquist (0.5 cycles/voxel). The tomogram is clipped the same way before it is
filtered (a bead's extreme values would ring across its neighbourhood). The
filter gain is interpolated linearly between shell centres, held beyond
Nyquist (the corners of the Fourier cube) and capped at MAX_GAIN. The default
cap is 1: frequencies where the tomogram holds relatively more than the
training data (after the unit-RMS scaling) are turned down, none is raised
(raising frequencies the tomogram barely holds amplifies noise; measured in
`benchmarks/bench_preprocess.py`). The zero frequency keeps gain 1: the mean
is the normaliser's business.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.preprocess import ROBUST_CLIP, robust_params

SHELLS = 32
PROFILE_CROP = 128
MAX_GAIN = 1.0


def frequency_radius(shape: tuple[int, int, int], real_last: bool) -> np.ndarray:
    """|k| in cycles/voxel for every coefficient of an (r)fftn of `shape` (float32)."""
    axes = [np.fft.fftfreq(n).astype(np.float32) for n in shape[:-1]]
    last = np.fft.rfftfreq(shape[-1]) if real_last else np.fft.fftfreq(shape[-1])
    fz, fy, fx = np.meshgrid(*axes, last.astype(np.float32), indexing="ij", sparse=True)
    return np.sqrt(fz * fz + fy * fy + fx * fx)


def shell_centres(shells: int = SHELLS) -> np.ndarray:
    """Spatial frequency (cycles/voxel) at the centre of each shell."""
    return (np.arange(shells) + 0.5) * (0.5 / shells)


def radial_profile(volume: np.ndarray, shells: int = SHELLS, crop: int = PROFILE_CROP) -> np.ndarray:
    """Mean Fourier amplitude per frequency shell of `volume`'s central crop, scaled to unit RMS."""
    if volume.ndim != 3 or min(volume.shape) < 4:
        raise VPDetectError(f"a spectrum needs a 3D volume of at least 4 voxels per axis, got {volume.shape}")
    starts = [max(0, (n - crop) // 2) for n in volume.shape]
    block = np.asarray(volume[tuple(slice(s, s + crop) for s in starts)], dtype=np.float64)
    # Clipped as the robust normalisation clips: gold beads (tens of times a protein's
    # contrast) would otherwise own the spectrum, and matching would turn down the band the
    # particles live in.
    centre, scale = robust_params(block)
    block = np.clip(block, centre - ROBUST_CLIP * scale, centre + ROBUST_CLIP * scale)
    block = block - block.mean()
    for axis, n in enumerate(block.shape):
        shape = [1, 1, 1]
        shape[axis] = n
        block = block * np.hanning(n + 2)[1:-1].reshape(shape)
    amplitude = np.abs(np.fft.rfftn(block))
    radius = frequency_radius(block.shape, real_last=True)
    index = np.floor(radius / (0.5 / shells)).astype(np.int64)
    inside = (index < shells) & (radius > 0)
    sums = np.bincount(index[inside], weights=amplitude[inside], minlength=shells)
    counts = np.bincount(index[inside], minlength=shells)
    profile = sums / np.maximum(counts, 1)
    empty = counts == 0  # shells thinner than a small crop's frequency spacing
    if empty.any():
        centres = shell_centres(shells)
        profile[empty] = np.interp(centres[empty], centres[~empty], profile[~empty])
    rms = float(np.sqrt(np.mean(profile**2)))
    if not np.isfinite(rms) or rms == 0:
        raise VPDetectError("the volume is constant: it has no spectrum to match")
    return profile / rms


def reference_profile(volumes: Sequence[np.ndarray], shells: int = SHELLS) -> list[float]:
    """The mean unit-RMS profile of `volumes` (what a model card records as its reference)."""
    if not volumes:
        raise VPDetectError("a reference spectrum needs at least one volume")
    profile = np.mean([radial_profile(v, shells) for v in volumes], axis=0)
    return [round(float(p), 6) for p in profile]


def matching_gain(profile: np.ndarray, reference: Sequence[float], max_gain: float = MAX_GAIN) -> np.ndarray:
    """Gain per shell that turns `profile` into `reference` (capped at `max_gain`)."""
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != profile.shape or not np.all(np.isfinite(reference)) or np.any(reference < 0):
        raise VPDetectError(f"spectrum reference must be {profile.size} non-negative numbers")
    gain = reference / np.maximum(profile, 1e-12)
    return np.minimum(gain, max_gain)


def match_spectrum(volume: np.ndarray, reference: Sequence[float], max_gain: float = MAX_GAIN) -> np.ndarray:
    """`volume`, clipped at ROBUST_CLIP robust standard deviations, filtered so that its radial
    amplitude profile follows `reference` (float32, in memory).

    One whole-volume real FFT: memory about three times the volume in float32."""
    from scipy import fft

    # Read once (a lazy background-subtracted view computes its background per read).
    data = np.array(volume, dtype=np.float32)
    shells = len(reference)
    gain = matching_gain(radial_profile(data, shells), reference, max_gain)
    # Filtered clipped, as the network sees it after the robust normalisation: a gold bead's
    # extreme values would otherwise ring across its neighbourhood.
    centre, scale = robust_params(data)
    np.clip(data, centre - ROBUST_CLIP * scale, centre + ROBUST_CLIP * scale, out=data)
    spectrum = fft.rfftn(data)
    radius = frequency_radius(data.shape, real_last=True)
    factor = np.interp(radius, shell_centres(shells), gain).astype(np.float32)  # held beyond the end centres
    factor[radius == 0] = 1.0
    spectrum *= factor
    return fft.irfftn(spectrum, s=data.shape).astype(np.float32, copy=False)
