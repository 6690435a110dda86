"""3D MSDNet: the buffer implementation against a concatenating reference, sizes, halo, model files."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpdetect.errors import VPDetectError
from vpdetect.nn.checkpoint import format_model_card, load_model, read_model_card, save_model
from vpdetect.nn.msdnet import MSDNet, dilation_of, grow_depth, paper_parameter_count


class ReferenceMSDNet(nn.Module):
    """The textbook reading of the paper: concatenate all earlier maps before every layer.

    It shares the parameters of an MSDNet so outputs and gradients can be compared.
    """

    def __init__(self, net: MSDNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        net = self.net
        maps = [x]
        for i in range(net.depth):
            source = torch.cat(maps, dim=1)
            for j in range(net.width):
                d = (i * net.width + j) % net.max_dilation + 1
                out = F.conv3d(
                    source, net.layer_weights[i][j : j + 1], net.layer_biases[i][j : j + 1], padding=d, dilation=d
                )
                maps.append(F.leaky_relu(out, 0.01))
        return net.final(torch.cat(maps, dim=1))


def _randomise_biases(net: MSDNet, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in net.layer_biases:
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("method", ["gemm", "conv"])
def test_buffer_forward_and_gradients_match_concatenation(method):
    torch.manual_seed(0)
    net = MSDNet(in_channels=2, n_classes=3, width=2, depth=6, max_dilation=3)
    net.method = method
    _randomise_biases(net)
    ref = ReferenceMSDNet(net)
    x = torch.randn(2, 2, 9, 10, 11)
    target = torch.randint(0, 3, (2, 9, 10, 11))

    x1 = x.clone().requires_grad_(True)
    out = net(x1)
    loss = F.cross_entropy(out, target)
    grads = torch.autograd.grad(loss, [x1, *net.parameters()])

    x2 = x.clone().requires_grad_(True)
    out_ref = ref(x2)
    loss_ref = F.cross_entropy(out_ref, target)
    grads_ref = torch.autograd.grad(loss_ref, [x2, *net.parameters()])

    assert out.shape == (2, 3, 9, 10, 11)
    assert torch.allclose(out, out_ref, atol=1e-5, rtol=0)
    assert len(grads) == len(grads_ref) == 1 + 2 * net.depth + 2
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert torch.allclose(g, g_ref, atol=1e-4, rtol=1e-4)
    # The input gradient is not trivially zero (the test would pass vacuously otherwise).
    assert grads[0].abs().max() > 1e-6


@pytest.mark.parametrize("method", ["gemm", "conv"])
def test_gradients_are_exact_in_double_precision(method):
    torch.manual_seed(1)
    net = MSDNet(1, 2, width=3, depth=4, max_dilation=4).double()
    net.method = method
    _randomise_biases(net)
    x = torch.randn(1, 1, 7, 8, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, 7, 8, 6, dtype=torch.float64)
    g = torch.autograd.grad((net(x) * weight).sum(), [x, *net.parameters()])
    g_ref = torch.autograd.grad((ReferenceMSDNet(net)(x) * weight).sum(), [x, *net.parameters()])
    for a, b in zip(g, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


def test_inference_path_equals_training_path():
    torch.manual_seed(2)
    net = MSDNet(1, 2, width=2, depth=5, max_dilation=4)
    x = torch.randn(2, 1, 12, 11, 10)
    with torch.no_grad():
        plain = net(x)
        net.method = "conv"
        assert torch.allclose(net(x), plain, atol=1e-5)
        net.method = "auto"
    tracked = net(x)  # parameters require grad: the custom autograd path
    assert tracked.requires_grad
    assert torch.equal(plain, tracked.detach())
    prob = net.predict(x)
    assert torch.allclose(prob.sum(dim=1), torch.ones(2, 12, 11, 10), atol=1e-6)
    assert torch.allclose(prob, torch.softmax(plain, dim=1))


@pytest.mark.parametrize(
    ("c", "classes", "w", "d"), [(1, 2, 2, 49), (1, 13, 2, 100), (3, 4, 5, 7), (1, 1, 1, 1)]
)
def test_parameter_count_follows_the_paper_formula(c, classes, w, d):
    net = MSDNet(c, classes, w, d, max_dilation=5)
    n = sum(p.numel() for p in net.parameters())
    filters = 27 * sum(w * (i * w + c) for i in range(d))
    assert n == filters + (w * d + c) * classes + (w * d + classes)
    assert n == paper_parameter_count(c, classes, w, d)


def test_paper_network_sizes():
    localizer = sum(p.numel() for p in MSDNet(1, 2, 2, 49, 7).parameters())
    classifier = sum(p.numel() for p in MSDNet(1, 13, 2, 100, 5).parameters())  # 12 classes + background
    assert abs(localizer - 132_000) / 132_000 < 0.02
    assert abs(classifier - 551_000) / 551_000 < 0.02


def test_dilations_cycle_through_one_to_m():
    net = MSDNet(1, 2, width=2, depth=5, max_dilation=3)
    assert net.dilations == [[1, 2], [3, 1], [2, 3], [1, 2], [3, 1]]
    assert dilation_of(2, 1, 2, 3) == 3
    assert net.halo == 2 + 3 + 3 + 2 + 3


def test_halo_is_exactly_the_reach_of_the_network():
    torch.manual_seed(4)
    net = MSDNet(1, 2, width=2, depth=3, max_dilation=3)
    _randomise_biases(net)
    h = net.halo
    assert h == 2 + 3 + 3
    size = 2 * h + 3
    c = size // 2
    base = torch.randn(1, 1, size, size, size)

    def centre_change(offset):
        bumped = base.clone()
        bumped[0, 0, c, c, c + offset] += 10.0
        with torch.no_grad():
            return (net(bumped) - net(base))[0, :, c, c, c].abs().max().item()

    assert centre_change(h) > 1e-6
    assert centre_change(h + 1) == 0.0


def test_output_keeps_odd_spatial_sizes_and_checks_channels():
    net = MSDNet(1, 4, width=1, depth=3, max_dilation=7)
    out = net(torch.zeros(1, 1, 5, 6, 7))
    assert out.shape == (1, 4, 5, 6, 7)
    with pytest.raises(ValueError, match="expects input"):
        net(torch.zeros(1, 2, 5, 5, 5))
    with pytest.raises(ValueError, match="width"):
        MSDNet(width=0)


def test_bfloat16_autocast_trains_with_float32_gradients():
    torch.manual_seed(5)
    net = MSDNet(1, 2, width=2, depth=3, max_dilation=2)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    reference = net.layer_weights[0].grad.clone()
    net.zero_grad()
    ReferenceMSDNet(net)(x).square().mean().backward()
    assert net.layer_weights[0].grad.dtype == torch.float32
    assert torch.isfinite(reference).all()
    assert torch.allclose(reference, net.layer_weights[0].grad, rtol=0.1, atol=0.05 * reference.abs().max().item())


# --------------------------------------------------------------------------- model files


def _card(stage="localizer", names=("background", "particle")):
    return {
        "stage": stage,
        "class_names": list(names),
        "voxel_size": 10.0,
        "crop_size": 32,
        "provenance": {"data": ["model_0"], "seed": 7, "epochs": 3},
        "metrics": {"MIoU": 0.75},
    }


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(6)
    net = MSDNet(1, 3, width=2, depth=4, max_dilation=3)
    path = tmp_path / "m.pt"
    save_model(path, net, _card("classifier", ("background", "a", "b")))
    loaded, card = load_model(path, stage="classifier")
    x = torch.randn(1, 1, 10, 10, 10)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert card["arch"] == {"in_channels": 1, "n_classes": 3, "width": 2, "depth": 4, "max_dilation": 3}
    assert card["format"] == "vpdetect-model" and card["normalisation"] == "zscore"
    assert not loaded.training
    # weights_only loading: the file holds only tensors and plain types.
    raw = torch.load(path, weights_only=True)
    assert raw["card"] == read_model_card(path)
    text = format_model_card(card)
    assert "classifier" in text and "1=a" in text and "MIoU: 0.75" in text and "seed: 7" in text


def test_load_refuses_other_stage_other_files_and_corruption(tmp_path):
    net = MSDNet(1, 2, width=1, depth=2, max_dilation=2)
    path = tmp_path / "loc.pt"
    save_model(path, net, _card())
    with pytest.raises(VPDetectError, match="is a localizer model, but a classifier model is needed"):
        load_model(path, stage="classifier")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(VPDetectError, match="not a vpdetect model file"):
        load_model(plain)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VPDetectError, match="corrupted"):
        load_model(corrupt)
    with pytest.raises(VPDetectError, match="not found"):
        read_model_card(tmp_path / "missing.pt")
    # A card that does not match its weights.
    payload = torch.load(path, weights_only=True)
    payload["card"]["arch"]["depth"] = 3
    bad = tmp_path / "mismatch.pt"
    torch.save(payload, bad)
    with pytest.raises(VPDetectError, match="do not match"):
        load_model(bad)


def test_bundled_copy_halves_the_file_and_keeps_outputs_close(tmp_path):
    from vpdetect.nn.checkpoint import bundle_model

    torch.manual_seed(6)
    net = MSDNet(1, 3, width=2, depth=6, max_dilation=3)
    full, small = tmp_path / "full.pt", tmp_path / "small.pt"
    save_model(full, net, _card("classifier", ("background", "a", "b")),
               training_state={"optimizer": {"m": torch.randn(5000)}})
    bundle_model(full, small, {"test_time_flips": 4})
    loaded, card = load_model(small, stage="classifier")
    assert card["weights_storage"] == "float16" and card["test_time_flips"] == 4
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert small.stat().st_size < 0.7 * full.stat().st_size
    x = torch.randn(1, 1, 10, 10, 10)
    with torch.no_grad():
        assert torch.allclose(net.predict(x), loaded.predict(x), atol=1e-2)
        assert not torch.equal(net(x), loaded(x))  # rounded, not the same weights


def test_save_refuses_inconsistent_cards_and_leaves_no_file(tmp_path):
    net = MSDNet(1, 2, width=1, depth=2, max_dilation=2)
    with pytest.raises(VPDetectError, match="class names"):
        save_model(tmp_path / "m.pt", net, _card(names=("particle", "background")))
    with pytest.raises(VPDetectError, match="stage"):
        save_model(tmp_path / "m.pt", net, _card(stage="detector"))
    assert list(tmp_path.iterdir()) == []


def test_default_model_path_names_the_missing_bundled_model(monkeypatch, tmp_path):
    import vpdetect.models as models

    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    with pytest.raises(VPDetectError, match="bundled classifier model is missing"):
        models.default_model_path("classifier")
    (tmp_path / "localizer.pt").write_bytes(b"x")
    assert models.default_model_path("localizer") == tmp_path / "localizer.pt"
    with pytest.raises(VPDetectError, match="unknown stage"):
        models.default_model_path("segmenter")


def test_axes_shorter_than_the_dilation_match_the_reference():
    from vpdetect.nn.reference import concat_predict

    torch.manual_seed(3)
    model = MSDNet(1, 2, 2, 6, 6)
    x = torch.randn(2, 1, 1, 3, 2)
    torch.testing.assert_close(model.predict(x), concat_predict(model, x), atol=1e-5, rtol=1e-5)


def test_bundled_default_models_load_for_their_stage():
    from vpdetect import models

    localizer, card = load_model(models.default_model_path("localizer"), stage="localizer")
    assert card["stage"] == "localizer" and card["class_names"] == ["background", "particle"]
    assert 0.0 < card["postprocess"]["threshold"] < 1.0  # tuned by the recipe's `vpdetect tune`
    classifier, card = load_model(models.default_model_path("classifier"), stage="classifier")
    assert len(card["class_names"]) == classifier.n_classes > 2
    with pytest.raises(VPDetectError, match="localizer"):
        load_model(models.default_model_path("localizer"), stage="classifier")


def test_conv_path_feeds_contiguous_views_to_every_convolution(monkeypatch):
    # cuDNN copies a non-contiguous input once per call; with a batch of two the channel
    # slice buffer[:, :n_in] is not contiguous, so the conv path must go sample by sample.
    seen = []
    real_conv, real_input, real_weight = F.conv3d, torch.nn.grad.conv3d_input, torch.nn.grad.conv3d_weight

    def conv(x, w, *args, **kwargs):
        seen.append(x.is_contiguous() and w.is_contiguous())
        return real_conv(x, w, *args, **kwargs)

    def grad_input(shape, w, g, *args, **kwargs):
        seen.append(g.is_contiguous() and w.is_contiguous())
        return real_input(shape, w, g, *args, **kwargs)

    def grad_weight(x, shape, g, *args, **kwargs):
        seen.append(x.is_contiguous() and g.is_contiguous())
        return real_weight(x, shape, g, *args, **kwargs)

    monkeypatch.setattr(F, "conv3d", conv)
    monkeypatch.setattr(torch.nn.grad, "conv3d_input", grad_input)
    monkeypatch.setattr(torch.nn.grad, "conv3d_weight", grad_weight)
    torch.manual_seed(0)
    net = MSDNet(width=3, depth=3, max_dilation=3)
    net.method = "conv"
    net(torch.randn(2, 1, 6, 6, 6)).sum().backward()
    # 3 layers x 3 channels x 2 samples, forward and twice backward (+ the final 1x1 conv)
    assert len(seen) >= 3 * 3 * 2 * 3 and all(seen)


def test_reduced_precision_training_accumulates_gradients_in_float32():
    from vpdetect.nn.msdnet import gradient_dtype

    assert gradient_dtype(torch.bfloat16) == torch.float32
    assert gradient_dtype(torch.float16) == torch.float32
    assert gradient_dtype(torch.float64) == torch.float64
    # A bfloat16 backward through the buffer runs and lands near the float32 gradients.
    torch.manual_seed(1)
    net = MSDNet(width=2, depth=8, max_dilation=3)
    x = torch.randn(1, 1, 8, 8, 8)
    reference = torch.autograd.grad(net(x).square().mean(), list(net.layer_weights))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(x).float().square().mean()
    grads = torch.autograd.grad(loss, list(net.layer_weights))
    assert all(g.dtype == torch.float32 for g in grads)
    for g, r in zip(grads, reference, strict=True):
        assert torch.linalg.norm(g - r) <= 0.1 * torch.linalg.norm(r)


def test_grown_network_computes_the_shallower_ones_map_then_learns_with_its_new_layers():
    torch.manual_seed(0)
    small = MSDNet(width=2, depth=4, max_dilation=3)
    with torch.no_grad():
        small.final.weight.normal_()
    deep = MSDNet(width=2, depth=7, max_dilation=3)
    grow_depth(deep, small)
    x = torch.randn(1, 1, 12, 11, 10)
    torch.testing.assert_close(deep(x), small(x), rtol=0, atol=1e-5)
    assert deep.dilations[:4] == small.dilations
    # The new layers are live: once the final layer reads them, their weights get gradients.
    loss = deep(x).square().mean()
    loss.backward()
    assert deep.final.weight.grad[:, small.n_feature_maps:].abs().sum() > 0


@pytest.mark.parametrize("change", [{"width": 3}, {"max_dilation": 4}, {"depth": 3}, {"n_classes": 3}])
def test_growing_refuses_anything_but_more_depth(change):
    small = MSDNet(width=2, depth=4, max_dilation=3)
    with pytest.raises(ValueError, match="only the depth may increase"):
        grow_depth(MSDNet(**{**small.arch(), **change}), small)
