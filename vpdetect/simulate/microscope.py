"""Single-axis tilt series imaging and weighted back-projection.

Geometry: the tilt axis is the volume's y axis (through the centre of the
x-z plane, ((nx - 1) / 2, (nz - 1) / 2)). A projection at tilt angle theta
integrates the density along the beam direction (-sin theta, 0, cos theta);
the detector coordinate of voxel (x, y, z) is
    u = (x - cx) cos(theta) + (z - cz) sin(theta) + (nu - 1) / 2,  v = y,
with a detector as wide as the volume (nu = nx). Every y-slice across the
axis is therefore the same 2D parallel-beam problem, so one sparse matrix B
(rows: voxels (z, x); columns: detector bins (tilt, u); linear interpolation,
two entries per voxel and tilt) serves all slices at once: projection is
B^T F and back-projection is B G, where F and G hold one column per y-slice.
B is the exact adjoint of the projector, and is built once per geometry.

Imaging per tilt: the projection is attenuated by inelastic scattering in the
ice (thicker at high tilt), multiplied by the contrast transfer function (CTF;
phase and amplitude contrast, spherical aberration, a Gaussian envelope) and
shifted by a small random misalignment; then white noise is added, with
variance rising as the transmitted dose falls. The tilt series is not CTF
corrected and not re-aligned, as in SHREC'21: underfocus makes dense
particles dark. Reconstruction is weighted back-projection (ramp filter along
u, weighted by each tilt's angular step). Noise is scaled so that the
reconstruction has the requested SNR in the SHREC sense,
SNR = var(signal) / var(noise), both measured over the whole tomogram.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vpdetect.errors import VPDetectError

# Inelastic mean free path of 300 kV electrons in vitreous ice (nm).
ICE_MEAN_FREE_PATH_NM = 350.0
# y-slices reconstructed separately from signal and noise to set and measure the SNR.
SNR_SAMPLE_SLICES = 24
Y_CHUNK = 32
# Windows on the ramp filter of weighted back-projection (f = |k| / Nyquist):
# ramp 1, shepp-logan sinc(f/2), cosine cos(pi f/2), hann (1 + cos(pi f))/2.
RECONSTRUCTION_FILTERS = ("ramp", "shepp-logan", "cosine", "hann")


@dataclass(frozen=True)
class MicroscopeParams:
    """Acquisition and reconstruction settings of one tilt series."""

    tilt_min: float = -60.0
    tilt_max: float = 60.0
    tilt_step: float = 2.0
    defocus_um: float = 3.5  # underfocus, positive
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    b_factor_nm2: float = 4.0  # Gaussian envelope exp(-B k^2 / 4)
    snr: float | None = 0.5  # None = noise-free
    max_shift_nm: float = 1.0  # projection shifts uniform in [-max, max] along u and v
    ctf: bool = True
    ice_attenuation: bool = True
    recon_filter: str = "ramp"  # one of RECONSTRUCTION_FILTERS

    def validate(self) -> None:
        if not (-90.0 < self.tilt_min < self.tilt_max < 90.0) and not (
            self.tilt_min == self.tilt_max and abs(self.tilt_min) < 90.0
        ):
            raise VPDetectError(
                f"tilt range {self.tilt_min:g}..{self.tilt_max:g} degrees is impossible: "
                "it must lie strictly inside -90..90 with min <= max"
            )
        if self.tilt_step <= 0:
            raise VPDetectError(f"tilt step must be positive, got {self.tilt_step:g} degrees")
        if self.defocus_um <= 0:
            raise VPDetectError(f"defocus must be positive (underfocus, micrometres), got {self.defocus_um:g}")
        if self.voltage_kv <= 0 or self.cs_mm < 0:
            raise VPDetectError("voltage must be positive and spherical aberration non-negative")
        if not 0.0 <= self.amplitude_contrast < 1.0:
            raise VPDetectError(f"amplitude contrast must be in [0, 1), got {self.amplitude_contrast:g}")
        if self.b_factor_nm2 < 0 or self.max_shift_nm < 0:
            raise VPDetectError("B-factor and projection shifts must be non-negative")
        if self.recon_filter not in RECONSTRUCTION_FILTERS:
            raise VPDetectError(
                f"unknown reconstruction filter {self.recon_filter!r} (known: {', '.join(RECONSTRUCTION_FILTERS)})"
            )
        if self.snr is not None and not (self.snr > 0 and np.isfinite(self.snr)):
            raise VPDetectError(f"SNR must be a positive number, got {self.snr}")


def tilt_angles(tilt_min: float, tilt_max: float, tilt_step: float) -> np.ndarray:
    """Tilt angles in degrees from min to max inclusive (max included when on the grid)."""
    n = int(np.floor((tilt_max - tilt_min) / tilt_step + 1e-6)) + 1
    return np.round(tilt_min + tilt_step * np.arange(n), 6)


def electron_wavelength_nm(voltage_kv: float) -> float:
    """Relativistic electron wavelength (nm) at an acceleration voltage in kV."""
    volts = voltage_kv * 1e3
    return 1.226426 / np.sqrt(volts * (1.0 + 0.97845e-6 * volts))  # 1.226 nm V^0.5 / sqrt(V*)


def ctf_2d(shape: tuple[int, int], pixel_nm: float, params: MicroscopeParams) -> np.ndarray:
    """The CTF on an rfft2 grid of an image of `shape` (v, u).

    CTF(k) = -(sqrt(1 - A^2) sin chi + A cos chi) * exp(-B k^2 / 4),
    chi = pi lambda df k^2 - pi/2 Cs lambda^3 k^4, df > 0 underfocus.
    """
    wavelength = electron_wavelength_nm(params.voltage_kv)
    kv = np.fft.fftfreq(shape[0], d=pixel_nm)[:, None]
    ku = np.fft.rfftfreq(shape[1], d=pixel_nm)[None, :]
    k2 = kv**2 + ku**2
    defocus_nm = params.defocus_um * 1e3
    cs_nm = params.cs_mm * 1e6
    chi = np.pi * wavelength * defocus_nm * k2 - 0.5 * np.pi * cs_nm * wavelength**3 * k2**2
    amplitude = params.amplitude_contrast
    ctf = -(np.sqrt(1.0 - amplitude**2) * np.sin(chi) + amplitude * np.cos(chi))
    return ctf * np.exp(-params.b_factor_nm2 * k2 / 4.0)


def build_backprojector(nx: int, nz: int, angles_deg: np.ndarray, z_range: tuple[int, int] | None = None):
    """Sparse back-projection matrix B (CSR, float32) for one x-z slice.

    Rows are the voxels (z, x) with z in z_range (default: all), row index
    (z - z0) * nx + x; columns are detector bins t * nx + u. B.T is the
    linear-interpolation (voxel-driven) projector of the same slab.
    """
    from scipy import sparse

    z0, z1 = z_range if z_range is not None else (0, nz)
    n_tilts = len(angles_deg)
    n_u = nx
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    xc = np.arange(nx, dtype=np.float64) - (nx - 1) / 2.0
    zc = np.arange(z0, z1, dtype=np.float64) - (nz - 1) / 2.0
    n_rows = (z1 - z0) * nx
    indices = np.empty((n_rows, n_tilts, 2), dtype=np.int32)
    data = np.empty((n_rows, n_tilts, 2), dtype=np.float32)
    for t in range(n_tilts):
        u = (zc[:, None] * np.sin(theta[t]) + xc[None, :] * np.cos(theta[t])).ravel() + (n_u - 1) / 2.0
        left = np.floor(u)
        weight_right = u - left
        left = left.astype(np.int64)
        for side, (bins, weight) in enumerate(((left, 1.0 - weight_right), (left + 1, weight_right))):
            inside = (bins >= 0) & (bins < n_u)
            # keep two entries per row and tilt; bins off the detector get weight 0
            indices[:, t, side] = t * n_u + np.clip(bins, 0, n_u - 1)
            data[:, t, side] = np.where(inside, weight, 0.0)
    indptr = np.arange(0, n_rows * n_tilts * 2 + 1, n_tilts * 2, dtype=np.int64)
    matrix = sparse.csr_matrix(
        (data.ravel(), indices.ravel(), indptr), shape=(n_rows, n_tilts * n_u)
    )
    matrix.has_sorted_indices = False
    return matrix


def project(slab: np.ndarray, backprojector, n_tilts: int) -> np.ndarray:
    """Project a [z, y, x] block (the rows of `backprojector`) to [tilt, y, u] images."""
    nz, ny, nx = slab.shape
    projector = backprojector.T.tocsr()
    images = np.empty((n_tilts, ny, nx), dtype=np.float32)
    for y0 in range(0, ny, Y_CHUNK):
        y1 = min(y0 + Y_CHUNK, ny)
        columns = np.ascontiguousarray(slab[:, y0:y1, :].transpose(0, 2, 1)).reshape(nz * nx, y1 - y0)
        lines = projector @ columns  # (tilt * u, y)
        images[:, y0:y1, :] = lines.reshape(n_tilts, nx, y1 - y0).transpose(0, 2, 1)
    return images


def filter_window(size: int, name: str) -> np.ndarray:
    """The apodisation window of a reconstruction filter on an rfft grid of `size` samples."""
    f = np.fft.rfftfreq(size) * 2.0  # |k| / Nyquist in [0, 1]
    if name == "ramp":
        return np.ones_like(f)
    if name == "shepp-logan":
        return np.sinc(f / 2.0)
    if name == "cosine":
        return np.cos(np.pi * f / 2.0)
    if name == "hann":
        return 0.5 * (1.0 + np.cos(np.pi * f))
    raise VPDetectError(f"unknown reconstruction filter {name!r}")


def ramp_filter(images: np.ndarray, angles_deg: np.ndarray, window: str = "ramp") -> np.ndarray:
    """Weight projections [tilt, v, u] for back-projection.

    The ramp |k| along u comes from the discrete spatial ramp kernel
    h(0) = 1/4, h(n odd) = -1/(pi n)^2 (exact on a sampled grid, no DC bias),
    applied with zero padding; each tilt is also weighted by its angular step.
    """
    n_u = images.shape[-1]
    size = 1 << int(np.ceil(np.log2(2 * n_u)))
    n = np.concatenate([np.arange(0, size // 2 + 1), np.arange(-(size // 2) + 1, 0)])
    kernel = np.zeros(size)
    kernel[0] = 0.25
    odd = n % 2 == 1
    kernel[odd] = -1.0 / (np.pi * n[odd]) ** 2
    response = np.real(np.fft.rfft(kernel)) * filter_window(size, window)
    steps = np.deg2rad(np.gradient(np.asarray(angles_deg, dtype=np.float64))) if len(angles_deg) > 1 else np.ones(1)
    spectrum = np.fft.rfft(images, n=size, axis=-1)
    spectrum *= response[None, None, :]
    spectrum *= steps[:, None, None]
    return np.fft.irfft(spectrum, n=size, axis=-1)[..., :n_u].astype(np.float32)


def backproject(
    filtered: np.ndarray,
    backprojector,
    nz: int,
    y_indices: np.ndarray | None = None,
    out: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Back-project filtered images [tilt, y, u] into [z, y, x] (only y_indices if given)."""
    n_tilts, ny, nx = filtered.shape
    ys = np.arange(ny) if y_indices is None else np.asarray(y_indices)
    if out is None:
        out = np.empty((nz, len(ys), nx), dtype=np.float32)
    for start in range(0, len(ys), Y_CHUNK):
        chunk = ys[start : start + Y_CHUNK]
        lines = np.ascontiguousarray(filtered[:, chunk, :].transpose(0, 2, 1)).reshape(n_tilts * nx, len(chunk))
        voxels = backprojector @ lines  # (z * x, y)
        out[:, start : start + len(chunk), :] = voxels.reshape(nz, nx, len(chunk)).transpose(0, 2, 1)
        if progress is not None:
            progress(min(start + Y_CHUNK, len(ys)), len(ys))
    return out


def _apply_ctf_and_shift(images: np.ndarray, pixel_nm: float, params: MicroscopeParams, shifts_nm: np.ndarray) -> np.ndarray:
    """CTF and sub-pixel shift of every tilt image, in one zero-padded 2D FFT."""
    n_tilts, nv, nu = images.shape
    pad = 32  # keeps the CTF's ringing from wrapping around the image edges
    shape = (nv + 2 * pad, nu + 2 * pad)
    ctf = ctf_2d(shape, pixel_nm, params) if params.ctf else np.ones((shape[0], shape[1] // 2 + 1))
    kv = np.fft.fftfreq(shape[0], d=pixel_nm)[:, None]
    ku = np.fft.rfftfreq(shape[1], d=pixel_nm)[None, :]
    out = np.empty_like(images)
    for t in range(n_tilts):
        padded = np.zeros(shape, dtype=np.float64)
        padded[pad : pad + nv, pad : pad + nu] = images[t]
        phase = np.exp(-2j * np.pi * (ku * shifts_nm[t, 0] + kv * shifts_nm[t, 1]))
        result = np.fft.irfft2(np.fft.rfft2(padded) * ctf * phase, s=shape)
        out[t] = result[pad : pad + nv, pad : pad + nu]
    return out


def image_and_reconstruct(
    density: np.ndarray,
    slab: tuple[int, int],
    params: MicroscopeParams,
    rng: np.random.Generator,
    voxel_size_nm: float = 1.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[np.ndarray, dict]:
    """Image the density [z, y, x] (zero outside z in [slab)) and reconstruct it by WBP.

    Returns the reconstruction (float32, zero mean, unit variance; dark
    particles) and a record of the acquisition (angles, shifts, noise level and
    the SNR measured by the SHREC definition).
    """
    params.validate()
    nz, ny, nx = density.shape
    angles = tilt_angles(params.tilt_min, params.tilt_max, params.tilt_step)
    n_tilts = len(angles)
    report = progress or (lambda stage, done, total: None)

    report("projector", 0, 1)
    backprojector = build_backprojector(nx, nz, angles)
    z0, z1 = slab
    slab_rows = backprojector[z0 * nx : z1 * nx]
    report("projecting", 0, 1)
    images = project(density[z0:z1], slab_rows, n_tilts)
    del slab_rows

    shifts = rng.uniform(-params.max_shift_nm, params.max_shift_nm, size=(n_tilts, 2))
    thickness_nm = (z1 - z0) * voxel_size_nm
    cos_t = np.cos(np.deg2rad(angles))
    transmission = np.exp(-thickness_nm / (ICE_MEAN_FREE_PATH_NM * cos_t)) if params.ice_attenuation else np.ones(n_tilts)
    images *= transmission[:, None, None].astype(np.float32)
    images = _apply_ctf_and_shift(images, voxel_size_nm, params, shifts)
    # shot noise: relative noise grows as the transmitted dose per tilt falls
    noise_sd = 1.0 / np.sqrt(transmission)
    noise = (rng.standard_normal(images.shape, dtype=np.float32) * noise_sd[:, None, None]).astype(np.float32)

    report("filtering", 0, 1)
    signal_filtered = ramp_filter(images, angles, params.recon_filter)
    del images
    noise_filtered = ramp_filter(noise, angles, params.recon_filter)
    del noise

    # Signal and noise reconstructed separately on a sample of y-slices (WBP is
    # linear) give the noise scale for the requested SNR.
    sample = np.unique(np.linspace(0, ny - 1, min(SNR_SAMPLE_SLICES, ny)).round().astype(int))
    signal_var = float(np.var(backproject(signal_filtered, backprojector, nz, sample), dtype=np.float64))
    noise_var_unit = float(np.var(backproject(noise_filtered, backprojector, nz, sample), dtype=np.float64))
    if params.snr is None:
        noise_scale = 0.0
    else:
        if signal_var <= 0:
            raise VPDetectError("the scene has no signal to image: no particles were placed")
        noise_scale = float(np.sqrt(signal_var / (params.snr * noise_var_unit)))
    combined = signal_filtered
    combined += np.float32(noise_scale) * noise_filtered
    del noise_filtered

    reconstruction = np.empty((nz, ny, nx), dtype=np.float32)
    backproject(combined, backprojector, nz, out=reconstruction,
                progress=lambda done, total: report("back-projecting", done, total))
    del combined, backprojector

    mean = float(np.mean(reconstruction, dtype=np.float64))
    std = float(np.std(reconstruction, dtype=np.float64))
    noise_var = noise_scale**2 * noise_var_unit
    measured_snr = None if noise_var == 0 else (std**2 - noise_var) / noise_var
    if std > 0:
        reconstruction -= np.float32(mean)
        reconstruction /= np.float32(std)
    record = {
        "tilt_axis": "y",
        "tilt_angles_deg": [float(a) for a in angles],
        "projection_shifts_nm": [[round(float(u), 4), round(float(v), 4)] for u, v in shifts],
        "ice_transmission": [round(float(t), 5) for t in transmission],
        "noise_scale": noise_scale,
        "snr_target": params.snr,
        "snr_measured": measured_snr,
        "reconstruction_scale": {"mean_subtracted": mean, "std_divided": std},
    }
    return reconstruction, record
