import numpy as np
import pytest
import torch

from vpdetect.errors import VPDetectError
from vpdetect.io.mrc import read_tomogram, write_mrc
from vpdetect.localize.tiling import (
    PageReleasingVolume,
    allocate_map,
    axis_layout,
    predict_map,
    tile_layout,
)
from vpdetect.nn.msdnet import MSDNet
from vpdetect.preprocess import normalise, zscore_params


def small_net(seed=0, n_classes=2):
    torch.manual_seed(seed)
    net = MSDNet(in_channels=1, n_classes=n_classes, width=2, depth=3, max_dilation=2)
    # Random biases so that the border handling matters everywhere.
    with torch.no_grad():
        for bias in net.layer_biases:
            bias.normal_(0, 0.3)
    return net.eval()


def whole_volume_foreground(net, volume, mean, std):
    x = torch.from_numpy(normalise(volume, mean, std))[None, None]
    probs = net.predict(x)[0]
    return probs[1:].sum(dim=0).numpy()


@pytest.mark.parametrize("length,tile,halo", [(50, 20, 6), (37, 16, 3), (20, 20, 5), (9, 32, 4), (33, 17, 8)])
def test_axis_layout_cores_partition_and_keep_context(length, tile, halo):
    layout = axis_layout(length, tile, halo)
    size = min(tile, length)
    covered = np.zeros(length, int)
    for source, start, stop in layout:
        assert 0 <= source and source + size <= length
        assert source <= start < stop <= source + size
        covered[start:stop] += 1
        # Context on each side is either `halo` voxels or the tomogram's face.
        assert start - source >= halo or source == 0
        assert source + size - stop >= halo or source + size == length
    assert np.all(covered == 1)


def test_tile_smaller_than_twice_the_halo_is_refused():
    with pytest.raises(VPDetectError, match="larger than twice the halo"):
        axis_layout(100, 10, 5)


def test_tile_layout_covers_every_voxel_once():
    shape = (13, 29, 31)
    counts = np.zeros(shape, int)
    tiles = tile_layout(shape, 12, 3)
    for t in tiles:
        counts[t.core] += 1
        assert all(s.stop - s.start == min(12, n) for s, n in zip(t.source, shape, strict=True))
    assert np.all(counts == 1)
    # z-major order: core starts along z never decrease.
    z_starts = [t.core[0].start for t in tiles]
    assert z_starts == sorted(z_starts)


@pytest.mark.parametrize("tile,batch_size", [(19, 1), (23, 3)])
def test_tiled_map_equals_whole_volume_pass(rng, tile, batch_size):
    net = small_net()
    volume = rng.normal(5.0, 2.0, size=(26, 33, 30)).astype(np.float32)
    mean, std = zscore_params(volume)
    reference = whole_volume_foreground(net, volume, mean, std)
    assert net.halo == 6
    tiled = predict_map(net, volume, mean, std, tile=tile, halo=net.halo, batch_size=batch_size)
    assert tiled.shape == volume.shape and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, reference, atol=1e-4)
    # Not a trivial map: the probabilities vary.
    assert reference.std() > 1e-3


def test_capped_halo_differs_only_slightly_and_multiclass_foreground(rng):
    net = small_net(seed=3, n_classes=3)
    volume = rng.normal(size=(24, 24, 24)).astype(np.float32)
    mean, std = zscore_params(volume)
    reference = whole_volume_foreground(net, volume, mean, std)
    capped = predict_map(net, volume, mean, std, tile=14, halo=2)
    difference = np.abs(capped - reference)
    assert difference.max() > 1e-6  # the cap is real: context was cut
    assert difference.mean() < 0.05


def test_progress_and_timings_are_reported(rng):
    net = small_net()
    volume = rng.normal(size=(20, 20, 20)).astype(np.float32)
    calls, timings = [], {}
    predict_map(net, volume, 0.0, 1.0, tile=16, halo=4, batch_size=3,
                progress=lambda done, total: calls.append((done, total)), timings=timings)
    # Counted in tile planes: 8 tiles of 16 planes, reported after each batch of 3 tiles.
    n_tiles = len(tile_layout(volume.shape, 16, 4))
    assert calls[-1] == (n_tiles * 16, n_tiles * 16)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert timings["network"] > 0 and timings["stitch"] >= 0
    # Full-depth columns streamed along z report within each column too.
    calls.clear()
    deep = rng.normal(size=(400, 20, 20)).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # steps of about 2 x 41 planes of 22 x 22 (with the pitch padding)
    try:
        predict_map(net, deep, 0.0, 1.0, tile=(400, 20, 20), halo=4,
                    progress=lambda done, total: calls.append((done, total)))
    finally:
        torch.set_num_threads(threads)
    assert len(calls) >= 3 and calls[-1] == (400, 400)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_memory_mapped_volume_into_float16_memmap(tmp_path, rng):
    net = small_net()
    volume = rng.normal(size=(22, 25, 21)).astype(np.float32)
    write_mrc(tmp_path / "t.mrc", volume)
    tomo = read_tomogram(tmp_path / "t.mrc", mmap=True)
    assert isinstance(tomo.data, np.memmap)
    mean, std = zscore_params(PageReleasingVolume(tomo.data))
    np.testing.assert_allclose((mean, std), zscore_params(volume), rtol=1e-6)
    out = allocate_map(volume.shape, np.float16, max_in_memory_voxels=100)
    assert isinstance(out, np.memmap)
    result = predict_map(net, tomo.data, mean, std, tile=14, halo=6, out=out)
    reference = whole_volume_foreground(net, volume, mean, std)
    np.testing.assert_allclose(result.astype(np.float32), reference, atol=1e-3)


def test_any_module_with_predict_and_halo_works(rng):
    class Smooth(torch.nn.Module):
        halo = 2

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 5, padding=2)

        def predict(self, x):
            return torch.softmax(self.conv(x), dim=1)

    torch.manual_seed(1)
    net = Smooth().eval()
    volume = rng.normal(size=(17, 18, 19)).astype(np.float32)
    with torch.no_grad():
        reference = net.predict(torch.from_numpy(volume)[None, None])[0, 1].numpy()
    np.testing.assert_allclose(predict_map(net, volume, 0.0, 1.0, tile=9), reference, atol=1e-5)


def test_unknown_precision_is_refused(rng):
    with pytest.raises(VPDetectError, match="precision"):
        predict_map(small_net(), np.ones((8, 8, 8), np.float32), 0.0, 1.0, tile=8, precision="fp8")


def test_released_pages_keep_their_data(tmp_path):
    from vpdetect.localize.tiling import release_pages

    shared = np.memmap(tmp_path / "shared.bin", dtype=np.float32, mode="w+", shape=(64, 32, 32))
    shared[:] = np.arange(shared.size, dtype=np.float32).reshape(shared.shape)
    release_pages(shared, 60, 2)
    assert shared[30, 5, 5] == 30 * 1024 + 5 * 32 + 5  # re-read from the page cache
    private = np.memmap(tmp_path / "shared.bin", dtype=np.float32, mode="c", shape=(64, 32, 32))
    private[:] = -1.0  # copy-on-write: only in this process
    release_pages(private, 64)
    assert np.all(private[:, 0, 0] == -1.0)
    in_memory = np.ones((8, 8, 8))
    release_pages(in_memory, 8)  # nothing to release, nothing breaks
    assert in_memory.sum() == 512


# --------------------------------------------------------------------------- tile size and memory


def paper_localizer():
    return MSDNet(in_channels=1, n_classes=2, width=2, depth=49, max_dilation=7)  # 99 maps per voxel


def test_tile_memory_estimate_by_hand():
    from vpdetect.localize.tiling import tile_memory_bytes

    net = paper_localizer()
    # 512^3 voxels x (99 maps x 2 bytes + float32 input, logits and probabilities: 4 x 5)
    assert tile_memory_bytes(net, (512, 512, 512), 1, 2) == 512**3 * (99 * 2 + 20)
    assert tile_memory_bytes(net, (512, 512, 512), 1, 2) / 1e9 == pytest.approx(29.3, abs=0.1)
    assert tile_memory_bytes(net, (10, 20, 30), 3, 4) == 3 * 6000 * (99 * 4 + 20)


def test_a_tile_too_large_for_the_gpu_is_refused_naming_one_that_fits():
    from vpdetect.localize.tiling import choose_tile, tile_memory_bytes

    net = paper_localizer()
    free = 20 * 10**9
    with pytest.raises(VPDetectError, match=r"--tile 512 .* 29\.3 GB .* 20\.0 GB free; use --tile 432 or less"):
        choose_tile(net, (512, 512, 512), "cuda:0", 1, 2, tile=512, free=free)
    message = ""
    try:
        choose_tile(net, (512, 512, 512), "cuda:0", 1, 2, tile=512, free=free)
    except VPDetectError as exc:
        message = str(exc)
    fits = int(message.rsplit("--tile ", 1)[1].split()[0])
    assert fits % 8 == 0
    assert tile_memory_bytes(net, (fits,) * 3, 1, 2) <= 0.9 * free < tile_memory_bytes(net, (fits + 8,) * 3, 1, 2)
    assert choose_tile(net, (512, 512, 512), "cuda:0", 1, 2, tile=fits, free=free) == fits
    # A tile is never larger than the tomogram: --tile 4096 on a thin slab costs the slab only.
    assert choose_tile(net, (40, 64, 64), "cuda:0", 1, 2, tile=4096, free=free) == 4096
    with pytest.raises(VPDetectError, match="smaller --batch-size"):
        choose_tile(net, (512, 512, 512), "cpu", 8, 4, tile=256, free=free)


def test_default_tile_cpu_columns_gpu_from_free_memory():
    from vpdetect.localize.tiling import (
        CPU_MEMORY_SHARE,
        DEFAULT_TILE,
        choose_tile,
        column_memory_bytes,
        recompute_factor,
        tile_memory_bytes,
    )

    net = paper_localizer()
    # CPU: full-depth columns streamed along z; with memory to spare, the whole tomogram.
    assert choose_tile(net, (512, 512, 512), "cpu", 1, 4, free=10**12, halo=24) == (512, 512, 512)
    # Less memory: narrower columns, as few as fit the share, recomputing only x-y halos.
    free = 12 * 10**9
    shape = choose_tile(net, (200, 512, 512), "cpu", 1, 4, free=free, halo=24)
    assert shape[0] == 200 and min(shape[1:]) < 512
    assert column_memory_bytes(net, shape) <= CPU_MEMORY_SHARE * free
    assert 1.0 < recompute_factor((200, 512, 512), shape, 24) < 1.5
    # Other networks keep cubic tiles on the CPU.
    smooth = torch.nn.Conv3d(1, 2, 3)
    assert choose_tile(smooth, (512, 512, 512), "cpu", 1, 4, free=10**12) == DEFAULT_TILE
    # A 141 GB GPU takes a 512^3 tomogram in one tile (fp32 maps: ~53 GB, under half the memory).
    assert choose_tile(net, (512, 512, 512), "cuda:0", 1, 4, free=141 * 10**9) == 512
    tile = choose_tile(net, (512, 512, 512), "cuda:0", 1, 4, free=16 * 10**9)
    assert tile_memory_bytes(net, (tile,) * 3, 1, 4) <= 8 * 10**9 < tile_memory_bytes(net, (tile + 8,) * 3, 1, 4)


def test_bundled_localizer_recomputes_little_on_the_cpu():
    # The CPU default for the bundled localizer on common sizes, with 8 GB free.
    from vpdetect.localize.pipeline import LocalizeOptions
    from vpdetect.localize.tiling import recompute_factor
    from vpdetect.models import default_model_path
    from vpdetect.nn.checkpoint import load_model

    net, _ = load_model(default_model_path("localizer"), stage="localizer")
    options = LocalizeOptions()
    for shape in ((256, 256, 256), (200, 512, 512), (300, 1024, 1024)):
        tile = options.resolved_tile(net, shape, free=8 * 10**9)
        assert tile[0] == shape[0]
        assert recompute_factor(shape, tile, options.resolved_halo(net)) < 1.3


@pytest.mark.parametrize("tile", [(26, 33, 30), (26, 19, 17), (26, 33, 16)])
def test_streamed_columns_equal_whole_volume_pass(rng, tile):
    # A deep volume (the ring holds fewer planes than the volume) in one or several columns.
    net = small_net(seed=5)
    volume = rng.normal(size=(61, 33, 30)).astype(np.float32)
    mean, std = zscore_params(volume)
    reference = whole_volume_foreground(net, volume, mean, std)
    got = predict_map(net, volume, mean, std, tile=(61, *tile[1:]), halo=net.halo)
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_localize_refuses_a_tile_too_large_before_any_work(monkeypatch):
    from vpdetect.io.mrc import Tomogram
    from vpdetect.localize import tiling
    from vpdetect.localize.pipeline import LocalizeOptions, segment_volume

    free = 12 * 10**6
    monkeypatch.setattr(tiling, "available_memory", lambda device: free)
    net = small_net()
    tomo = Tomogram(np.random.default_rng(0).normal(size=(32, 128, 128)).astype(np.float32))
    card = {"stage": "localizer", "class_names": ["background", "particle"], "normalisation": "zscore"}
    # On the CPU --tile is the x-y edge of full-depth columns.
    with pytest.raises(VPDetectError, match=r"--tile 128 .*32-slice columns.* use --tile \d+ or less") as error:
        segment_volume(tomo, net, card, LocalizeOptions(tile=128))
    fits = int(str(error.value).rsplit("--tile ", 1)[1].split()[0])
    assert fits % 8 == 0 and 8 <= fits < 128
    assert tiling.column_memory_bytes(net, (32, fits, fits)) <= 0.9 * free
    assert tiling.column_memory_bytes(net, (32, fits + 8, fits + 8)) > 0.9 * free


def test_statistics_read_a_bounded_number_of_voxels_at_once(rng):
    from vpdetect.preprocess import volume_stats

    class Recording:
        """A volume that records how many voxels each read returns."""

        def __init__(self, data):
            self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

        def __getitem__(self, key):
            block = self.data[key]
            self.reads.append(block.size)
            return block

    # uint16-like data: a large offset must not cancel the variance away
    volume = (30000 + rng.normal(0, 3, size=(6, 40, 50))).astype(np.float32)
    recording = Recording(volume)
    mean, std = volume_stats(recording, block_voxels=700)
    assert max(recording.reads) == 2000  # one plane (40 x 50) when a plane exceeds the block
    wide = volume.astype(np.float64)
    assert mean == pytest.approx(wide.mean(), rel=1e-12) and std == pytest.approx(wide.std(), rel=1e-9)
    recording = Recording(volume)
    volume_stats(recording, block_voxels=4000)
    assert max(recording.reads) == 4000 and len(recording.reads) == 3  # two planes per read
    with pytest.raises(VPDetectError, match="NaN"):
        volume[5, 39, 49] = np.nan
        volume_stats(volume, block_voxels=700)


@pytest.mark.parametrize("tile,flips", [((26, 33, 30), 2), ((26, 19, 17), 4), (15, 8)])
def test_test_time_flips_average_whole_volume_passes_of_the_flipped_tomogram(rng, tile, flips):
    # Flipping each tile (with its symmetric halo) gives the map of the flipped tomogram, so the
    # tiled average equals the mean of whole-volume passes over the flips, each flipped back.
    from vpdetect.nn.flips import FLIP_DIMS

    net = small_net(seed=7)
    volume = rng.normal(size=(26, 33, 30)).astype(np.float32)
    mean, std = zscore_params(volume)
    passes = []
    for dims in FLIP_DIMS[:flips]:
        axes = tuple(d - 2 for d in dims)  # (N, C, D, H, W) dims -> (z, y, x) axes
        flipped = np.ascontiguousarray(np.flip(volume, axes))
        passes.append(np.flip(whole_volume_foreground(net, flipped, mean, std), axes))
    reference = np.mean(passes, axis=0)
    calls = []
    got = predict_map(net, volume, mean, std, tile=tile, halo=net.halo, flips=flips,
                      progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_allclose(got, reference, atol=1e-5)
    # The flips see different context: the average is not the unflipped map.
    assert np.abs(reference - passes[0]).max() > 1e-4
    # Progress counts every pass's planes and ends at the total.
    assert calls[-1][0] == calls[-1][1] and all(a <= b for (a, _), (b, _) in zip(calls[:-1], calls[1:], strict=True))


def test_localizer_flips_come_from_the_card_unless_given():
    from vpdetect.localize.pipeline import LocalizeOptions

    card = {"test_time_flips": 2}
    assert LocalizeOptions().with_model_defaults(card).flips == 2
    assert LocalizeOptions(flips=1).with_model_defaults(card).flips == 1
    assert LocalizeOptions().with_model_defaults({}).flips == 1
    for bad in (9, 0, 1.5, "two", None):
        with pytest.raises(VPDetectError, match="test-time flips must be a whole number from 1 to 8"):
            LocalizeOptions().with_model_defaults({"test_time_flips": bad})


def test_column_choice_counts_the_engines_cached_buffers_as_free(monkeypatch, rng):
    # A second tomogram of the same shape must get the same columns as the first, and
    # reuse the buffers, not see its own cached buffers as used memory and narrow its columns.
    from vpdetect.localize import tiling
    from vpdetect.nn.engine import cached_plan_bytes, fast_predict

    net = small_net(seed=3)
    shape = (20, 40, 40)
    whole = tiling.column_memory_bytes(net, shape)
    assert cached_plan_bytes(net) == 0
    fast_predict(net, torch.from_numpy(rng.normal(size=(1, 1, *shape)).astype(np.float32)), measure=False)
    held = cached_plan_bytes(net)
    assert held >= whole
    # Free memory as the machine reports it with those buffers allocated: too little alone.
    free_now = int(whole / tiling.CPU_MEMORY_SHARE) - held + 1
    monkeypatch.setattr(tiling, "available_memory", lambda device: free_now)
    assert tiling.choose_columns(net, shape, 1, net.halo, free=free_now)[1:] != shape[1:]
    assert tiling.choose_columns(net, shape, 1, net.halo) == shape


def test_a_plan_that_does_not_fit_beside_the_cached_ones_evicts_them(monkeypatch):
    from vpdetect.nn import engine as engine_module

    net = small_net(seed=4)
    engine = engine_module.InferenceEngine(net, threads=1, kernel="engine")
    engine.predict(torch.randn(1, 1, 12, 20, 20))
    engine.predict(torch.randn(1, 1, 12, 24, 24))
    assert len(engine._plans) == 2
    # Plenty of memory: the latest two are kept.
    engine.predict(torch.randn(1, 1, 12, 28, 28))
    assert len(engine._plans) == 2
    # Memory for the new plan only: the cached ones go first, the result is unchanged.
    monkeypatch.setattr(engine_module, "available_cpu_memory", lambda: engine_module.PLAN_MEMORY_RESERVE + 1)
    x = torch.randn(1, 1, 12, 32, 32)
    got = engine.predict(x)
    assert list(engine._plans) == [(12, 32, 32, 1, 1)]
    assert torch.allclose(got, net.predict(x), atol=1e-5, rtol=0)
