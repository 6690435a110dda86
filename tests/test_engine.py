"""The fast inference engine must give MSDNet.predict's probabilities (within 1e-4)."""

import functools
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vpdetect.errors import VPDetectError
from vpdetect.nn.engine import InferenceEngine, engine_for, fast_predict
from vpdetect.nn.msdnet import MSDNet
from vpdetect.nn.reference import concat_forward, concat_predict

# The streaming engine itself (not the kernel measured fastest on this machine).
Engine = functools.partial(InferenceEngine, kernel="engine")


def random_net(in_channels, n_classes, width, depth, max_dilation, seed=0):
    """An MSDNet with random weights and non-zero biases (the default init zeroes them)."""
    torch.manual_seed(seed)
    model = MSDNet(in_channels, n_classes, width, depth, max_dilation).eval()
    with torch.no_grad():
        for bias in model.layer_biases:
            bias.normal_(0.0, 0.3)
        model.final.bias.normal_(0.0, 0.3)
        model.final.weight.mul_(4.0)  # sharper softmax, so errors are not hidden near 1/K
    return model


@pytest.mark.parametrize(
    ("arch", "shape", "batch"),
    [
        ((1, 2, 2, 9, 7), (13, 11, 9), 2),  # the localizer's w and M, shallow
        ((1, 2, 2, 12, 5), (9, 15, 10), 1),  # the classifier's w and M
        ((2, 3, 3, 5, 4), (7, 12, 17), 3),  # several input channels and classes, odd width
        ((1, 4, 1, 8, 3), (16, 5, 6), 2),  # width 1
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_engine_matches_predict(arch, shape, batch, threads):
    model = random_net(*arch)
    x = torch.randn(batch, arch[0], *shape)
    expected = model.predict(x)
    # Small slabs so that every volume spans several slabs and slab edges are exercised.
    got = Engine(model, threads=threads, slab_columns=400).predict(x)
    assert got.shape == expected.shape
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    assert torch.allclose(got.sum(dim=1), torch.ones(batch, *shape), atol=1e-5)


def test_engine_volume_thinner_than_dilation():
    # Taps reaching beyond every face: planes fewer than the dilation in each axis.
    model = random_net(1, 2, 2, 6, 6)
    x = torch.randn(2, 1, 1, 3, 2)
    got = Engine(model, threads=2).predict(x)
    assert torch.allclose(got, concat_predict(model, x), atol=1e-4, rtol=0)


def test_engine_default_slab_and_threads_on_larger_volume():
    model = random_net(1, 2, 2, 7, 7, seed=3)
    x = torch.randn(1, 1, 24, 31, 29)
    got = Engine(model).predict(x)
    assert torch.allclose(got, model.predict(x), atol=1e-4, rtol=0)


def test_engine_reuses_buffers_across_shapes_and_calls():
    model = random_net(1, 2, 2, 5, 3)
    engine = Engine(model, threads=2, slab_columns=300)
    a = torch.randn(1, 1, 10, 9, 8)
    b = torch.randn(1, 1, 6, 7, 12)
    first = engine.predict(a)
    assert torch.allclose(engine.predict(b), model.predict(b), atol=1e-4, rtol=0)
    # The buffers are reused: stale maps from earlier calls must not leak into results.
    assert torch.equal(engine.predict(a), first)
    assert torch.allclose(first, model.predict(a), atol=1e-4, rtol=0)


def test_engine_restores_thread_count():
    torch.set_num_threads(2)
    model = random_net(1, 2, 2, 3, 3)
    Engine(model, threads=2).predict(torch.randn(1, 1, 8, 8, 8))
    assert torch.get_num_threads() == 2


def test_engine_accepts_float64_input():
    model = random_net(1, 2, 2, 4, 3)
    x = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    got = Engine(model, threads=1).predict(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got, model.predict(x.float()), atol=1e-4, rtol=0)


def test_fast_predict_caches_engine_and_follows_weight_updates():
    model = random_net(1, 2, 2, 4, 3)
    x = torch.randn(1, 1, 9, 9, 9)
    before = fast_predict(model, x)
    assert engine_for(model) is engine_for(model)
    with torch.no_grad():
        model.layer_weights[2].mul_(-2.0)
        model.final.bias.add_(1.0)
    after = fast_predict(model, x)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, model.predict(x), atol=1e-4, rtol=0)


def test_engine_cache_does_not_keep_models_alive():
    from vpdetect.nn import engine as engine_module

    model = random_net(1, 2, 2, 3, 3)
    fast_predict(model, torch.randn(1, 1, 6, 6, 6))
    assert model in engine_module._ENGINES
    before = len(engine_module._ENGINES)
    del model
    gc.collect()
    assert len(engine_module._ENGINES) == before - 1


def test_engine_rejects_bad_input_and_options():
    model = random_net(2, 2, 2, 3, 3)
    with pytest.raises(VPDetectError, match="expects input"):
        Engine(model).predict(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(VPDetectError, match="expects input"):
        Engine(model).predict(torch.randn(2, 8, 8, 8))
    with pytest.raises(VPDetectError, match="precision"):
        Engine(model, precision="int8")
    with pytest.raises(VPDetectError, match="precision"):
        fast_predict(model, torch.randn(1, 2, 4, 4, 4), precision="float64")
    with pytest.raises(VPDetectError, match="threads"):
        Engine(model, threads=0)


def test_concat_reference_matches_model():
    # The benchmark's baseline must compute the same network.
    model = random_net(2, 3, 2, 6, 4)
    x = torch.randn(2, 2, 9, 8, 7)
    with torch.no_grad():
        assert torch.allclose(concat_forward(model, x), model(x), atol=1e-5, rtol=0)
    assert torch.allclose(concat_predict(model, x), model.predict(x), atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("precision", "tolerance"), [(None, 5e-3), ("fp32", 5e-3), ("bf16", 5e-2), ("auto", 5e-2)]
)
def test_engine_cuda_close_to_cpu(precision, tolerance):
    torch.manual_seed(0)
    model = random_net(1, 2, 2, 8, 7)
    x = torch.randn(2, 1, 20, 18, 16)
    expected = model.predict(x)
    cuda_model = random_net(1, 2, 2, 8, 7).cuda()
    cuda_model.load_state_dict(model.state_dict())
    got = fast_predict(cuda_model, x, precision=precision)
    assert got.is_cuda and got.dtype == torch.float32
    assert (got.cpu() - expected).abs().max().item() < tolerance


def test_engine_inside_and_outside_inference_mode():
    # Tiling runs under inference_mode (thread-local, so the workers must enter it too);
    # the classifier under no_grad; the same cached buffers serve both.
    model = random_net(1, 2, 2, 5, 4)
    x = torch.randn(1, 1, 12, 10, 11)
    expected = model.predict(x)
    engine = Engine(model, threads=2, slab_columns=300)
    with torch.inference_mode():
        inside = engine.predict(x)
    outside = engine.predict(x)
    with torch.inference_mode():
        fresh = Engine(model, threads=2).predict(x)
    again = engine.predict(x)
    for got in (inside, outside, fresh, again):
        assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    outside.mul_(2.0)  # what model.predict returns outside inference mode is a normal tensor


@pytest.mark.parametrize(
    ("arch", "shape", "batch", "threads", "slab_columns"),
    [
        ((1, 2, 2, 3, 2), (40, 7, 6), 1, 2, 60),
        ((1, 2, 2, 4, 3), (33, 9, 8), 3, 2, 100),  # three boxes side by side
        ((1, 3, 1, 5, 2), (50, 5, 5), 2, 3, 30),
        ((2, 2, 2, 6, 4), (61, 10, 12), 2, 1, 200),
    ],
)
def test_engine_streams_volumes_deeper_than_its_ring(arch, shape, batch, threads, slab_columns):
    model = random_net(*arch)
    engine = Engine(model, threads=threads, slab_columns=slab_columns)
    geometry = engine.geometry(shape, batch, threads)
    # Only the ring's planes are resident: the network's reach along z plus one step.
    assert geometry.groups[0][2] == sum(max(d) for d in model.dilations) + geometry.step < shape[0]
    x = torch.randn(batch, arch[0], *shape)
    calls = []
    got = engine.predict(x, progress=lambda done, total: calls.append((done, total)))
    assert torch.allclose(got, model.predict(x), atol=1e-5, rtol=0)
    assert len(calls) > 1 and calls[-1] == (shape[0], shape[0])
    # Whatever the threads and step, the same numbers up to the multiply's blocking.
    other = Engine(model, threads=1, slab_columns=10**6).predict(x)
    assert torch.allclose(got, other, atol=1e-6, rtol=0)
    assert torch.equal(engine.predict(x), got)


def test_engine_boxes_in_one_pass_equal_boxes_one_by_one():
    # Lanes side by side share each multiply; zero gutters keep them apart exactly.
    model = random_net(1, 4, 2, 10, 5, seed=2)
    x = torch.randn(8, 1, 12, 12, 12)
    engine = Engine(model, threads=2)
    together = engine.predict(x)
    alone = torch.cat([engine.predict(x[i : i + 1]) for i in range(8)])
    assert torch.allclose(together, alone, atol=1e-6, rtol=0)
    assert torch.allclose(together, model.predict(x), atol=1e-5, rtol=0)


def test_engine_measures_the_fastest_kernel_per_shape():
    model = random_net(1, 3, 2, 6, 4, seed=4)
    engine = InferenceEngine(model, threads=1)
    x = torch.randn(4, 1, 10, 10, 10)
    first = engine.predict(x)
    key = ((1, 10, 10, 10), 1)
    assert set(engine.kernel_times[key]) == {"engine", "gemm", "conv"}
    assert engine.kernels[key] == min(engine.kernel_times[key], key=engine.kernel_times[key].get)
    # A smaller last batch keeps the choice (no new measurement).
    engine.predict(x[:3])
    assert list(engine.kernels) == [key]
    assert torch.allclose(first, model.predict(x), atol=1e-5, rtol=0)
    assert torch.allclose(engine.predict(x), first, atol=1e-5, rtol=0)
    assert "measured on 4" in engine.kernel_summary() and "10x10x10" in engine.kernel_summary()
    assert model.method == "auto"  # restored after trying the alternatives
    # Inputs whose whole buffer is too large for the alternatives always stream.
    from vpdetect.nn import engine as engine_module

    big = InferenceEngine(model, threads=1)
    original = engine_module.TRY_WHOLE_BUFFER_BYTES
    engine_module.TRY_WHOLE_BUFFER_BYTES = 1000
    try:
        big.predict(x)
    finally:
        engine_module.TRY_WHOLE_BUFFER_BYTES = original
    assert big.kernels[key] == "engine" and big.kernel_times[key] == {}
    with pytest.raises(VPDetectError, match="kernel"):
        InferenceEngine(model, kernel="winograd")


@pytest.mark.parametrize(
    ("arch", "shape", "batch", "threads"),
    [((1, 2, 2, 5, 3), (9, 23, 11), 1, 2), ((1, 2, 2, 4, 4), (12, 17, 9), 3, 2), ((2, 2, 2, 6, 4), (15, 10, 12), 2, 1)],
)
def test_engine_multiplies_large_planes_in_bands_of_rows(monkeypatch, arch, shape, batch, threads):
    from vpdetect.nn import engine as engine_module

    monkeypatch.setattr(engine_module, "BAND_COLUMNS", 150)  # so that these small planes are banded
    model = random_net(*arch)
    x = torch.randn(batch, arch[0], *shape)
    engine = Engine(model, threads=threads, slab_columns=100)
    got = engine.predict(x)
    plan = next(iter(engine._plans.values()))
    assert 1 <= plan.band_rows < shape[1]
    assert torch.allclose(got, model.predict(x), atol=1e-5, rtol=0)


def test_allocation_time_is_counted_once_per_plan():
    from vpdetect.nn.engine import allocation_seconds

    model = random_net(1, 2, 2, 3, 2)
    assert allocation_seconds(model) == 0.0
    x = torch.randn(1, 1, 8, 12, 12)
    fast_predict(model, x, measure=False)
    first = allocation_seconds(model)
    assert first > 0.0
    fast_predict(model, x, measure=False)  # the same shape reuses the plan's buffers
    assert allocation_seconds(model) == first
    fast_predict(model, torch.randn(1, 1, 8, 16, 16), measure=False)
    assert allocation_seconds(model) > first


def test_map_groups_known_answer():
    from vpdetect.nn.engine import map_groups

    # Largest dilation per layer (w=2, M=3): 2, 3, 3, 2, 3; reach 13.
    model = random_net(1, 2, 2, 5, 3)
    assert [max(d) for d in model.dilations] == [2, 3, 3, 2, 3]
    # The input map with the first two layers (5 maps) keeps the whole reach plus a step;
    # layers 2-3 the reach of layers 2.. (8), layer 4 its own (3).
    assert map_groups(model, 100, 2, 4) == ((0, 5, 15), (5, 9, 10), (9, 11, 5))
    assert map_groups(model, 8, 2, 4) == ((0, 5, 8), (5, 9, 8), (9, 11, 5))  # at most every plane
    assert map_groups(model, 100, 2, 1000) == ((0, 11, 15),)  # one group: one ring for all


@pytest.mark.parametrize(
    ("arch", "shape", "batch", "threads", "slab_columns", "group_maps"),
    [
        ((1, 2, 2, 6, 3), (40, 7, 6), 1, 2, 60, 1),  # every layer its own ring
        ((1, 3, 2, 7, 4), (45, 9, 8), 2, 2, 100, 3),
        ((2, 2, 3, 5, 3), (38, 6, 7), 2, 1, 30, 4),  # several input channels in the first group
        ((1, 2, 1, 9, 2), (40, 9, 8), 1, 3, 100, 2),
    ],
)
def test_engine_map_groups_hold_fewer_planes_and_give_the_same_map(
    monkeypatch, arch, shape, batch, threads, slab_columns, group_maps
):
    from vpdetect.nn import engine as engine_module

    model = random_net(*arch)
    x = torch.randn(batch, arch[0], *shape)
    expected = model.predict(x)
    one_ring = Engine(model, threads=threads, slab_columns=slab_columns)
    single = one_ring.predict(x)
    one_ring_bytes = one_ring.geometry(shape, batch, threads).bytes
    assert len(one_ring.geometry(shape, batch, threads).groups) == 1  # small nets: one group by default
    monkeypatch.setattr(engine_module, "GROUP_MAPS", group_maps)
    engine = Engine(model, threads=threads, slab_columns=slab_columns)
    geometry = engine.geometry(shape, batch, threads)
    assert geometry.order == (0, 1, 2)  # tall volumes stream along z
    rings = [ring for _, _, ring in geometry.groups]
    assert len(rings) > 1 and rings == sorted(rings, reverse=True) and rings[-1] < rings[0] < shape[0]
    assert geometry.bytes < one_ring_bytes
    got = engine.predict(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.allclose(got, single, atol=1e-6, rtol=0)
    # Large planes in bands of rows read every group's ring too.
    monkeypatch.setattr(engine_module, "BAND_COLUMNS", 20)
    banded = Engine(model, threads=threads, slab_columns=slab_columns)
    assert torch.allclose(banded.predict(x), expected, atol=1e-5, rtol=0)
    assert next(iter(banded._plans.values())).band_rows < shape[1]


@pytest.mark.parametrize(
    ("shape", "order"),
    [((6, 9, 31), (2, 0, 1)), ((7, 33, 10), (1, 0, 2)), ((30, 8, 9), (0, 1, 2)), ((12, 12, 12), (0, 1, 2))],
)
def test_engine_streams_along_z_unless_another_axis_halves_the_memory(shape, order):
    # A layout streams planes across one axis and holds a ring of them: across the longest
    # axis the planes are smallest. The kernels are turned with the axes: the same map.
    from vpdetect.nn.engine import GROUP_MAPS, STREAM_MEMORY_RATIO, _oriented_geometry

    model = random_net(1, 2, 2, 4, 3, seed=5)
    x = torch.randn(2, 1, *shape)
    engine = Engine(model, threads=2, slab_columns=50)
    geometry = engine.geometry(shape, 2)
    assert geometry.order == order
    assert geometry.shape == tuple(shape[a] for a in order)
    along_z = _oriented_geometry(model, shape, (0, 1, 2), 2, 2, 50, GROUP_MAPS)
    assert (geometry.bytes * STREAM_MEMORY_RATIO < along_z.bytes) == (order != (0, 1, 2))
    calls = []
    got = engine.predict(x, progress=lambda done, total: calls.append((done, total)))
    assert got.shape == (2, 2, *shape)
    assert torch.allclose(got, model.predict(x), atol=1e-5, rtol=0)
    assert engine.kernel_summary() == f"engine along {'zyx'[order[0]]} for {'x'.join(map(str, shape))}"
    # Progress counts the input's z planes whatever the streamed axis.
    assert calls[-1] == (shape[0], shape[0]) and all(t == shape[0] for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None where unknown."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always") or not Path("/proc/self/smaps_rollup").exists(),
                    reason="no transparent huge pages on this system")
def test_importing_vpdetect_puts_large_torch_buffers_in_huge_pages():
    probe = ("import sys, vpdetect, torch; a = torch.ones(64 << 18); "
             "kb = [l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')]; "
             "print(int(kb[0]))")

    def huge_kb(env_value: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if env_value is not None:
            env["THP_MEM_ALLOC_ENABLE"] = env_value
        run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
        return int(run.stdout.strip())

    assert huge_kb(None) >= 32 << 10  # most of the 64 MB buffer in 2 MB pages
    if _thp_mode() == "madvise":
        assert huge_kb("0") < 8 << 10  # the user's own setting wins
