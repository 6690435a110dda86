"""Input normalisation and contrast, shared by training and inference.

Every tomogram is brought to a common scale before it meets a network, and
models record how ("zscore" or "robust") so inference normalises exactly as
training did:
- zscore: (x - mean) / std.
- robust: (x - median) / (1.4826 MAD), clipped to +-ROBUST_CLIP. Gold beads,
  carbon and hot pixels inflate a standard deviation (so particles look faint
  at low SNR) and feed the network values it never saw; the median and the
  median absolute deviation ignore them, and the clip bounds what is left.
Statistics are read block by block (a bounded number of voxels in float64;
a memory-mapped volume is never copied whole); the robust ones from a strided sample of at most ROBUST_SAMPLES voxels.

Contrast: models also record the sign of particle contrast they expect
("dark": dense matter below the background, as reconstructed; "bright":
contrast-inverted). A tomogram of the other sign is negated, which folds into
the scale (a negative std). `detect_contrast` tells the sign from the
skewness of band-passed copies: particles are sparse compact blobs of one
sign, noise is symmetric.
"""

from __future__ import annotations

import numpy as np

from vpdetect.errors import VPDetectError

NORMALISATION = "zscore"  # what a model card without the field means (version 0.1 models)
NORMALISATIONS = ("zscore", "robust")
CONTRASTS = ("dark", "bright")
MODEL_CONTRAST = "dark"  # what vpdetect trains its models to expect (bright data are negated)
ROBUST_CLIP = 5.0
ROBUST_SAMPLES = 4_000_000
MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
# Band-pass scales (voxels, at the model's voxel size) for contrast detection:
# DoG sigma pairs spanning particles of about 2.5 to 15 nm at 1 nm voxels.
CONTRAST_SIGMAS = ((1.0, 2.0), (2.0, 4.0))
CONTRAST_CROP = (64, 192, 192)  # z, y, x: the central region read for detection


# Voxels converted to float64 at a time while summing statistics (32 MB), however large the
# tomogram's planes are: a 4k x 4k tomogram in 32-plane float64 slabs needed ~8 GB at once.
STATS_BLOCK_VOXELS = 1 << 22


def volume_stats(volume: np.ndarray, block_voxels: int = STATS_BLOCK_VOXELS) -> tuple[float, float]:
    """Mean and standard deviation in float64, checking for NaN/Inf block by block.

    Reads whole planes (in the file's own dtype) as far as `block_voxels` allows and
    converts `block_voxels` at a time; sums are taken about the first block's mean, so
    a large offset (uint16 data) does not cancel the variance away.
    """
    shape = tuple(volume.shape)
    plane = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows = max(1, int(block_voxels) // max(1, plane))
    shift = None
    total = total_sq = 0.0
    count = 0
    for z0 in range(0, shape[0] if shape else 0, rows):
        flat = np.asarray(volume[z0 : z0 + rows]).reshape(-1)
        for start in range(0, flat.size, block_voxels):
            block = flat[start : start + block_voxels].astype(np.float64)
            if not np.all(np.isfinite(block)):
                raise VPDetectError("tomogram contains NaN or infinite values")
            if shift is None:
                shift = float(block.mean()) if block.size else 0.0
            block -= shift
            total += float(block.sum())
            total_sq += float(np.dot(block, block))
            count += block.size
    if count == 0:
        raise VPDetectError("tomogram is empty")
    centred = total / count
    var = max(total_sq / count - centred * centred, 0.0)
    return shift + centred, float(np.sqrt(var))


def zscore_params(volume: np.ndarray) -> tuple[float, float]:
    """(mean, std) for z-score normalisation; a constant volume is refused."""
    mean, std = volume_stats(volume)
    if std <= 1e-12 * max(1.0, abs(mean)):
        raise VPDetectError("tomogram has constant value (zero variance): nothing to detect")
    return mean, std


def streamed_zscore_params(volume: np.ndarray) -> tuple[float, float]:
    """`zscore_params` of a whole tomogram read once in z order, releasing the pages of a
    memory-mapped file as the sweep passes: a tomogram larger than memory costs a few blocks."""
    from vpdetect.localize.tiling import PageReleasingVolume

    streamed = PageReleasingVolume(volume)
    try:
        return zscore_params(streamed)
    finally:
        streamed.release()


def robust_params(volume: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 MAD) for robust normalisation; checks the whole volume like zscore_params.

    Falls back to the standard deviation where more than half the voxels share
    one value (MAD = 0), e.g. a masked tomogram with a constant background.
    """
    _, std = zscore_params(volume)
    return robust_from_sample(volume, std)


def robust_from_sample(volume: np.ndarray, std: float) -> tuple[float, float]:
    """(median, 1.4826 MAD) of a strided sample; `std` (already checked) is the fallback scale."""
    sample = strided_sample(volume, ROBUST_SAMPLES)
    median = float(np.median(sample))
    mad = float(np.median(np.abs(sample - median))) * MAD_TO_STD
    return median, (mad if mad > 1e-6 * std else std)


def strided_sample(volume: np.ndarray, max_voxels: int) -> np.ndarray:
    """Every s-th voxel along each axis (float64, flat), s the smallest stride giving <= max_voxels."""
    stride = max(1, int(np.ceil((volume.size / max_voxels) ** (1.0 / 3.0))))
    while np.prod([int(np.ceil(n / stride)) for n in volume.shape]) > max_voxels:
        stride += 1
    return np.asarray(volume[::stride, ::stride, ::stride], dtype=np.float64).ravel()


def normalisation_params(volume: np.ndarray, method: str) -> tuple[float, float]:
    """(centre, scale) of `method` ("zscore" or "robust")."""
    if method == "zscore":
        return zscore_params(volume)
    if method == "robust":
        return robust_params(volume)
    raise VPDetectError(f"unknown input normalisation {method!r} (known: {', '.join(NORMALISATIONS)})")


def clip_of(method: str) -> float | None:
    """The clip applied after normalising with `method` (None: no clip)."""
    return ROBUST_CLIP if method == "robust" else None


def normalise(volume: np.ndarray, mean: float, std: float, clip: float | None = None) -> np.ndarray:
    """(volume - mean) / std as float32, clipped to +-clip if given (use on crops or slabs,
    not whole mmaps). A negative std also flips the contrast."""
    out = ((np.asarray(volume, dtype=np.float32) - np.float32(mean)) / np.float32(std)).astype(
        np.float32, copy=False
    )
    if clip is not None:
        np.clip(out, -clip, clip, out=out)
    return out


def contrast_score(volume: np.ndarray) -> float:
    """Evidence that particles are dark: minus the mean skewness of DoG band-passes of the
    volume's central region (positive: dark particles, negative: bright)."""
    from scipy import ndimage

    starts = [max(0, (n - c) // 2) for n, c in zip(volume.shape, CONTRAST_CROP, strict=True)]
    region = tuple(slice(s, s + c) for s, c in zip(starts, CONTRAST_CROP, strict=True))
    block = np.asarray(volume[region], dtype=np.float32)
    centre, scale = robust_params(block)
    block = normalise(block, centre, scale, clip=3.0 * ROBUST_CLIP)
    skews = []
    for small, large in CONTRAST_SIGMAS:
        band = ndimage.gaussian_filter(block, small) - ndimage.gaussian_filter(block, large)
        band = band.astype(np.float64) - band.mean()
        var = float(np.mean(band**2))
        skews.append(float(np.mean(band**3)) / var**1.5 if var > 0 else 0.0)
    return -float(np.mean(skews))


def detect_contrast(volume: np.ndarray) -> tuple[str, float]:
    """("dark" or "bright", score) of a tomogram; see `contrast_score`."""
    score = contrast_score(volume)
    return ("dark" if score >= 0 else "bright"), score


def contrast_sign(found: str, expected: str) -> float:
    """+1 when a tomogram's contrast is what the model expects, -1 when it must be negated."""
    for name in (found, expected):
        if name not in CONTRASTS:
            raise VPDetectError(f"contrast must be dark or bright, got {name!r}")
    return 1.0 if found == expected else -1.0
