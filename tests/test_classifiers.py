"""Whole-box classifiers: the papers' layer tables and parameter counts, boxes, training, inference."""

import numpy as np
import pandas as pd
import pytest
import torch
from test_classify import run_cli
from test_pick_cli import LOCALIZE_ARGS, scenes  # noqa: F401  (scenes is a fixture)
from test_train import _one_thread, make_shrec_folder  # noqa: F401  (autouse: one torch thread)
from typer.testing import CliRunner

import vpdetect.cli  # noqa: F401  (registers the commands)
from vpdetect.classify.pipeline import NON_PARTICLE_CLASS, ClassifyOptions, classify_table
from vpdetect.cli.app import app
from vpdetect.errors import VPDetectError
from vpdetect.io.mrc import Tomogram
from vpdetect.io.particles import ParticleTable, read_particles
from vpdetect.nn.checkpoint import format_model_card, load_model, read_model_card, save_model
from vpdetect.nn.classifiers import BOX_ARCHITECTURES, build_box_classifier
from vpdetect.train.boxes import CLEAR_RADIUS, NON_PARTICLE, BoxDataset, flip_box
from vpdetect.train.data import build_class_mapping, load_shrec_folder, prepare_volume
from vpdetect.train.loop import box_metrics, history_csv

L = 14  # 12 proteins + fiducial + non-particle, as in the benchmark


def _main_layers(net):
    """(kind, output shape) of the layers a paper's figure lists: convolutions, poolings, padding, FC."""
    keep = ("conv", "maxpool", "avgpool", "gap", "fc", "pad")
    return [(kind, shape) for _, kind, shape, _ in net.layer_table() if kind.startswith(keep)]


def _conv(n_in, n_out, k=3, bias=True):
    return n_in * n_out * k**3 + (n_out if bias else 0)


def _fc(n_in, n_out):
    return n_in * n_out + n_out


# --------------------------------------------------------------------------- the papers' networks


@pytest.mark.parametrize("name,dilations", [("densenet", (1, 1, 1, 1)), ("dilated-densenet", (1, 2, 3, 1))])
def test_densenets_follow_the_paper(name, dilations):
    """Gao et al. 2020: shallow conv, 3 dense blocks of 4 layers, growth 12, transitions, GAP, FC."""
    b = 32
    net = build_box_classifier(name, 1, L, b)
    k = 12
    expected = [("conv3x3x3", (24, b, b, b))]
    n, size = 24, b
    params = _conv(1, 24, bias=False)
    for block in range(3):
        for i, d in enumerate(dilations):
            c = n + i * k
            expected += [("conv1x1x1", (4 * k, size, size, size)),
                         ("conv3x3x3" + (f" d{d}" if d > 1 else ""), (k, size, size, size))]
            params += 2 * c + _conv(c, 4 * k, 1, bias=False) + 2 * 4 * k + _conv(4 * k, k, bias=False)
        n += 4 * k
        if block < 2:
            expected += [("conv1x1x1", (n // 2, size, size, size)), ("avgpool", (n // 2, size // 2, size // 2, size // 2))]
            params += 2 * n + _conv(n, n // 2, 1, bias=False)
            n, size = n // 2, size // 2
    expected += [("gap", (n, 1, 1, 1)), ("fc", (L,))]
    params += 2 * n + _fc(n, L)
    assert (n, size) == (90, 8)
    assert _main_layers(net) == expected
    assert sum(p.numel() for p in net.parameters()) == params == 227_510


def test_dsrf3d_v2_follows_figure_1():
    """Che et al. 2018, 2.1.1: 3 x (two 3x3x3 convs + 2x2x2 max pool) at 32/64/128, FC 1024 x 2, FC L."""
    b = 40
    net = build_box_classifier("dsrf3d-v2", 1, L, b)
    expected, params, n_in = [], 0, 1
    for w, s in ((32, 40), (64, 20), (128, 10)):
        expected += [("conv3x3x3", (w, s, s, s))] * 2 + [("maxpool2x2x2", (w, s // 2, s // 2, s // 2))]
        params += _conv(n_in, w) + _conv(w, w)
        n_in = w
    expected += [("fc", (1024,)), ("fc", (1024,)), ("fc", (L,))]
    params += _fc(128 * 5**3, 1024) + _fc(1024, 1024) + _fc(1024, L)
    assert _main_layers(net) == expected
    assert sum(p.numel() for p in net.parameters()) == params
    dropouts = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.7, 0.7]


def test_rb3d_follows_figure_2():
    """2.1.2: conv + max pool, 4 bottleneck residual blocks (1x1 -> 3x3 -> 1x1 beside a 3x3 shortcut), FC x 2."""
    b = 16
    net = build_box_classifier("rb3d", 1, L, b)
    s = b // 2
    expected = [("conv3x3x3", (32, b, b, b)), ("maxpool2x2x2", (32, s, s, s))]
    params = _conv(1, 32)
    for _ in range(4):
        expected += [("conv3x3x3", (16, s, s, s)), ("conv1x1x1", (16, s, s, s)),
                     ("conv3x3x3", (32, s, s, s)), ("conv1x1x1", (16, s, s, s))]
        params += _conv(32, 16) + _conv(32, 16, 1) + _conv(16, 32) + _conv(32, 16, 1)
    expected += [("fc", (1024,)), ("fc", (1024,)), ("fc", (L,))]
    params += _fc(32 * s**3, 1024) + _fc(1024, 1024) + _fc(1024, L)
    assert _main_layers(net) == expected
    assert sum(p.numel() for p in net.parameters()) == params
    # Each block merges its two 16-map paths into 32 maps.
    assert net.layer_table()[-1][2] == (L,)


def test_cb3d_follows_figure_3():
    """2.1.3: eight 3x3x3 convs, five max poolings (the first 1x2x2), FC 4096 x 2 with 50 % dropout."""
    b = 16
    net = build_box_classifier("cb3d", 1, L, b)
    expected = [
        ("conv3x3x3", (64, 16, 16, 16)), ("maxpool1x2x2", (64, 16, 8, 8)),
        ("conv3x3x3", (128, 16, 8, 8)), ("maxpool2x2x2", (128, 8, 4, 4)),
        ("conv3x3x3", (256, 8, 4, 4)), ("conv3x3x3", (256, 8, 4, 4)), ("maxpool2x2x2", (256, 4, 2, 2)),
        ("conv3x3x3", (512, 4, 2, 2)), ("conv3x3x3", (512, 4, 2, 2)), ("maxpool2x2x2", (512, 2, 1, 1)),
        ("conv3x3x3", (512, 2, 1, 1)), ("conv3x3x3", (512, 2, 1, 1)), ("pad", (512, 2, 3, 3)),
        ("maxpool2x2x2", (512, 1, 1, 1)),
        ("fc", (4096,)), ("fc", (4096,)), ("fc", (L,)),
    ]
    convs = [(1, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    params = sum(_conv(a, c) for a, c in convs) + _fc(512, 4096) + _fc(4096, 4096) + _fc(4096, L)
    assert _main_layers(net) == expected
    assert sum(p.numel() for p in net.parameters()) == params
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


@pytest.mark.parametrize("name", BOX_ARCHITECTURES)
def test_width_divisor_scales_every_width_and_outputs_probabilities(name):
    net = build_box_classifier(name, 1, 5, 24, width_divisor=4)
    full = build_box_classifier(name, 1, 5, 24)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in full.parameters()) / 8
    net.eval()
    probs = net.predict(torch.randn(3, 1, 24, 24, 24))
    assert probs.shape == (3, 5)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="expects boxes"):
        net(torch.randn(3, 2, 24, 24, 24))


def test_box_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_box_classifier("cb3d", 1, 3, 16, width_divisor=8).eval()
    path = tmp_path / "cb3d.pt"
    save_model(path, net, {"stage": "classifier", "class_names": ["background", "a", "b"], "crop_size": 16})
    loaded, card = load_model(path, stage="classifier")
    assert card["arch"] == {"name": "cb3d", "in_channels": 1, "n_classes": 3, "box_size": 16, "width_divisor": 8}
    x = torch.randn(2, 1, 16, 16, 16)
    torch.testing.assert_close(loaded(x), net(x))
    assert "cb3d (whole-box classifier), box 16^3, widths / 8" in format_model_card(card)


def test_a_box_classifier_cannot_be_a_localizer(tmp_path):
    from vpdetect.errors import VPDetectError

    net = build_box_classifier("rb3d", 1, 2, 16, width_divisor=8)
    with pytest.raises(VPDetectError, match="localizer must be an MSDNet"):
        save_model(tmp_path / "x.pt", net, {"stage": "localizer", "class_names": ["background", "particle"]})


# --------------------------------------------------------------------------- boxes


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = make_shrec_folder(tmp_path_factory.mktemp("boxes") / "model_0")
    av = load_shrec_folder(folder)
    mapping = build_class_mapping(list(av.id_names.values()) + av.centre_names, "classifier", None, {}, ["vesicle"])
    return [prepare_volume(av, mapping)], mapping


def test_particle_boxes_are_class_balanced_and_near_true_centres(volumes):
    vols, mapping = volumes
    data = BoxDataset(vols, 12, seed=4, max_shift=2, background_share=0.25, augment=False)
    tv = vols[0]
    labels = []
    for i in range(400):
        rng = np.random.default_rng([data.seed, data.stream, i])
        _, centre, label = data._pick(i, rng)
        labels.append(label)
        if label == NON_PARTICLE:
            r = CLEAR_RADIUS
            window = tv.targets[tuple(slice(max(c - r, 0), c + r + 1) for c in centre)]
            assert not np.any(window > 0)
        else:
            same = tv.centres_zyx[tv.centre_classes == label]
            assert np.abs(same - centre).max(axis=1).min() <= 2
    counts = np.bincount(labels, minlength=len(mapping.class_names))
    # 3 particle classes (small x2, large, fiducial) drawn uniformly, small not twice as often.
    assert 70 <= counts[NON_PARTICLE] <= 130
    assert counts[1:].min() > 0.7 * counts[1:].max()
    image, label = data.box(7)
    again, label_again = data.box(7)
    np.testing.assert_array_equal(image, again)
    assert label == label_again


def test_validation_boxes_enumerate_every_particle(volumes):
    vols, _ = volumes
    data = BoxDataset(vols, 12, seed=0, augment=False, stream=1, exhaustive=True, n_background=3)
    assert len(data) == len(vols[0].centre_classes) + 3
    labels = [data[i][1].item() for i in range(len(data))]
    assert labels == [*vols[0].centre_classes.tolist(), 0, 0, 0]


def test_gain_jitter_scales_training_boxes_only_within_its_bounds(volumes):
    vols, _ = volumes
    plain = BoxDataset(vols, 12, seed=5, augment=True)
    jittered = BoxDataset(vols, 12, seed=5, augment=True, gain_jitter=0.3)
    gains = []
    for i in range(60):
        image, label = plain.box(i)
        scaled, label_scaled = jittered.box(i)
        assert label == label_scaled  # same box, same flips: only the gain differs
        gain = float(np.sum(scaled * image) / np.sum(image * image))
        np.testing.assert_allclose(scaled, gain * image, rtol=1e-5, atol=1e-6)
        gains.append(gain)
    gains = np.array(gains)
    assert gains.min() >= 1 / 1.3 - 1e-6 and gains.max() <= 1.3 + 1e-6
    assert (gains < 0.95).any() and (gains > 1.05).any()  # dims as well as brightens
    np.testing.assert_array_equal(jittered.box(3)[0], jittered.box(3)[0])  # a function of the seed
    # Validation boxes are never jittered.
    val_plain = BoxDataset(vols, 12, seed=5, augment=False, stream=1, exhaustive=True)
    val_jit = BoxDataset(vols, 12, seed=5, augment=False, stream=1, exhaustive=True, gain_jitter=0.3)
    np.testing.assert_array_equal(val_plain.box(0)[0], val_jit.box(0)[0])
    with pytest.raises(VPDetectError, match="gain jitter"):
        BoxDataset(vols, 12, seed=5, gain_jitter=1.5)


def _wedge_power(volume):
    """Spectral power inside a +-60 degree tilt series' missing wedge (tilt axis y)."""
    f = np.fft.fftn(volume)
    kz, _, kx = np.meshgrid(*[np.fft.fftfreq(n) for n in volume.shape], indexing="ij")
    missing = np.abs(kz) > np.tan(np.radians(30)) * np.abs(kx) + 1e-9
    return float(np.sum(np.abs(f[missing]) ** 2) / np.sum(np.abs(f) ** 2))


def test_flips_keep_the_missing_wedge_where_turns_would_not():
    rng = np.random.default_rng(0)
    shape = (16, 16, 16)
    f = np.fft.fftn(rng.normal(size=shape))
    kz, _, kx = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    f[np.abs(kz) > np.tan(np.radians(30)) * np.abs(kx) + 1e-9] = 0
    volume = np.fft.ifftn(f).real
    assert _wedge_power(volume) < 1e-20
    for seed in range(8):
        assert _wedge_power(flip_box(volume, np.random.default_rng(seed))) < 1e-20
    # A 90-degree turn about z swaps x and y and moves the wedge: the check can fail.
    assert _wedge_power(np.rot90(volume, 1, axes=(1, 2))) > 0.1
    flipped = [flip_box(volume, np.random.default_rng(s)) for s in range(16)]
    assert any(not np.array_equal(v, volume) for v in flipped)


def test_box_metrics_by_hand():
    cm = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 0]], dtype=float)  # class 2 has no true boxes
    m = box_metrics(cm)
    assert m["accuracy"] == pytest.approx(5 / 8)
    f1_0, f1_1 = 2 * 3 / (4 + 3), 2 * 2 / (4 + 3)
    assert m["class_F1"][:2] == [round(f1_0, 4), round(f1_1, 4)] and m["class_F1"][2] is None
    assert m["macro_F1"] == pytest.approx((f1_0 + f1_1) / 2)
    assert history_csv([{"epoch": 1, "lr": 0.1, "train_loss": 1.0, "accuracy": 0.5, "macro_F1": 0.25,
                         "seconds": 1.0}]).splitlines()[0] == "epoch,lr,train_loss,val_loss,accuracy,macro_F1,seconds"


# --------------------------------------------------------------------------- inference


def _controlled_model(winner: int, n_classes: int = 3):
    """A box classifier whose output is class `winner` for every box (probability from the bias)."""
    net = build_box_classifier("dsrf3d-v2", 1, n_classes, 16, width_divisor=8).eval()
    final = net.classifier[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.zero_()
        final.bias[winner] = 2.0
    card = {"stage": "classifier", "class_names": ["background", "a", "b"][:n_classes], "crop_size": 16,
            "arch": net.arch(), "normalisation": "zscore"}
    return net, card


def _tomo_and_table(n=10):
    rng = np.random.default_rng(1)
    tomo = Tomogram(data=rng.normal(size=(20, 30, 30)).astype(np.float32), voxel_size=10.0)
    coords = rng.uniform(2, 18, size=(n, 3))
    table = ParticleTable(pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]}), 10.0, None)
    return tomo, table


def test_one_forward_labels_many_boxes_and_non_particles_are_named_or_dropped():
    tomo, table = _tomo_and_table()
    net, card = _controlled_model(2)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    out = classify_table(tomo, table, net, card)
    assert calls == [10]  # one forward for all ten boxes (default batch 64)
    assert list(out.data["class_name"]) == ["b"] * 10
    p = np.exp(2.0) / (np.exp(2.0) + 2)
    np.testing.assert_allclose(out.data["vote_fraction"], p, rtol=1e-5)
    np.testing.assert_allclose(out.data["vote_margin"], p - 1 / (np.exp(2.0) + 2), rtol=1e-5)

    net0, card0 = _controlled_model(0)
    rejected = classify_table(tomo, table, net0, card0)
    assert set(rejected.data["class_name"]) == {NON_PARTICLE_CLASS}
    assert (rejected.data["class_number"] == 0).all()
    dropped = classify_table(tomo, table, net0, card0, ClassifyOptions(drop_unknown=True, batch_size=4))
    assert len(dropped.data) == 0


def test_test_time_flips_average_the_softmax_over_axis_flips():
    from vpdetect.classify.extract import extract_boxes
    from vpdetect.nn.flips import FLIP_DIMS
    from vpdetect.preprocess import zscore_params

    tomo, table = _tomo_and_table(6)
    torch.manual_seed(3)
    net = build_box_classifier("dsrf3d-v2", 1, 3, 16, width_divisor=8).eval()  # orientation-sensitive
    card = {"stage": "classifier", "class_names": ["background", "a", "b"], "crop_size": 16,
            "arch": net.arch(), "normalisation": "zscore"}
    mean, std = zscore_params(tomo.data)
    coords = table.data[["x", "y", "z"]].to_numpy()
    boxes = torch.from_numpy(extract_boxes(tomo.data, coords, 16, mean, std)).unsqueeze(1)
    expected = torch.stack([net.predict(torch.flip(boxes, dims)) for dims in FLIP_DIMS]).mean(0)
    out = classify_table(tomo, table, net, card, ClassifyOptions(flips=8, batch_size=4))
    np.testing.assert_allclose(out.data["vote_fraction"], expected.max(dim=1).values.numpy(), rtol=1e-5)
    plain = classify_table(tomo, table, net, card)
    assert not np.allclose(plain.data["vote_fraction"], out.data["vote_fraction"])
    # The card's choice is the default; the options override it.
    from_card = classify_table(tomo, table, net, {**card, "test_time_flips": 8})
    np.testing.assert_allclose(from_card.data["vote_fraction"], out.data["vote_fraction"], rtol=1e-6)
    with pytest.raises(VPDetectError, match="flips"):
        classify_table(tomo, table, net, card, ClassifyOptions(flips=9))


# --------------------------------------------------------------------------- command line


def test_train_classify_and_pick_paths_from_the_card(tmp_path, volumes):
    folder = make_shrec_folder(tmp_path / "model_0", seed=2)
    out = tmp_path / "box.pt"
    runner = CliRunner()
    args = ["train", "classifier", "--arch", "dsrf3d-v2", "--width-divisor", "8", "--crop-size", "12",
            "--data", str(folder), "--val", str(folder), "--out", str(out), "--epochs", "2",
            "--steps-per-epoch", "2", "--batch-size", "4", "--threads", "1", "--gain-jitter", "0.25"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    card = read_model_card(out)
    assert card["arch"]["name"] == "dsrf3d-v2" and card["crop_size"] == 12
    assert card["provenance"]["sampling"] == "class-balanced"
    assert card["provenance"]["augmentation"] == "flips of z, y, x, gain in [1/1.25, 1.25]"
    assert {"accuracy", "macro_F1", "class_F1"} <= set(card["metrics"])
    assert (tmp_path / "box.log.csv").read_text().startswith("epoch,lr,train_loss,val_loss,accuracy,macro_F1")

    classes = tmp_path / "classes.csv"
    result = runner.invoke(app, ["classify", str(folder / "particle_locations.txt"), "--tomogram",
                                 str(folder / "reconstruction.mrc"), "--model", str(out), "-o", str(classes)])
    assert result.exit_code == 0, result.output
    table = read_particles(classes)
    names = set(card["class_names"][1:]) | {NON_PARTICLE_CLASS}
    assert len(table) == 5 and set(table.data["class_name"]) <= names


def test_box_arch_for_a_localizer_is_a_one_line_error(tmp_path, volumes):
    folder = make_shrec_folder(tmp_path / "model_0")
    result = CliRunner().invoke(app, ["train", "localizer", "--arch", "cb3d", "--data", str(folder),
                                      "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2
    assert "the localizer is an MSDNet" in result.output
    result = CliRunner().invoke(app, ["train", "classifier", "--arch", "vgg", "--data", str(folder),
                                      "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "unknown --arch 'vgg'" in result.output


def test_pick_takes_the_box_path_and_drops_non_particles(scenes, tmp_path):  # noqa: F811
    net, card = _controlled_model(0)
    model = tmp_path / "reject_all.pt"
    save_model(model, net, card)
    tomo = scenes["tomos"] / "TS_00.mrc"
    out = tmp_path / "all.csv"
    result = run_cli("pick", tomo, "--localizer", scenes["localizer"], "--classifier", model, "-o", out,
                     *LOCALIZE_ARGS)
    assert result.exit_code == 0, result.output
    picked = read_particles(out).data
    assert len(picked) > 0 and set(picked["class_name"]) == {NON_PARTICLE_CLASS}
    dropped = tmp_path / "kept.csv"
    result = run_cli("pick", tomo, "--localizer", scenes["localizer"], "--classifier", model, "-o", dropped,
                     "--drop-unknown", *LOCALIZE_ARGS)
    assert result.exit_code == 0, result.output
    assert len(read_particles(dropped).data) == 0


def test_classifier_benchmark_reads_a_gain_list_or_refuses_it():
    import argparse

    from benchmarks.bench_classifiers import _gain_list

    assert _gain_list("0.6, 1,1.25") == [0.6, 1.0, 1.25]
    for bad in ("a,b", "1,0", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _gain_list(bad)
