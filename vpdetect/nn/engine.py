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

Streaming: planes enter one step at a time and every layer finishes the planes
whose taps have all arrived, so each voxel is computed once and only rings of
planes stay resident. A map is last read by the output layer, which trails the
layer that made it by the later layers' reach: the maps come in groups of
consecutive layers (`map_groups`), each group with a ring just long enough, one
multiply per group (about 0.6 of one ring for all maps in a deep network). The
streamed axis is z (the largest planes of a tomogram: fewest steps), or y or x
where that more than halves the memory (on a 200 x 512 x 512 tomogram y, with
z-x planes: rings of 512 x 512 planes would not fit); the input, the output and
the kernels are seen with their axes in that order.

Cache blocking: the multiply runs on slabs of a few z-planes (about 20k
columns, so T of a slab and the slab's inputs stay in cache) and the slab's
taps are scattered into a small accumulator at once; T never exists for the
whole volume. A plane wider than that is multiplied in bands of rows, each row
once: a band's taps are summed along x, then added into the output rows its
y-taps reach (some in the neighbouring bands). Threads: each step's planes
are dealt to `threads` Python workers (STEP_SLABS slabs or banded planes each),
each running single-threaded BLAS on its own planes (torch releases the GIL
inside ops), with a barrier per layer and step.
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

import math
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vpdetect.devices import available_cpu_memory
from vpdetect.errors import VPDetectError
from vpdetect.nn.msdnet import NEGATIVE_SLOPE, MSDNet
from vpdetect.nn.precision import PRECISIONS as PRECISION_NAMES
from vpdetect.nn.precision import check_precision, inference_arithmetic, resolve_precision

# Columns (voxels incl. pitch padding) per matrix multiply: small enough that the
# tap outputs (27*w rows) and the inputs of a slab stay in L2/L3, large enough
# for an efficient multiply (measured on AVX-512: ~20k is the sweet spot).
SLAB_COLUMNS = 20_000
# Planes larger than this many columns are multiplied in bands of rows, each row once
# (a band's taps are scattered into the rows they reach): a whole 512^2 plane per multiply
# leaves the caches. A whole 256^2 plane (69k columns with its padding) per multiply beats
# bands of 20k on this project's 2-core host (paired runs, `python -m benchmarks msdnet`
# shapes: paper-sized localizer 0.87-0.97 of the time, bundled 0.83-0.87 on 256^2 and
# 512^2 planes); larger bands gain nothing more.
BAND_COLUMNS = 70_000
# Slabs (or banded planes) each worker multiplies per step and layer, between two barriers:
# more planes per step make fewer barriers and accumulator passes for a little more memory
# (the paper-sized localizer on 64 x 256 x 256, 2 threads: 3.47 -> 3.24 us/voxel along z).
STEP_SLABS = 4

PRECISIONS = (None, *PRECISION_NAMES)
# CPU kernels compared on first use of an input shape: the z-streamed engine, and
# `MSDNet.predict` with whole-buffer matrix multiplies or with oneDNN conv3d.
KERNELS = ("engine", "gemm", "conv")
# Memory left for everything else when a new plan is made beside the cached ones.
PLAN_MEMORY_RESERVE = 1024**3
# Inputs whose whole feature buffer exceeds this always use the streaming engine.
TRY_WHOLE_BUFFER_BYTES = 256 * 1024**2
# Feature maps sharing one ring length (see `map_groups`): fewer, larger groups keep the
# multiplies' inner dimension large (a multiply per group); smaller ones hold fewer planes.
GROUP_MAPS = 16
# The input's axes in the order the engine may lay them out, the streamed axis first.
STREAM_ORDERS = ((0, 1, 2), (1, 0, 2), (2, 0, 1))
# Streamed along y or x only when that needs this many times less memory than along z.
STREAM_MEMORY_RATIO = 2.0


class InferenceEngine:
    """Predicts like `model.predict(x)` with the fastest path for the model's device.

    The engine snapshots the model's weights when built (or when `refresh()`
    is called); `fast_predict` refreshes automatically when they change.
    `kernel` (CPU): None = measured per input shape (`kernel_summary()` says which
    won), or one of KERNELS.
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
        kernel: str | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise VPDetectError(f"threads must be at least 1, got {threads}")
        if kernel is not None and kernel not in KERNELS:
            raise VPDetectError(f"unknown kernel {kernel!r}: one of {', '.join(KERNELS)} (or None: measured)")
        # CPU: None = the fastest of KERNELS, measured on the first input of each shape.
        self.kernel = kernel
        # Weak, so that the per-model cache of `engine_for` does not keep models alive.
        self._model_ref = weakref.ref(model)
        self.threads = threads
        self.precision = _checked_precision(precision)
        self.slab_columns = int(slab_columns)
        self._plans: dict[tuple[int, ...], _CpuPlan] = {}
        # Seconds spent allocating (and zeroing) plan buffers so far: first-touch page faults
        # of gigabytes of fresh memory are part of a first pass (slow on some virtual machines).
        self.allocation_seconds = 0.0
        # CPU kernel per (input shape, threads), measured on first use (`_measure_kernels`).
        self.kernels: dict[tuple, str] = {}
        self.kernel_times: dict[tuple, dict] = {}
        self.kernel_batch: dict[tuple, int] = {}
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
        self._weights: dict[tuple[int, int, int], _CpuWeights] = {}  # per axis order, made when needed
        self._plans.clear()
        self.kernels.clear()
        self.kernel_times.clear()
        self.kernel_batch.clear()

    def predict(self, x: torch.Tensor, progress=None, measure: bool = True) -> torch.Tensor:
        """Softmax probabilities (N, n_classes, D, H, W), float32, on the model's device.

        `progress(planes_done, D)` (CPU) is called as output planes are finished.
        `measure` (CPU, kernel None): time the kernels on the first input of a new shape
        (worth it when the shape recurs, as batches of boxes do); False streams."""
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
        # Keyed without the batch size: a last, smaller batch of boxes keeps the choice.
        key = (tuple(x.shape[1:]), threads)
        kernel = self.kernel or self.kernels.get(key) or (None if measure else "engine")
        if kernel is None:
            kernel, self.kernel_times[key], out = self._measure_kernels(x, threads)
            self.kernel_batch[key] = x.shape[0]
            self.kernels[key] = kernel
            if out is not None:
                return out
        else:
            self.kernels[key] = kernel
        return self._run(kernel, x, threads, progress)

    def _run(self, kernel: str, x: torch.Tensor, threads: int, progress=None) -> torch.Tensor:
        """One CPU pass with `kernel`: "engine" (z-streamed), or MSDNet.predict's "gemm" or "conv"."""
        model = self.model
        if kernel != "engine":
            previous_threads, previous_method = torch.get_num_threads(), model.method
            torch.set_num_threads(threads)
            model.method = kernel
            try:
                with torch.no_grad():
                    return model.predict(x.detach().to("cpu", torch.float32))
            finally:
                model.method = previous_method
                torch.set_num_threads(previous_threads)
        n, _, d, h, w = x.shape
        # Made outside inference mode (when the caller is) so callers may modify it, as
        # they may modify what `model.predict` returns.
        out = torch.empty((n, model.n_classes, d, h, w), dtype=torch.float32)
        # Inference mode is per thread: the workers enter it too (see `_in_worker`), so
        # buffers made here in either mode can always be updated in place.
        with torch.inference_mode():
            x = x.detach().to("cpu", torch.float32)
            # All samples side by side in one pass: one multiply serves every box of a batch.
            plan = self._plan((d, h, w), n, threads)
            # The plan streams along the axis its layout chose: it sees the input and the
            # output with their axes in that order (views, no copies) and reports z planes.
            axes = (0, 1, *(2 + a for a in plan.geometry.order))
            streamed = plan.geometry.shape[0]
            within = None if progress is None else (lambda done, _total: progress(done * d // streamed, d))
            plan.run(x.permute(axes), out.permute(axes), within)
        return out

    def _measure_kernels(self, x: torch.Tensor, threads: int) -> tuple[str, dict, torch.Tensor | None]:
        """The fastest kernel for inputs like `x`, timed on `x` itself: (name, seconds per
        kernel, the winner's output or None when nothing was run).

        The whole-buffer alternatives hold every map of the input at once, so they are
        tried only for inputs up to TRY_WHOLE_BUFFER_BYTES (boxes, small tiles); larger
        inputs always stream."""
        model = self.model
        whole_buffer = 4 * x.shape[0] * model.n_feature_maps * x[0, 0].numel()
        if whole_buffer > TRY_WHOLE_BUFFER_BYTES:
            return "engine", {}, None
        self._run("engine", x, threads)  # first call allocates the plan: not timed
        times, outputs = {}, {}
        for kernel in KERNELS:
            if times and x.shape[0] > 1:
                # A one-sample probe first: an alternative already slower than the best on
                # its share of the batch is not run on the whole batch (conv3d takes seconds).
                start = time.perf_counter()
                self._run(kernel, x[:1], threads)
                estimate = (time.perf_counter() - start) * x.shape[0]
                if estimate > min(times.values()):
                    times[kernel] = estimate
                    continue
            start = time.perf_counter()
            outputs[kernel] = self._run(kernel, x, threads)
            times[kernel] = time.perf_counter() - start
        best = min(outputs, key=times.get)
        return best, times, outputs[best]

    def kernel_summary(self) -> str:
        """The kernel chosen per input shape, with the measured seconds when several were tried."""
        parts = []
        for key, kernel in self.kernels.items():
            shape, batch = key[0], self.kernel_batch.get(key, 1)
            times = self.kernel_times.get(key) or {}
            measured = ", ".join(f"{k} {t * 1e3:.0f} ms" for k, t in times.items())
            size = "x".join(str(n) for n in shape[1:])
            if kernel == "engine":  # which axis it streamed (see `stream_geometry`)
                kernel += f" along {'zyx'[self.geometry(shape[1:], batch, key[1]).order[0]]}"
            parts.append(f"{kernel} for {size}" + (f" (measured on {batch}: {measured})" if measured else ""))
        return "; ".join(parts) or "none yet"

    def geometry(self, shape: tuple[int, int, int], lanes: int = 1, threads: int | None = None) -> StreamGeometry:
        """The layout (ring planes, memory) the CPU path uses for `lanes` inputs of `shape`."""
        return stream_geometry(self.model, shape, lanes, threads or self.threads or torch.get_num_threads(),
                               self.slab_columns)

    def cached_bytes(self) -> int:
        """Memory held by the cached plans' buffers (reused for their shapes, freed for others)."""
        return sum(plan.geometry.bytes for plan in self._plans.values())

    def _plan(self, shape: tuple[int, int, int], lanes: int, threads: int) -> _CpuPlan:
        """The cached plan (buffers) for `lanes` inputs of `shape`."""
        key = (*shape, lanes, threads)
        plan = self._plans.get(key)
        if plan is None:
            geometry = self.geometry(shape, lanes, threads)
            # Tiling reuses one tile shape; keep only the latest two (each holds a buffer), and
            # none when the new buffers would not fit beside them (a 256^3 column of a deep
            # network holds gigabytes).
            free = available_cpu_memory()
            if free is not None and geometry.bytes > free - PLAN_MEMORY_RESERVE:
                self._plans.clear()
            if len(self._plans) >= 2:
                self._plans.pop(next(iter(self._plans)))
            start = time.perf_counter()
            weights = self._weights.get(geometry.order)
            if weights is None:
                weights = self._weights[geometry.order] = _CpuWeights(self.model, geometry.order)
            plan = _CpuPlan(weights, geometry, threads, self.slab_columns)
            self.allocation_seconds += time.perf_counter() - start
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


def fast_predict(
    model: MSDNet, x: torch.Tensor, precision: str | None = None, progress=None, measure: bool = True
) -> torch.Tensor:
    """Drop-in for `model.predict(x)`: softmax probabilities (N, n_classes, D, H, W), float32.

    CPU: the matrix-multiply engine (float32). CUDA: cuDNN under the caller's
    autocast (precision None) or under `precision` (a `vpdetect.nn.precision`
    name). The engine (repacked weights, buffers for the last two input shapes) is kept per model and rebuilt when the model's weights change.
    """
    return engine_for(model, precision).predict(x, progress, measure)


def cached_plan_bytes(model) -> int:
    """Memory the CPU engine of `model` holds in cached buffers (0 without one): free for
    the next input's layout to use, since a plan that does not fit evicts them."""
    engine = _ENGINES.get(model) if isinstance(model, MSDNet) else None
    return engine.cached_bytes() if engine is not None else 0


def allocation_seconds(model) -> float:
    """Seconds the CPU engine of `model` has spent allocating plan buffers (0 without one)."""
    engine = _ENGINES.get(model) if isinstance(model, MSDNet) else None
    return engine.allocation_seconds if engine is not None else 0.0


def kernels_used(model) -> str | None:
    """What the CPU engine of `model` ran so far (`InferenceEngine.kernel_summary`), or None."""
    engine = _ENGINES.get(model) if isinstance(model, MSDNet) else None
    return engine.kernel_summary() if engine is not None and engine.kernels else None


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
    """The model's weights repacked for the multiply-then-shift formulation, for inputs
    whose axes are taken in `order` (`StreamGeometry.order`): the kernels' axes follow."""

    def __init__(self, model: MSDNet, order: tuple[int, int, int] = (0, 1, 2)) -> None:
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
            kernel_axes = tuple(2 + a for a in order)
            self.tap_matrices = [
                weight.detach().float().permute(0, *kernel_axes, 1).reshape(27 * w, -1).contiguous()
                for weight in model.layer_weights
            ]
            self.biases = [[float(b) for b in bias.detach()] for bias in model.layer_biases]
            self.final_weight = model.final.weight.detach().float().reshape(model.n_classes, -1).clone()
            self.final_bias = model.final.bias.detach().float().reshape(-1, 1).clone()


@dataclass(frozen=True)
class StreamGeometry:
    """How the CPU engine lays out one input shape (see the module docstring).

    The input's axes are taken in `order` (the streamed axis first, see
    `stream_geometry`), so `shape` is the input's shape in
    that order. The feature maps come in `groups` of consecutive maps
    (first, stop, ring): `ring` planes of each group's maps are resident at a
    time (the whole volume when `ring == depth`), fewer for later maps, which
    the last layers and the output read sooner after they are made; `step`
    input planes enter per step. `bytes` is the memory of the buffers: feature
    rings, per-layer accumulators, tap scratch and the input and output tensors.
    """

    shape: tuple[int, int, int]
    order: tuple[int, int, int]
    lanes: int
    pad: int
    step: int
    groups: tuple[tuple[int, int, int], ...]
    accumulator_planes: tuple[int, ...]
    bytes: int

    @property
    def row_pitch(self) -> int:
        return self.lanes * (self.shape[2] + self.pad)

    @property
    def plane_pitch(self) -> int:
        return (self.shape[1] + self.pad) * self.row_pitch


def stream_geometry(
    model, shape: tuple[int, int, int], lanes: int = 1, threads: int = 1, slab_columns: int = SLAB_COLUMNS,
    group_maps: int | None = None,
) -> StreamGeometry:
    """The engine's layout for `lanes` samples of `shape` (D, H, W) on `threads` workers:
    streamed along z, or along y or x where that needs less than half the memory.

    Memory grows with the rings: each map keeps ring = min(planes, reach + step) planes,
    where a map's reach is the sum of the largest dilations of the layer that made it and
    of the later ones (of all layers for the input), i.e. about
    width x depth^2 x mean dilation x plane size / 2 for deep networks (far less than the
    whole volume once the streamed axis exceeds the network's reach). `group_maps`
    (default GROUP_MAPS) sets how many consecutive maps share one ring length.
    """
    group_maps = GROUP_MAPS if group_maps is None else group_maps
    along_z, *others = (
        _oriented_geometry(model, tuple(int(shape[a]) for a in order), order, lanes, threads, slab_columns,
                           group_maps)
        for order in STREAM_ORDERS
    )
    # Along z the planes are largest for tomograms: fewest steps, about 10 % faster (measured on
    # 128 x 256 x 256); another axis only where it more than halves the memory.
    smallest = min(others, key=lambda g: g.bytes)
    return smallest if smallest.bytes * STREAM_MEMORY_RATIO < along_z.bytes else along_z


def map_groups(model, depth_z: int, step: int, group_maps: int) -> tuple[tuple[int, int, int], ...]:
    """(first map, stop, ring planes) of consecutive maps sharing a ring: the input maps with
    the first layers' maps, then whole layers, at least `group_maps` maps per group.

    A map is read last by the output layer, when the maps of every later layer are
    finished: a map of layer l must stay resident for the largest dilations of layers
    l.. (its own too: near the last plane, a layer finishes that many planes at once) plus
    one step of planes; the input's for all layers."""
    dilations = [max(d) for d in model.dilations]
    per_group = max(1, math.ceil(group_maps / model.width))
    stop_layer = min(model.depth, max(0, math.ceil((group_maps - model.in_channels) / model.width)))
    groups = [(0, model.in_channels + stop_layer * model.width, min(depth_z, sum(dilations) + step))]
    while stop_layer < model.depth:
        first_layer, stop_layer = stop_layer, min(model.depth, stop_layer + per_group)
        ring = min(depth_z, sum(dilations[first_layer:]) + step)
        groups.append((groups[-1][1], model.in_channels + stop_layer * model.width, ring))
    return tuple(groups)


def _oriented_geometry(model, shape, order, lanes, threads, slab_columns, group_maps) -> StreamGeometry:
    depth_z, height, width = shape
    dilations = [max(d) for d in model.dilations]
    pad = max(dilations)
    row_pitch = lanes * (width + pad)
    plane_pitch = (height + pad) * row_pitch
    per_worker = max(1, round(slab_columns / plane_pitch))
    step = max(1, min(depth_z, per_worker * threads * STEP_SLABS))
    groups = map_groups(model, depth_z, step, group_maps)
    acc = tuple(min(depth_z, step + 2 * d) for d in dilations)
    compute_plane = height * (row_pitch - pad)
    margin = pad * row_pitch + pad
    floats = (
        sum((stop - first) * ring for first, stop, ring in groups) * plane_pitch  # feature rings
        + model.width * sum(acc) * compute_plane  # accumulators
        + model.width * 3 * step * compute_plane  # z-tap sums of a step
        + threads * (27 * model.width * (per_worker * plane_pitch + 2 * margin) + 9 * per_worker * compute_plane)
        + lanes * (model.in_channels + model.n_classes) * depth_z * height * width  # input, output
    )
    return StreamGeometry(tuple(shape), tuple(order), lanes, pad, step, groups, acc, 4 * floats)


def _segments(start: int, stop: int, *periods: int) -> list[tuple[int, int]]:
    """Split [start, stop) where any ring of the given periods wraps: (z0, z1) pieces."""
    if stop <= start:
        return []
    cuts = {start, stop}
    for period in periods:
        cuts.update(range((start // period + 1) * period, stop, period))
    points = sorted(cuts)
    return list(zip(points[:-1], points[1:], strict=True))


def _split(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) cut into at most `parts` contiguous, nearly equal, non-empty ranges."""
    parts = max(1, min(parts, stop - start))
    bounds = [start + round(k * (stop - start) / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class _Scratch:
    """One worker's tap outputs and in-plane partial sums."""

    def __init__(self, n_rows: int, t_width: int, planes: int, height: int, width: int) -> None:
        # Zero margins around the columns a multiply writes stand for the (zero) neighbours.
        self.taps = torch.zeros((n_rows, t_width), dtype=torch.float32)
        self.by_row = torch.empty((3, 3, planes, height, width), dtype=torch.float32)


class _CpuPlan:
    """Buffers for one input shape and lane count; `run` evaluates `lanes` samples at once."""

    def __init__(self, weights: _CpuWeights, geometry: StreamGeometry, threads: int, slab_columns: int) -> None:
        self.weights = weights
        self.geometry = geometry
        depth_z, height, width = geometry.shape
        self.pad = pad = geometry.pad
        self.lanes = geometry.lanes
        self.row_pitch = geometry.row_pitch
        self.plane_pitch = geometry.plane_pitch
        # Computed width of a row: every lane and the zero gutters between lanes.
        self.compute_width = self.row_pitch - pad
        self.step = geometry.step
        self.per_worker = max(1, round(slab_columns / self.plane_pitch))
        self.threads = threads
        # Feature rings, one per group of maps: plane z of a group's maps lives in slot z % its
        # ring. Pitch padding and gutters stay zero.
        self.buffers = [
            torch.zeros((stop - first, ring * self.plane_pitch), dtype=torch.float32)
            for first, stop, ring in geometry.groups
        ]
        self.rings = [ring for _, _, ring in geometry.groups]
        group_of = [k for k, (first, stop, _) in enumerate(geometry.groups) for _ in range(first, stop)]
        # The ring of each layer's output maps (a layer's maps never straddle two groups).
        self.layer_group = [group_of[weights.in_channels + layer * weights.width] for layer in range(weights.depth)]
        # Each layer's tap matrix and the output's weights cut into the groups' columns:
        # [(group, rows of that group's buffer, weights)], one multiply per group.
        self.tap_pieces = [self._pieces_of(matrix) for matrix in weights.tap_matrices]
        self.final_pieces = self._pieces_of(weights.final_weight)
        self.acc = [
            torch.zeros((weights.width, planes, height, self.compute_width), dtype=torch.float32)
            for planes in geometry.accumulator_planes
        ]
        self.zsums = torch.empty((weights.width, 3, self.step, height, self.compute_width), dtype=torch.float32)
        self.margin = pad * self.row_pitch + pad
        # Bands of rows when a plane exceeds BAND_COLUMNS (else whole planes per multiply).
        # Bands of equal rows: a short last band would multiply as slowly as a full one.
        bands = 1 if self.plane_pitch <= BAND_COLUMNS else math.ceil(height / max(1, BAND_COLUMNS // self.row_pitch))
        self.band_rows = math.ceil(height / bands)
        band_width = min(height, self.band_rows) * self.row_pitch
        t_width = max(self.per_worker * self.plane_pitch, band_width) + 2 * self.margin
        self.scratch = [
            _Scratch(27 * weights.width, t_width, self.per_worker, height, self.compute_width)
            for _ in range(threads)
        ]
        self.pool = _pool(threads) if threads > 1 else None

    def data(self, block: torch.Tensor) -> torch.Tensor:
        """(..., planes, H, lanes, W) view of the data voxels of flat planes `block` (..., n*pitch)."""
        _, height, width = self.geometry.shape
        block = block.unflatten(-1, (-1, height + self.pad, self.lanes, width + self.pad))
        return block[..., :height, :, :width]

    def _pieces_of(self, matrix: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        """`matrix` (rows, input maps) cut by the map groups its input maps fall in."""
        pieces = []
        for k, (first, stop, _) in enumerate(self.geometry.groups):
            if first < matrix.shape[1]:
                rows = min(stop, matrix.shape[1]) - first
                pieces.append((k, rows, matrix[:, first : first + rows].contiguous()))
        return pieces

    def slots(self, group: int, z0: int, z1: int, rows=slice(None)) -> torch.Tensor:
        """Flat ring columns of planes z0..z1-1 (which must not wrap) of `rows` of a group's maps."""
        s0 = z0 % self.rings[group]
        return self.buffers[group][rows, s0 * self.plane_pitch : (s0 + z1 - z0) * self.plane_pitch]

    def _multiply(self, pieces, z: int, lo: int, hi: int, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """out = (bias +) the pieces' weights @ their maps' columns [lo, hi) of plane z's slots
        onwards (columns may run into the following planes, which must not wrap)."""
        for n, (group, rows, weights) in enumerate(pieces):
            base = (z % self.rings[group]) * self.plane_pitch
            maps = self.buffers[group][:rows, base + lo : base + hi]
            if n:
                out.addmm_(weights, maps)
            elif bias is not None:
                torch.addmm(bias, weights, maps, out=out)
            else:
                torch.mm(weights, maps, out=out)

    def run(self, x: torch.Tensor, out: torch.Tensor, progress=None) -> None:
        """Fill `out` (lanes, n_classes, D, H, W) with the probabilities for `x` (lanes, C, D, H, W)."""
        wts = self.weights
        depth_z = self.geometry.shape[0]
        for acc in self.acc:
            acc.zero_()  # normally zero already; not after an interrupted run
        previous = torch.get_num_threads()
        if self.pool is not None:
            torch.set_num_threads(1)  # one intra-op thread per worker: no oversubscription
        try:
            loaded = final_done = 0
            fed = [0] * wts.depth
            done = [0] * wts.depth
            while final_done < depth_z:
                # Load input planes while their ring slots are free (the final layer has read them).
                stop = min(depth_z, loaded + self.step, final_done + self.rings[0])
                for z0, z1 in _segments(loaded, stop, self.rings[0]):
                    self.data(self.slots(0, z0, z1, slice(0, wts.in_channels))).copy_(
                        x[:, :, z0:z1].permute(1, 2, 3, 0, 4)
                    )
                progressed = stop > loaded
                loaded = max(loaded, stop)
                available = loaded
                for layer in range(wts.depth):
                    # A layer finishes planes only into free slots of its maps' ring.
                    limit = final_done + self.rings[self.layer_group[layer]]
                    reach = max(wts.dilations[layer])
                    while fed[layer] < available:
                        a = fed[layer]
                        b = min(available, a + self.step, limit + reach)
                        if b == depth_z > limit:
                            b -= 1  # the last input plane finishes every plane left
                        if b <= a:
                            break
                        done[layer] = self._feed(layer, a, b, done[layer])
                        fed[layer] = b
                        progressed = True
                    available = done[layer]
                if not progressed and available <= final_done:
                    raise RuntimeError(f"inference engine stalled at plane {final_done} of {depth_z}")
                if available > final_done:
                    self._parallel(self._final, _split(final_done, available, self.threads), out)
                    final_done = available
                    if progress is not None:
                        progress(final_done, depth_z)
        finally:
            torch.set_num_threads(previous)

    def _feed(self, layer: int, a: int, b: int, done: int) -> int:
        """Add input planes [a, b)'s taps to layer `layer`; finish the planes now complete.

        Returns the new count of finished output planes."""
        depth_z = self.geometry.shape[0]
        reach = max(self.weights.dilations[layer])
        pieces = [
            piece
            for part in _split(a, b, self.threads)
            for z0, z1 in _segments(*part, *self.rings)
            for piece in self._pieces(z0, z1)
        ]
        self._parallel(self._taps, _balanced(pieces, self.threads), (layer, a))
        finished = depth_z if b == depth_z else max(done, b - reach)
        touched = (max(0, a - reach), min(depth_z, b + reach))
        self._parallel(self._gather, _split(*touched, self.threads), (layer, a, b, done, finished))
        return finished

    def _pieces(self, z0: int, z1: int) -> list[tuple[int, int]]:
        """(z0, z1) units of work: several whole planes per multiply, or one banded plane
        (its bands add into overlapping rows of the plane's z-sums, so one worker owns it)."""
        per_piece = self.per_worker if self.band_rows >= self.geometry.shape[1] else 1
        return [(s, min(s + per_piece, z1)) for s in range(z0, z1, per_piece)]

    def _parallel(self, task, ranges, arg) -> None:
        """Run `task(scratch, range, arg)` once per range (a barrier: all finish before return)."""
        if self.pool is None or len(ranges) == 1:
            for r in ranges:
                task(self.scratch[0], r, arg)
            return
        futures = [
            self.pool.submit(_in_worker, task, self.scratch[k], r, arg) for k, r in enumerate(ranges)
        ]
        for future in futures:
            future.result()

    def _taps(self, scratch: _Scratch, pieces, arg) -> None:
        """Multiply piece by piece; in-plane tap sums into the step's z-sums (per z-tap)."""
        layer, a = arg
        banded = self.band_rows < self.geometry.shape[1]
        for z0, z1 in pieces:
            if banded:
                self._band_taps(scratch, layer, z0, a)
            else:
                self._plane_taps(scratch, layer, z0, z1, a)

    def _plane_taps(self, scratch: _Scratch, layer: int, z0: int, z1: int, a: int) -> None:
        """Whole planes z0..z1-1 in one multiply; each output voxel gathers its 9 in-plane taps."""
        taps, height = scratch.taps, self.geometry.shape[1]
        pitch, rpitch, margin, t_width = self.plane_pitch, self.row_pitch, self.margin, taps.shape[1]
        n = z1 - z0
        # T column `margin` is plane z0's first voxel; the zero margins stand for the
        # neighbours above the first row and below the last.
        self._multiply(self.tap_pieces[layer], z0, 0, n * pitch, taps[:, margin : margin + n * pitch])
        for j, dil in enumerate(self.weights.dilations[layer]):
            # (kz, ky, kx, z, y, x) view: tap (kz, ky, kx) of voxel (z, y, x) is T at
            # column (z, y + (ky-1)*dil, x + (kx-1)*dil) of row j*27 + 9*kz + 3*ky + kx.
            view = taps.as_strided(
                (3, 3, 3, n, height, self.compute_width),
                (9 * t_width, 3 * t_width + dil * rpitch, t_width + dil, pitch, rpitch, 1),
                taps.storage_offset() + j * 27 * t_width + margin - dil * rpitch - dil,
            )
            # Two single-axis sums (a sum over two strided axes at once is ~30x slower).
            by_row = torch.sum(view, dim=2, out=scratch.by_row[:, :, :n])
            torch.sum(by_row, dim=1, out=self.zsums[j, :, z0 - a : z1 - a])

    def _band_taps(self, scratch: _Scratch, layer: int, z: int, a: int) -> None:
        """Plane z in bands of rows, each multiplied once: a band's taps are summed over x,
        then added (scattered) into the output rows they reach, which may lie in the
        neighbouring bands. No row is multiplied twice."""
        taps, height = scratch.taps, self.geometry.shape[1]
        rpitch, margin, pad, t_width = self.row_pitch, self.margin, self.pad, taps.shape[1]
        cwidth = self.compute_width
        zsums = self.zsums[:, :, z - a]  # (w, 3 z-taps, H, cwidth)
        zsums.zero_()
        for r0 in range(0, height, self.band_rows):
            r1 = min(r0 + self.band_rows, height)
            rows = r1 - r0
            # T column `margin` is row r0, column 0. The x-taps of column 0 read `pad` columns
            # before it: the previous row's zero pitch padding, or the zero margin for row 0.
            lo = max(0, r0 * rpitch - pad)
            start = margin + lo - r0 * rpitch
            if r0 == 0:
                taps[:, :start].zero_()  # earlier bands wrote here
            self._multiply(self.tap_pieces[layer], z, lo, r1 * rpitch, taps[:, start : margin + rows * rpitch])
            for j, dil in enumerate(self.weights.dilations[layer]):
                # (kz, ky, kx, y, x) view of the band's taps at column (y, x + (kx-1)*dil).
                view = taps.as_strided(
                    (3, 3, 3, rows, cwidth),
                    (9 * t_width, 3 * t_width, t_width + dil, rpitch, 1),
                    taps.storage_offset() + j * 27 * t_width + margin - dil,
                )
                by_row = torch.sum(view, dim=2, out=scratch.by_row[:, :, 0, :rows])
                for ky in range(3):
                    # Tap row ky of input row y serves output row y - (ky-1)*dil.
                    shift = (ky - 1) * dil
                    y0, y1 = max(0, r0 - shift), min(height, r1 - shift)
                    if y0 < y1:
                        zsums[j, :, y0:y1].add_(by_row[:, ky, y0 + shift - r0 : y1 + shift - r0])

    def _gather(self, scratch: _Scratch, out_range, arg) -> None:
        """Add the z-taps of input planes [a, b) to output planes `out_range`; finish those
        below `finished` (bias, LeakyReLU, into the ring) and clear their accumulators."""
        layer, a, b, done, finished = arg
        wts = self.weights
        acc = self.acc[layer]
        period = acc.shape[1]
        lo, hi = out_range
        for j, dil in enumerate(wts.dilations[layer]):
            for kz in range(3):
                dz = (kz - 1) * dil  # input plane p feeds output plane p - dz
                p0, p1 = max(a, lo + dz), min(b, hi + dz)
                for z0, z1 in _segments(p0 - dz, p1 - dz, period) if p0 < p1 else ():
                    s0 = z0 % period
                    acc[j, s0 : s0 + z1 - z0].add_(self.zsums[j, kz, z0 + dz - a : z1 + dz - a])
        n_out = wts.in_channels + layer * wts.width
        group = self.layer_group[layer]
        first = self.geometry.groups[group][0]
        for z0, z1 in _segments(max(lo, done), min(hi, finished), period, self.rings[group]):
            s0 = z0 % period
            own = acc[:, s0 : s0 + z1 - z0]
            for j, bias in enumerate(wts.biases[layer]):
                own[j].add_(bias)
            F.leaky_relu(own, NEGATIVE_SLOPE, inplace=True)
            target = self.data(self.slots(group, z0, z1, slice(n_out - first, n_out - first + wts.width)))
            target.copy_(self.lanes_of(own))
            own.zero_()

    def lanes_of(self, planes: torch.Tensor) -> torch.Tensor:
        """(..., H, lanes, W) view of computed rows (..., H, compute_width) without the gutters."""
        width = self.geometry.shape[2]
        pitch = width + self.pad
        strides = planes.stride()
        return planes.as_strided(
            (*planes.shape[:-1], self.lanes, width), (*strides[:-1], pitch, 1), planes.storage_offset()
        )

    def _final(self, scratch: _Scratch, out_range, out: torch.Tensor) -> None:
        """1x1x1 convolution over all maps and softmax for output planes `out_range`."""
        wts = self.weights
        for z0, z1 in _segments(*out_range, *self.rings):
            for s0 in range(z0, z1, self.per_worker):
                s1 = min(s0 + self.per_worker, z1)
                logits = torch.empty((wts.n_classes, (s1 - s0) * self.plane_pitch), dtype=torch.float32)
                self._multiply(self.final_pieces, s0, 0, logits.shape[1], logits, wts.final_bias)
                # (classes, planes, H, lanes, W) -> (lanes, classes, planes, H, W)
                probs = torch.softmax(self.data(logits), dim=0)
                out[:, :, s0:s1] = probs.permute(3, 0, 1, 2, 4)


def _balanced(pieces: list, parts: int) -> list[list]:
    """Pieces dealt into at most `parts` lists of consecutive pieces."""
    if not pieces:
        return []
    return [pieces[a:b] for a, b in _split(0, len(pieces), parts)]


def _in_worker(task, scratch, arg_range, arg) -> None:
    # Intra-op thread counts and inference mode are per thread (OpenMP, autograd TLS):
    # pin this worker thread to one intra-op thread and run it in inference mode like the caller.
    # Set unconditionally: get_num_threads() may report the caller's setting while this
    # thread's own OpenMP team size is still the default (oversubscribing the cores).
    if not getattr(_WORKER_STATE, "pinned", False):
        torch.set_num_threads(1)
        _WORKER_STATE.pinned = True
    with torch.inference_mode():
        task(scratch, arg_range, arg)


_WORKER_STATE = threading.local()


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(n_workers: int) -> ThreadPoolExecutor:
    # Shared by all engines: workers sit idle between calls and are reused.
    pool = _POOLS.get(n_workers)
    if pool is None:
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="vpdetect-msdnet")
        _POOLS[n_workers] = pool
    return pool
