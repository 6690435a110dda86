"""Tiled network inference with valid-region stitching (VP-Detector 2.1.1, steps 1-2).

On the CPU an MSDNet sees full-depth columns: the engine streams each column
along one axis (`vpdetect.nn.engine`: z, or y or x where that needs less
memory), computing every voxel once with the network's whole reach along z
(and along the streamed axis), so only x and y are tiled, and the columns are as few
and as wide as CPU_MEMORY_SHARE of the free memory allows (often one: the
whole tomogram, nothing recomputed). Elsewhere (GPUs, other networks) the
tomogram is cut into cubic input tiles of edge `tile`. Each tile trusts
only its core: the part at least `halo` voxels from any tile face that is not
also a face of the tomogram. The cores partition the volume, so every output
voxel comes from exactly one tile and no blending is needed; with
`halo >= model.halo` the stitched map equals one whole-volume pass (the
network's own zero padding still acts at the tomogram's faces, because tiles
are shifted inside the volume instead of padded). A smaller halo trades a
small difference near core faces for much less recomputation.

Tiles are read from the (possibly memory-mapped) volume and normalised one at
a time, so the volume is never copied whole as float32; the map may be a
float16 array or a disk-backed memmap (`allocate_map`). Memory-mapped pages
that are finished with are handed back to the kernel as the tiles sweep along
z, so resident memory stays near one row of tiles.
"""

from __future__ import annotations

import functools
import math
import mmap
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.preprocess import normalise

# CPU defaults measured on the paper-sized localizer (see README, performance).
DEFAULT_TILE = 128
DEFAULT_HALO_CAP = 24
# GPU default (to be measured by `make gpu-check`): the largest tile whose feature maps take
# at most this share of the GPU's free memory, up to the whole tomogram.
GPU_MEMORY_SHARE = 0.5
# CPU, MSDNet: the full-depth columns are chosen to use at most this share of the free memory.
CPU_MEMORY_SHARE = 0.4
# Assumed free memory when it cannot be told.
UNKNOWN_FREE_MEMORY = 8 * 1024**3
# Columns per axis considered.
MAX_COLUMNS_PER_AXIS = 16
# A tile is refused when its estimate exceeds this share of the free memory.
MEMORY_LIMIT_SHARE = 0.9
# The CPU engine times its alternatives on the first tile only when at least this many follow.
MEASURE_MIN_TILES = 8
# Maps larger than this many voxels live in a disk-backed memmap instead of memory.
MAP_IN_MEMORY_VOXELS = 256 * 1024**2


@dataclass(frozen=True)
class Tile:
    """One input crop (`source`) and the part of it that is trusted (`core`, in volume coordinates)."""

    source: tuple[slice, slice, slice]
    core: tuple[slice, slice, slice]

    @property
    def core_in_tile(self) -> tuple[slice, slice, slice]:
        return tuple(
            slice(c.start - s.start, c.stop - s.start) for c, s in zip(self.core, self.source, strict=True)
        )


def axis_layout(length: int, tile: int, halo: int) -> list[tuple[int, int, int]]:
    """(input start, core start, core stop) along one axis; cores partition [0, length).

    Every input window has the same size min(tile, length). The first and last
    cores reach the volume faces and may be `tile - halo` long; inner cores are
    at most `tile - 2 * halo` long so that each keeps `halo` voxels of context.
    """
    if length <= tile:
        return [(0, 0, length)]
    inner = tile - 2 * halo
    if inner <= 0:
        raise VPDetectError(f"tile size {tile} must be larger than twice the halo ({halo})")
    outer = tile - halo
    middle = length - 2 * outer
    if middle <= 0:
        bounds = [0, (length + 1) // 2, length]
    else:
        pieces = math.ceil(middle / inner)
        inner_bounds = np.round(np.linspace(outer, length - outer, pieces + 1)).astype(int)
        bounds = [0, *inner_bounds.tolist(), length]
    layout = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        source = min(max(start - halo, 0), length - tile)
        layout.append((source, start, stop))
    return layout


def tile_layout(shape: tuple[int, int, int], tile, halo: int) -> list[Tile]:
    """All tiles of a [z, y, x] volume, z-major, as `Tile`s; `tile` an edge or (z, y, x) edges."""
    edges = (tile,) * 3 if np.isscalar(tile) else tuple(tile)
    per_axis = []
    for length, edge in zip(shape, edges, strict=True):
        size = min(edge, length)
        per_axis.append(
            [(slice(s, s + size), slice(a, b)) for s, a, b in axis_layout(length, edge, halo)]
        )
    return [
        Tile(source=(z[0], y[0], x[0]), core=(z[1], y[1], x[1]))
        for z in per_axis[0]
        for y in per_axis[1]
        for x in per_axis[2]
    ]


def allocate_map(
    shape: tuple[int, ...],
    dtype=np.float16,
    max_in_memory_voxels: int = MAP_IN_MEMORY_VOXELS,
    directory: str | None = None,
) -> np.ndarray:
    """A zeroed map: in memory when small, else a memmap on an already-unlinked temporary file."""
    voxels = int(np.prod(shape))
    if voxels <= max_in_memory_voxels:
        return np.zeros(shape, dtype=dtype)
    handle = tempfile.TemporaryFile(dir=directory, prefix="vpdetect-map-")
    return np.memmap(handle, dtype=dtype, mode="w+", shape=tuple(shape))


def _mmap_of(array: np.ndarray) -> mmap.mmap | None:
    """The shared memory map behind an array, if any (copy-on-write maps excluded:
    dropping their pages would lose what was written)."""
    base = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base
        if isinstance(base, np.memmap) and base.mode in ("c", "copyonwrite"):
            return None
        base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    return None


def release_pages(array: np.ndarray, stop: int, start: int = 0) -> None:
    """Tell the kernel rows `start:stop` (axis 0) of a memory-mapped array are done with for now.

    Their pages leave this process's resident memory; the page cache keeps
    them (a later read is a cheap minor fault) and written pages still reach
    the file. No-op for in-memory arrays.
    """
    mapping = _mmap_of(array)
    stop = min(stop, array.shape[0])
    start = max(start, 0)
    if mapping is None or stop <= start or not array.flags.c_contiguous:
        return
    start_address = np.frombuffer(mapping, dtype=np.uint8).__array_interface__["data"][0]
    offset = array.__array_interface__["data"][0] - start_address
    end = offset + stop * array.strides[0]
    begin = offset + start * array.strides[0]
    # Only whole pages inside the rows: a neighbour's page is never dropped.
    begin = (begin + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    end = end // mmap.PAGESIZE * mmap.PAGESIZE
    if end > begin:
        try:
            mapping.madvise(mmap.MADV_DONTNEED, begin, end - begin)
        except (OSError, ValueError, AttributeError):  # not supported here: memory is just not returned
            pass


class PageReleasingVolume:
    """A read-only view of a (memory-mapped) volume that releases slabs once read in z order.

    Lets a streaming reader such as `vpdetect.preprocess.zscore_params` sweep a
    large memmap without its pages piling up in resident memory.
    """

    def __init__(self, volume: np.ndarray) -> None:
        self.volume = volume
        self.shape = volume.shape
        self.dtype = volume.dtype

    def __getitem__(self, key):
        block = np.array(self.volume[key])
        if isinstance(key, slice) and key.start is not None:
            release_pages(self.volume, key.start)
        return block

    def release(self) -> None:
        release_pages(self.volume, self.shape[0])


def tile_shape(volume_shape: tuple[int, ...], tile) -> tuple[int, int, int]:
    """The input shape of every tile of a volume: `tile` (an edge or (z, y, x) edges) along
    each axis, or the axis if shorter."""
    edges = (tile,) * len(volume_shape) if np.isscalar(tile) else tuple(tile)
    return tuple(min(int(e), int(n)) for e, n in zip(edges, volume_shape, strict=True))  # type: ignore[return-value]


def recompute_factor(volume_shape: tuple[int, int, int], tile, halo: int) -> float:
    """Voxels the network computes (all tile inputs) per output voxel."""
    computed = 0
    for t in tile_layout(tuple(volume_shape), tile, halo):
        computed += int(np.prod([s.stop - s.start for s in t.source]))
    return computed / float(np.prod(volume_shape))


def streams_columns(model, device: str) -> bool:
    """True where the network runs as z-streamed full-depth columns (an MSDNet on the CPU)."""
    import torch

    from vpdetect.nn.msdnet import MSDNet

    return isinstance(model, MSDNet) and torch.device(device).type == "cpu"


def column_memory_bytes(model, shape: tuple[int, int, int], batch_size: int = 1, threads: int | None = None) -> int:
    """Memory of one CPU engine call on `batch_size` columns of `shape` (`stream_geometry`)."""
    import torch

    from vpdetect.nn.engine import stream_geometry

    return stream_geometry(model, tuple(shape), batch_size, threads or torch.get_num_threads()).bytes


def _column_edge(length: int, pieces: int, halo: int) -> int:
    """The window that cuts an axis into `pieces` cores with `halo` context where needed."""
    if pieces == 1:
        return length
    core = math.ceil(length / pieces)
    return min(length, core + (halo if pieces == 2 else 2 * halo))


def choose_columns(model, volume_shape, batch_size: int, halo: int, tile: int | None = None,
                   free: int | None = None, threads: int | None = None) -> tuple[int, int, int]:
    """(z, y, x) input shape of the full-depth columns the CPU engine streams.

    `tile=None`: the fewest voxels computed (least recomputation in x and y) among
    column layouts that take at most CPU_MEMORY_SHARE of the free memory; `tile` fixes
    the x-y edge (refused in one line when it exceeds MEMORY_LIMIT_SHARE of it).
    """
    from vpdetect.nn.engine import cached_plan_bytes

    depth_z, height, width = (int(n) for n in volume_shape)
    known = available_memory("cpu") if free is None else free
    if known is not None and free is None:
        # The engine's cached buffers (an earlier tomogram's) are reused or released.
        known += cached_plan_bytes(model)
    free = UNKNOWN_FREE_MEMORY if known is None else known
    if tile is not None:
        if tile < 1:
            raise VPDetectError(f"tile size must be positive, got {tile}")
        shape = (depth_z, min(tile, height), min(tile, width))
        need = column_memory_bytes(model, shape, batch_size, threads)
        if known is not None and need > MEMORY_LIMIT_SHARE * free:
            fits = next(
                (edge for edge in range((min(tile, max(height, width)) - 1) // 8 * 8, 7, -8)
                 if column_memory_bytes(model, (depth_z, min(edge, height), min(edge, width)), batch_size,
                                        threads) <= MEMORY_LIMIT_SHARE * free),
                None,
            )
            raise VPDetectError(
                f"--tile {tile} needs about {_gigabytes(need)} for {depth_z}-slice columns on the CPU, "
                f"but the machine has {_gigabytes(free)} free; "
                + (f"use --tile {fits} or less" if fits else "even --tile 8 does not fit; free some memory")
                + (" or a smaller --batch-size" if batch_size > 1 else "")
            )
        return shape
    best = None
    for ny in range(1, min(MAX_COLUMNS_PER_AXIS, height) + 1):
        for nx in range(1, min(MAX_COLUMNS_PER_AXIS, width) + 1):
            ty, tx = _column_edge(height, ny, halo), _column_edge(width, nx, halo)
            if (ty < height and ty <= 2 * halo) or (tx < width and tx <= 2 * halo):
                continue
            shape = (depth_z, ty, tx)
            if column_memory_bytes(model, shape, batch_size, threads) > CPU_MEMORY_SHARE * free:
                continue
            cost = len(axis_layout(height, ty, halo)) * ty * len(axis_layout(width, tx, halo)) * tx
            if best is None or cost < best[0]:
                best = (cost, shape)
    if best is None:  # not even the narrowest columns fit the share: take them anyway
        narrow = 2 * halo + 8
        return (depth_z, min(height, narrow), min(width, narrow))
    return best[1]


def tile_memory_bytes(model, shape: tuple[int, int, int], batch_size: int, bytes_per_value: int) -> int:
    """Memory one network call on `batch_size` tiles of `shape` needs, roughly: the MSDNet
    feature buffer (every map of every voxel) in the network's dtype, plus float32 input,
    logits and probabilities. The buffer dominates: ~100 maps per voxel."""
    voxels = int(np.prod(shape)) * int(batch_size)
    n_maps = int(getattr(model, "n_feature_maps", 1))
    n_classes = int(getattr(model, "n_classes", 2))
    return voxels * (n_maps * int(bytes_per_value) + 4 * (1 + 2 * n_classes))


def available_memory(device: str) -> int | None:
    """Free bytes for the network: the GPU's free memory, or the machine's available memory
    (None when it cannot be told)."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    from vpdetect.devices import available_cpu_memory

    return available_cpu_memory()


def _largest_tile(model, volume_shape, batch_size: int, bytes_per_value: int, budget: float) -> int:
    """The largest tile edge (a multiple of 8, at least 8) whose call fits `budget` bytes."""
    edge = max(int(n) for n in volume_shape)
    while edge > 8 and tile_memory_bytes(model, tile_shape(volume_shape, edge), batch_size,
                                         bytes_per_value) > budget:
        edge = (edge - 1) // 8 * 8 if edge % 8 else edge - 8
    return max(edge, 8)


def choose_tile(model, volume_shape, device: str, batch_size: int, bytes_per_value: int,
                tile: int | None = None, free: int | None = None, halo: int = DEFAULT_HALO_CAP):
    """The tile to use, checked against the memory there is: an edge, or (z, y, x) edges.

    An MSDNet on the CPU: full-depth columns (`choose_columns`, `tile` their x-y edge).
    Otherwise `tile=None`: DEFAULT_TILE on the CPU; on a GPU the largest tile whose call takes at most
    GPU_MEMORY_SHARE of the free memory (whole-tomogram tiles on big GPUs: no halo recomputed).
    A tile whose estimate exceeds MEMORY_LIMIT_SHARE of the free memory is refused in one line
    (a 512^3 tile of a paper-sized localizer needs ~27 GB in bf16), naming one that fits.
    `free` overrides the measured free memory (bytes).
    """
    import torch

    if streams_columns(model, device):
        return choose_columns(model, volume_shape, batch_size, halo, tile, free)
    free = available_memory(device) if free is None else free
    on_gpu = torch.device(device).type == "cuda"
    if tile is None:
        if not on_gpu or free is None:
            return DEFAULT_TILE
        return _largest_tile(model, volume_shape, batch_size, bytes_per_value, GPU_MEMORY_SHARE * free)
    if tile < 1:
        raise VPDetectError(f"tile size must be positive, got {tile}")
    need = tile_memory_bytes(model, tile_shape(volume_shape, tile), batch_size, bytes_per_value)
    if free is not None and need > MEMORY_LIMIT_SHARE * free:
        fits = _largest_tile(model, volume_shape, batch_size, bytes_per_value, MEMORY_LIMIT_SHARE * free)
        where = "GPU" if on_gpu else "machine"
        raise VPDetectError(
            f"--tile {tile}{f' x {batch_size} per batch' if batch_size > 1 else ''} needs about {_gigabytes(need)} for the network's "
            f"{getattr(model, 'n_feature_maps', 1)} feature maps per voxel on {device}, but the {where} has "
            f"{_gigabytes(free)} free; use --tile {fits} or less"
            + (" or a smaller --batch-size" if batch_size > 1 else "")
        )
    return int(tile)


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _batches(tiles: list[Tile], size: int) -> Iterator[list[Tile]]:
    for start in range(0, len(tiles), size):
        yield tiles[start : start + size]


def predictor(model, precision: str = "auto", device: str = "cpu") -> Callable:
    """The fastest `predict` for a model in `precision`: vpdetect's inference engine for an
    MSDNet (same probabilities as `MSDNet.predict`), else the module's own `predict`."""
    from vpdetect.nn.msdnet import MSDNet
    from vpdetect.nn.precision import inference_arithmetic, resolve_precision

    if isinstance(model, MSDNet):
        from vpdetect.nn.engine import fast_predict

        return functools.partial(fast_predict, model, precision=precision)
    arithmetic = resolve_precision(precision, device)

    def predict(x, progress=None):
        with inference_arithmetic(arithmetic, device):
            return model.predict(x)

    return predict


def predict_map(
    model,
    volume: np.ndarray,
    mean: float,
    std: float,
    tile=DEFAULT_TILE,
    halo: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    out: np.ndarray | None = None,
    precision: str = "auto",
    timings: dict | None = None,
    clip: float | None = None,
    flips: int = 1,
) -> np.ndarray:
    """Foreground probability map [z, y, x] of `volume` by tiled inference.

    `model.predict(x)` must return class probabilities (N, C, D, H, W) with
    class 0 the background; the foreground is the sum of the other classes.
    An MSDNet runs through `vpdetect.nn.engine.fast_predict` (same result).
    `tile`: an edge or (z, y, x) edges (`choose_tile`).
    `halo=None` uses `model.halo` (exact). `out` may be a preallocated map
    (float16, float32 or a memmap); by default a float32 array is returned.
    `progress(done, total)` is called after each batch of tiles, and after each step
    of a z-streamed column, counting tile planes; `timings` (if given) accumulates
    seconds under "network" and "stitch". `flips` > 1 averages the foreground over that many
    axis flips of each tile (`vpdetect.nn.flips`), one network pass each.
    """
    import torch

    from vpdetect.nn.flips import flip_averaged

    halo = int(model.halo if halo is None else halo)
    if min(np.atleast_1d(tile)) < 1 or batch_size < 1 or halo < 0:
        raise VPDetectError("tile and batch size must be positive and the halo non-negative")
    if out is None:
        out = np.zeros(volume.shape, dtype=np.float32)
    elif tuple(out.shape) != tuple(volume.shape):
        raise ValueError(f"map shape {out.shape} differs from the volume's {volume.shape}")
    tiles = tile_layout(tuple(volume.shape), tile, halo)
    timings = {} if timings is None else timings
    timings.setdefault("network", 0.0)
    timings.setdefault("stitch", 0.0)
    model.eval()
    predict = predictor(model, precision, device)
    planes = tile_shape(tuple(volume.shape), tile)[0] * flips
    total = len(tiles) * planes
    done = 0
    with torch.inference_mode():
        for batch in _batches(tiles, batch_size):
            start = time.perf_counter()
            crops = np.stack([normalise(volume[t.source], mean, std, clip) for t in batch])[:, None]
            inputs = torch.from_numpy(crops).to(device)
            passes = iter(range(flips))

            def one_pass(x, batch=batch, base=done, passes=passes):
                if not streams_columns(model, device):
                    return predict(x)
                start_plane = next(passes) * x.shape[2]

                def within(finished, _planes):
                    if progress is not None:
                        progress(base + (start_plane + finished) * len(batch), total)

                # Timing the kernels pays only when the tile shape recurs often.
                return predict(x, progress=within, measure=len(tiles) * flips >= MEASURE_MIN_TILES)

            probs = flip_averaged(one_pass, inputs, flips)
            foreground = probs[:, 1:].sum(dim=1).float().cpu().numpy()
            middle = time.perf_counter()
            for t, fg in zip(batch, foreground, strict=True):
                out[t.core] = fg[t.core_in_tile]
            # Memory-mapped input and map pages of this batch leave resident memory:
            # neighbours re-read them from the page cache.
            release_pages(volume, batch[-1].source[0].stop, batch[0].source[0].start)
            release_pages(out, batch[-1].core[0].stop, batch[0].core[0].start)
            timings["network"] += middle - start
            timings["stitch"] += time.perf_counter() - middle
            done += len(batch) * planes
            if progress is not None:
                progress(done, total)
    if isinstance(out, np.memmap):
        out.flush()
    return out
