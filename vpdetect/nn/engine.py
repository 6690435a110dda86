"""Fast MSDNet inference: the same probabilities as `MSDNet.predict`, much sooner.

Use `fast_predict(model, x)` wherever `model.predict(x)` would be called for
inference (tiles, boxes): it picks the fastest path for the model's device and
keeps one engine (weights repacked, buffers preallocated) per model.

CPU path (float32, equal to `model.predict` within rounding). A dilated 3x3x3
convolution with one output channel is a poor fit for oneDNN (a few GFLOP/s
here), so each dense layer is rewritten as

1. one matrix multiply over the input channels giving all 27 taps of all `w`
   output channels at once: T (27*w, voxels) = W (27*w, C_in) @ B (C_in, voxels);
2. a 27-tap shifted add per output channel (its own dilation): the taps are
   read through one strided view of T, summed over x-taps, then y-taps, and
   the three z-tap sums are added into the output at their plane shifts.

Layout: the feature buffer B is channels-first (one row per map) and every
z-plane is stored with P = max dilation zero rows and zero columns after its
data (row pitch W+P, plane pitch (H+P)(W+P)). A shift by up to P voxels in
y or x then lands in those zeros instead of wrapping onto real data, so the
in-plane taps need no bounds at all. Z is not padded: z-taps are clipped.

Cache blocking: the multiply runs on slabs of a few z-planes (about 20k
columns, so T of a slab and the slab's inputs stay in cache) and the slab's
taps are scattered into a small accumulator at once; T never exists for the
whole volume. Threads: the z-range is split into chunks (two per thread) that
`threads` Python workers take in turn, each running single-threaded BLAS on
its own planes (torch releases the GIL inside ops), with a barrier per layer.
That beats per-op OpenMP threading, whose barrier in every small op is slow
when the cores are shared.

CUDA path: cuDNN `conv3d` through `model.predict`. `precision` None (default)
keeps the caller's autocast and cuDNN flags; else it is one of the CLI's
`--precision` names (`vpdetect.nn.precision`: auto, fp32, tf32, bf16, fp16),
resolved for the compute capability of the model's GPU and applied, with cuDNN
autotuning, for the duration of each call only. The CPU path is always float32
whatever `precision` says.
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from vpdetect.errors import VPDetectError
from vpdetect.nn.msdnet import NEGATIVE_SLOPE, MSDNet
from vpdetect.nn.precision import PRECISIONS as PRECISION_NAMES
from vpdetect.nn.precision import check_precision, inference_arithmetic, resolve_precision

# Columns (voxels incl. pitch padding) per matrix multiply: small enough that the
# tap outputs (27*w rows) and the inputs of a slab stay in L2/L3, large enough
# for an efficient multiply (measured on AVX-512: ~20k is the sweet spot).
SLAB_COLUMNS = 20_000
# Work units per thread and layer (see `_CpuPlan`).
CHUNKS_PER_THREAD = 2

PRECISIONS = (None, *PRECISION_NAMES)


class InferenceEngine:
    """Predicts like `model.predict(x)` with the fastest path for the model's device.

    The engine snapshots the model's weights when built (or when `refresh()`
    is called); `fast_predict` refreshes automatically when they change.
    `threads` (CPU) defaults to `torch.get_num_threads()` at predict time;
    `precision` (None = the caller's autocast, else a `vpdetect.nn.precision` name)
    applies on CUDA only.
    """

    def __init__(
        self,
        model: MSDNet,
        threads: int | None = None,
        precision: str | None = None,
        slab_columns: int = SLAB_COLUMNS,
    ) -> None:
        if threads is not None and threads < 1:
            raise VPDetectError(f"threads must be at least 1, got {threads}")
        # Weak, so that the per-model cache of `engine_for` does not keep models alive.
        self._model_ref = weakref.ref(model)
        self.threads = threads
        self.precision = _checked_precision(precision)
        self.slab_columns = int(slab_columns)
        self._plans: dict[tuple[int, int, int, int], _CpuPlan] = {}
        self._arithmetic = None  # (precision, device) -> Arithmetic, resolved on first use
        self.refresh()

    @property
    def model(self) -> MSDNet:
        model = self._model_ref()
        if model is None:
            raise VPDetectError("the network of this inference engine no longer exists")
        return model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def refresh(self) -> None:
        """Re-read the model's weights (after training or loading new ones)."""
        self._fingerprint = _weights_fingerprint(self.model)
        self._weights = _CpuWeights(self.model) if self.device.type == "cpu" else None
        self._plans.clear()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (N, n_classes, D, H, W), float32, on the model's device."""
        model = self.model
        if x.ndim != 5 or x.shape[1] != model.in_channels:
            raise VPDetectError(
                f"MSDNet expects input (N, {model.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        if self.device.type == "cuda":
            return self._predict_cuda(x)
        if self.device.type != "cpu":
            return model.predict(x.to(self.device))
        threads = self.threads or torch.get_num_threads()
        n, _, d, h, w = x.shape
        # Made outside inference mode (when the caller is) so callers may modify it, as
        # they may modify what `model.predict` returns.
        out = torch.empty((n, model.n_classes, d, h, w), dtype=torch.float32)
        # Inference mode is per thread: the workers enter it too (see `_in_worker`), so
        # buffers made here in either mode can always be updated in place.
        with torch.inference_mode():
            x = x.detach().to("cpu", torch.float32)
            plan = self._plan((d, h, w), threads)
            for sample in range(n):
                plan.run(x[sample], out[sample])
        return out

    def _plan(self, shape: tuple[int, int, int], threads: int) -> _CpuPlan:
        """The cached plan (buffers) for inputs of `shape`."""
        key = (*shape, threads)
        plan = self._plans.get(key)
        if plan is None:
            # Tiling reuses one tile shape; keep only the latest two (each holds a buffer).
            if len(self._plans) >= 2:
                self._plans.pop(next(iter(self._plans)))
            plan = _CpuPlan(self._weights, shape, threads, self.slab_columns)
            self._plans[key] = plan
        return plan

    def _predict_cuda(self, x: torch.Tensor) -> torch.Tensor:
        # A plain copy: the tiles come from pageable memory, where non_blocking gains nothing.
        x = x.to(self.device)
        if self.precision is None:
            return self.model.predict(x)  # under the caller's autocast and cuDNN flags
        key = (self.precision, self.device)
        if self._arithmetic is None or self._arithmetic[0] != key:
            self._arithmetic = (key, resolve_precision(self.precision, self.device))
        # Scoped: cuDNN flags and this autocast hold for this call only (and replace any
        # autocast the caller has open: `precision` decides alone).
        with inference_arithmetic(self._arithmetic[1], self.device):
            return self.model.predict(x)


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(model: MSDNet, precision: str | None = None) -> InferenceEngine:
    """The cached engine of `model`, refreshed if its weights changed since it was built."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(model)
        if engine is None:
            engine = InferenceEngine(model, precision=precision)
            _ENGINES[model] = engine
        elif engine._fingerprint != _weights_fingerprint(model):
            engine.refresh()
        if engine.precision != precision:
            engine.precision = _checked_precision(precision)
    return engine


def fast_predict(model: MSDNet, x: torch.Tensor, precision: str | None = None) -> torch.Tensor:
    """Drop-in for `model.predict(x)`: softmax probabilities (N, n_classes, D, H, W), float32.

    CPU: the matrix-multiply engine (float32). CUDA: cuDNN under the caller's
    autocast (precision None) or under `precision` (a `vpdetect.nn.precision`
    name). The engine (repacked weights, buffers for the last two input shapes) is kept per model and rebuilt when the model's weights change.
    """
    return engine_for(model, precision).predict(x)


def _checked_precision(precision: str | None) -> str | None:
    return None if precision is None else check_precision(precision)


def _weights_fingerprint(model: MSDNet) -> tuple:
    # In-place updates bump `_version` (loading a state dict copies in place too);
    # inference tensors keep no version counter, and cannot be updated in place anyway.
    return tuple(
        (p.data_ptr(), None if p.is_inference() else p._version, p.device.type)
        for p in model.parameters()
    )


class _CpuWeights:
    """The model's weights repacked for the multiply-then-shift formulation."""

    def __init__(self, model: MSDNet) -> None:
        w = model.width
        self.in_channels = model.in_channels
        self.width = w
        self.depth = model.depth
        self.n_classes = model.n_classes
        self.n_maps = model.n_feature_maps
        self.dilations = [list(d) for d in model.dilations]
        self.max_dilation = max(max(d) for d in self.dilations)
        with torch.no_grad():
            # Row (j*27 + kz*9 + ky*3 + kx) holds channel j's tap (kz, ky, kx) over all inputs.
            self.tap_matrices = [
                weight.detach().float().permute(0, 2, 3, 4, 1).reshape(27 * w, -1).contiguous()
                for weight in model.layer_weights
            ]
            self.biases = [[float(b) for b in bias.detach()] for bias in model.layer_biases]
            self.final_weight = model.final.weight.detach().float().reshape(model.n_classes, -1).clone()
            self.final_bias = model.final.bias.detach().float().reshape(-1, 1).clone()


class _Chunk:
    """A range of z-planes (a unit of work for one thread) and its private scratch."""

    def __init__(
        self, z0: int, z1: int, n_rows: int, t_width: int, width: int, pad: int, hw, slab_planes: int
    ) -> None:
        self.z0, self.z1 = z0, z1
        # Tap outputs of one slab; the zero margins stand for the (zero) neighbours.
        self.taps = torch.zeros((n_rows, t_width), dtype=torch.float32)
        # Pre-activations of this chunk's planes plus `pad` planes either side.
        self.acc = torch.zeros((width, z1 - z0 + 2 * pad, *hw), dtype=torch.float32)
        # In-plane partial sums of one slab: per (kz, ky), then per kz.
        self.by_row = torch.empty((3, 3, slab_planes, *hw), dtype=torch.float32)
        self.by_plane = torch.empty((3, slab_planes, *hw), dtype=torch.float32)


class _CpuPlan:
    """Buffers and geometry for one input shape; `run` evaluates one sample."""

    def __init__(self, weights: _CpuWeights, shape: tuple[int, int, int], threads: int, slab_columns: int) -> None:
        self.weights = weights
        depth_z, height, width = shape
        pad = weights.max_dilation
        self.shape = shape
        self.pad = pad
        self.row_pitch = width + pad
        self.plane_pitch = (height + pad) * self.row_pitch
        # Feature buffer: zero pitch padding that must stay zero (only interiors are written).
        self.buffer = torch.zeros((weights.n_maps, depth_z * self.plane_pitch), dtype=torch.float32)
        self.slab_planes = max(1, min(depth_z, round(slab_columns / self.plane_pitch)))
        self.margin = pad * self.row_pitch + pad
        t_width = self.slab_planes * self.plane_pitch + 2 * self.margin
        # More chunks than threads: a thread that the OS pauses (cores shared with other
        # jobs) then holds up a layer's barrier for a smaller share of the work.
        n_chunks = max(1, min(threads * CHUNKS_PER_THREAD if threads > 1 else 1, depth_z))
        bounds = [round(k * depth_z / n_chunks) for k in range(n_chunks + 1)]
        self.chunks = [
            _Chunk(
                bounds[k], bounds[k + 1], 27 * weights.width, t_width, weights.width, pad,
                (height, width), self.slab_planes,
            )
            for k in range(n_chunks)
        ]
        self.pool = _pool(threads) if n_chunks > 1 else None

    def interior(self, rows: slice | int, z0: int, z1: int) -> torch.Tensor:
        """The data voxels of buffer `rows` for planes z0..z1-1, as a strided view."""
        _, height, width = self.shape
        block = self.buffer[rows, z0 * self.plane_pitch : z1 * self.plane_pitch]
        block = block.unflatten(-1, (z1 - z0, height + self.pad, self.row_pitch))
        return block[..., :height, :width]

    def run(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Fill `out` (n_classes, D, H, W) with the probabilities for `x` (C, D, H, W)."""
        wts = self.weights
        c = wts.in_channels
        depth_z = self.shape[0]
        self.interior(slice(0, c), 0, depth_z).copy_(x)
        # One intra-op thread per worker so the workers do not oversubscribe the cores.
        previous = torch.get_num_threads()
        if self.pool is not None:
            torch.set_num_threads(1)
        try:
            for layer in range(wts.depth):
                self._parallel(self._layer_taps, layer)
                self._parallel(self._layer_finish, layer)
            self._parallel(self._final, out)
        finally:
            torch.set_num_threads(previous)

    def _parallel(self, task, arg) -> None:
        """Run `task(chunk, arg)` for every chunk and wait for all (a barrier)."""
        if self.pool is None:
            task(self.chunks[0], arg)
            return
        futures = [self.pool.submit(_in_worker, task, chunk, arg) for chunk in self.chunks]
        for future in futures:
            future.result()

    def _layer_taps(self, chunk: _Chunk, layer: int) -> None:
        """Multiply slab by slab and scatter the 27 taps into the chunk's accumulator."""
        wts = self.weights
        n_in = wts.in_channels + layer * wts.width
        matrix = wts.tap_matrices[layer]
        taps = chunk.taps
        t_width = taps.shape[1]
        pitch, rpitch, margin = self.plane_pitch, self.row_pitch, self.margin
        depth_z, height, width = self.shape
        acc_origin = chunk.z0 - self.pad  # plane index of acc[:, 0]
        chunk.acc.zero_()
        for s0 in range(chunk.z0, chunk.z1, self.slab_planes):
            s1 = min(s0 + self.slab_planes, chunk.z1)
            n_cols = (s1 - s0) * pitch
            torch.mm(
                matrix,
                self.buffer[:n_in, s0 * pitch : s1 * pitch],
                out=taps[:, margin : margin + n_cols],
            )
            for j, dil in enumerate(wts.dilations[layer]):
                # (kz, ky, kx, z, y, x) view: tap (kz, ky, kx) of slab voxel (z, y, x) is T at
                # column (z, y + (ky-1)*dil, x + (kx-1)*dil) of row j*27 + 9*kz + 3*ky + kx.
                view = taps.as_strided(
                    (3, 3, 3, s1 - s0, height, width),
                    (9 * t_width, 3 * t_width + dil * rpitch, t_width + dil, pitch, rpitch, 1),
                    taps.storage_offset() + j * 27 * t_width + margin - dil * rpitch - dil,
                )
                # Two single-axis sums (a sum over two strided axes at once is ~30x slower).
                by_row = torch.sum(view, dim=2, out=chunk.by_row[:, :, : s1 - s0])
                by_plane = torch.sum(by_row, dim=1, out=chunk.by_plane[:, : s1 - s0])
                for kz in range(3):
                    dz = (kz - 1) * dil  # input plane p feeds output plane p - dz
                    p0, p1 = max(s0, dz), min(s1, depth_z + dz)
                    if p0 < p1:
                        chunk.acc[j, p0 - dz - acc_origin : p1 - dz - acc_origin].add_(
                            by_plane[kz, p0 - s0 : p1 - s0]
                        )

    def _layer_finish(self, chunk: _Chunk, layer: int) -> None:
        """Gather the neighbours' halo contributions, add bias, activate, store the maps."""
        wts = self.weights
        pad = self.pad
        n_out = wts.in_channels + layer * wts.width
        own = chunk.acc[:, pad : pad + chunk.z1 - chunk.z0]
        for other in self.chunks:
            if other is chunk:
                continue
            # Planes of `chunk` that `other`'s accumulator (its planes +- pad) covers.
            lo = max(chunk.z0, other.z0 - pad)
            hi = min(chunk.z1, other.z1 + pad)
            if lo < hi:
                own[:, lo - chunk.z0 : hi - chunk.z0] += other.acc[
                    :, lo - other.z0 + pad : hi - other.z0 + pad
                ]
        for j, bias in enumerate(wts.biases[layer]):
            own[j].add_(bias)
        F.leaky_relu(own, NEGATIVE_SLOPE, inplace=True)
        self.interior(slice(n_out, n_out + wts.width), chunk.z0, chunk.z1).copy_(own)

    def _final(self, chunk: _Chunk, out: torch.Tensor) -> None:
        """1x1x1 convolution over all maps and softmax, for the chunk's planes."""
        wts = self.weights
        pitch = self.plane_pitch
        _, height, width = self.shape
        for s0 in range(chunk.z0, chunk.z1, self.slab_planes):
            s1 = min(s0 + self.slab_planes, chunk.z1)
            logits = torch.addmm(wts.final_bias, wts.final_weight, self.buffer[:, s0 * pitch : s1 * pitch])
            logits = logits.unflatten(1, (s1 - s0, height + self.pad, self.row_pitch))
            out[:, s0:s1] = torch.softmax(logits[..., :height, :width], dim=0)


def _in_worker(task, chunk: _Chunk, arg) -> None:
    # Intra-op thread counts and inference mode are per thread (OpenMP, autograd TLS):
    # pin this worker thread to one intra-op thread and run it in inference mode like the caller.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    with torch.inference_mode():
        task(chunk, arg)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n_workers: int) -> ThreadPoolExecutor:
    # Shared by all engines: workers sit idle between calls and are reused.
    pool = _POOLS.get(n_workers)
    if pool is None:
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="vpdetect-msdnet")
        _POOLS[n_workers] = pool
    return pool
