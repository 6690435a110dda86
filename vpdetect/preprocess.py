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

Background: a localizer may also record `background_sigma` (voxels at its voxel
size; 0 or absent: none). The tomogram minus a smooth background (a Gaussian of
that sigma) is what it sees: an ice-thickness or density gradient, or the
halo of a carbon edge, then no longer inflates the scale nor hides particles
on one side. The background is taken on a grid binned by `background_bin`
(a Gaussian of sigma / bin there) and interpolated linearly, so a tomogram
larger than memory costs one binned copy; `BackgroundSubtracted` is the lazy
view that training crops and inference tiles are read from alike.

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


def background_bin(sigma: float) -> int:
    """Binning of the grid the background is computed on: about sigma / 2 voxels (at least 1),
    so the Gaussian spans 2 binned voxels and linear interpolation of it is smooth."""
    return max(1, int(sigma // 2))


def binned_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over `factor`^3 blocks (float32; partial blocks at the far faces average what they
    hold), reading `factor` planes of a (memory-mapped) volume at a time."""
    nz, ny, nx = volume.shape
    bz, by, bx = (-(-n // factor) for n in (nz, ny, nx))
    out = np.empty((bz, by, bx), dtype=np.float32)
    pad_y, pad_x = by * factor - ny, bx * factor - nx
    counts = np.pad(np.ones((ny, nx)), ((0, pad_y), (0, pad_x))).reshape(by, factor, bx, factor).sum(axis=(1, 3))
    for k in range(bz):
        slab = np.asarray(volume[k * factor : (k + 1) * factor], dtype=np.float64)
        sums = np.pad(slab, ((0, 0), (0, pad_y), (0, pad_x))).reshape(
            slab.shape[0], by, factor, bx, factor).sum(axis=(0, 2, 4))
        out[k] = sums / (counts * slab.shape[0])
    return out


def _interpolation_matrix(indices: np.ndarray, n_bins: int, factor: int) -> np.ndarray:
    """Rows of linear-interpolation weights from bin centres ((b + 0.5) * factor - 0.5) to the
    voxel `indices` (clamped at the outer centres): (len(indices), n_bins) float32."""
    position = np.clip((indices - (factor - 1) / 2.0) / factor, 0.0, n_bins - 1.0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n_bins - 1)
    weight = (position - low).astype(np.float32)
    matrix = np.zeros((len(indices), n_bins), dtype=np.float32)
    rows = np.arange(len(indices))
    np.add.at(matrix, (rows, low), 1.0 - weight)
    np.add.at(matrix, (rows, high), weight)
    return matrix


class BackgroundSubtracted:
    """A read-only float32 view of a [z, y, x] volume minus its smooth background.

    Indexing with slices (any steps) or integers returns an ndarray; a plain
    z range (`view[a:b]`) returns another lazy view, so tiled inference reads
    the source (possibly memory-mapped) block by block as before.
    """

    def __init__(self, volume: np.ndarray, sigma: float, _background=None, _z0: int = 0, _nz: int | None = None):
        from scipy import ndimage

        if sigma <= 0:
            raise VPDetectError(f"background sigma must be positive, got {sigma:g}")
        self.source = volume
        self.sigma = float(sigma)
        self.factor = background_bin(sigma)
        if _background is None:
            _background = ndimage.gaussian_filter(binned_mean(volume, self.factor), self.sigma / self.factor,
                                                  mode="nearest")
        self.background = _background
        self._z0 = _z0
        nz = volume.shape[0] - _z0 if _nz is None else _nz
        self.shape = (nz, *volume.shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = 3
        self.size = int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[:, :, :]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return BackgroundSubtracted(self.source, self.sigma, self.background, self._z0 + start,
                                        max(0, stop - start))
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (3 - len(key) + 1) + key[at + 1 :]
        key = key + (slice(None),) * (3 - len(key))
        if len(key) != 3 or not all(isinstance(k, (slice, int, np.integer)) for k in key) or any(
                isinstance(k, slice) and (k.step or 1) < 0 for k in key):
            raise TypeError(f"BackgroundSubtracted takes integers and forward slices, got {key!r}")
        indices = []
        for k, n in zip(key, self.shape, strict=True):
            indices.append(np.arange(n)[k] if isinstance(k, slice) else np.atleast_1d(np.arange(n)[k]))
        indices[0] = indices[0] + self._z0
        source_key = tuple(
            slice(int(i[0]), int(i[-1]) + 1, int(i[1] - i[0]) if len(i) > 1 else 1) if len(i) else slice(0, 0)
            for i in indices
        )
        block = np.asarray(self.source[source_key], dtype=np.float32)
        block = block.reshape(tuple(len(i) for i in indices)) - self._background_at(indices)
        squeeze = tuple(axis for axis, k in enumerate(key) if not isinstance(k, slice))
        return block.squeeze(axis=squeeze) if squeeze else block

    def _background_at(self, indices: list[np.ndarray]) -> np.ndarray:
        if any(len(i) == 0 for i in indices):
            return np.zeros(tuple(len(i) for i in indices), np.float32)
        weights, spans = [], []
        for axis_indices, n_bins in zip(indices, self.background.shape, strict=True):
            matrix = _interpolation_matrix(axis_indices, n_bins, self.factor)
            used = np.flatnonzero(matrix.any(axis=0))  # only the bins this block touches
            lo, hi = int(used[0]), int(used[-1]) + 1
            weights.append(matrix[:, lo:hi])
            spans.append(slice(lo, hi))
        wz, wy, wx = weights
        small = self.background[tuple(spans)]
        out = (wz @ small.reshape(small.shape[0], -1)).reshape(len(indices[0]), *small.shape[1:])
        return np.matmul(wy, out) @ wx.T


def subtract_background(volume: np.ndarray, sigma: float | None):
    """`volume` as a model with `background_sigma` = sigma sees it (the volume itself for 0/None)."""
    if not sigma:
        return volume
    return BackgroundSubtracted(volume, float(sigma))
