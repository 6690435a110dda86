"""Training data (targets, classes, crops), the training loop, resume and `vpdetect train`."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import vpdetect.cli  # noqa: F401  (registers the commands)
from vpdetect.cli.app import app
from vpdetect.cli.options import parse_class_values
from vpdetect.errors import VPDetectError
from vpdetect.io.mrc import read_tomogram, write_mrc
from vpdetect.io.particles import ParticleTable, write_particles
from vpdetect.nn.checkpoint import load_model, read_model_card
from vpdetect.nn.losses import IGNORE_INDEX, focal_loss
from vpdetect.preprocess import subtract_background
from vpdetect.spectrum import reference_profile
from vpdetect.train.data import (
    STRUCTURE_MARGIN,
    AnnotatedVolume,
    CropDataset,
    annotate_from_table,
    augment,
    build_class_mapping,
    cut_crop,
    load_shrec_folder,
    paint_spheres,
    parse_merge,
    prepare_volume,
    shard_indices,
    structure_centres,
)
from vpdetect.train.loop import TrainConfig, Trainer, fit, history_csv


@pytest.fixture(autouse=True)
def _one_thread():
    # Many small ops per step: on a shared machine, OpenMP threads waiting for each
    # other cost far more than a second core gains (measured: 0.3 s vs 3-7 s per epoch).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# name, radius (voxels), centre (z, y, x), density
PARTICLES = [
    ("small", 2.5, (6, 6, 6), 1.0),
    ("large", 4.0, (8, 20, 20), 1.0),
    ("small", 2.5, (20, 8, 18), 1.0),
    ("vesicle", 3.5, (20, 20, 6), 0.5),
    ("fiducial", 2.0, (14, 14, 14), 3.0),
]
SHAPE = (28, 28, 28)


def make_shrec_folder(folder, seed=0, noise=0.3, with_class_mask=True):
    """A tiny SHREC-layout folder whose truth is known exactly."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(SHAPE)
    occupancy = np.zeros(SHAPE, np.int16)
    class_labels = {"small": 1, "large": 2, "vesicle": 3, "fiducial": 4}
    class_mask = np.zeros(SHAPE, np.int16)
    density = np.zeros(SHAPE, np.float32)
    lines = []
    for k, (name, r, (z, y, x), rho) in enumerate(PARTICLES, start=1):
        inside = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        occupancy[inside] = k
        class_mask[inside] = class_labels[name]
        density[inside] = rho
        lines.append(f"{name} {x} {y} {z} 0 0 0")
    write_mrc(folder / "reconstruction.mrc", density + rng.normal(0, noise, SHAPE).astype(np.float32), 10.0)
    write_mrc(folder / "occupancy_mask.mrc", occupancy, 10.0)
    if with_class_mask:
        write_mrc(folder / "class_mask.mrc", class_mask, 10.0)
    (folder / "particle_locations.txt").write_text("\n".join(lines) + "\n")
    table = [
        {"name": n, "label": lab, "effective_radius_voxels": {"small": 2.5, "large": 4.0}.get(n, 3.0)}
        for n, lab in class_labels.items()
    ]
    (folder / "simulation.json").write_text(json.dumps({"format": "vpdetect-simulation", "classes": table}))
    return folder


@pytest.fixture(scope="module")
def shrec_dir(tmp_path_factory):
    return make_shrec_folder(tmp_path_factory.mktemp("data") / "model_0")


# --------------------------------------------------------------------------- targets and classes


def test_localizer_targets_are_binary_without_vesicles(shrec_dir):
    av = load_shrec_folder(shrec_dir)
    mapping = build_class_mapping(list(av.id_names.values()), "localizer")
    assert mapping.class_names == ["background", "particle"]
    tv = prepare_volume(av, mapping)
    occupancy = av.label_map
    assert set(np.unique(tv.targets)) == {0, 1}
    assert np.all(tv.targets[occupancy == 4] == 0)  # the vesicle (line 4) is background
    for pid in (1, 2, 3, 5):
        assert np.all(tv.targets[occupancy == pid] == 1)
    # Centres of target particles only, rounded to voxels.
    assert sorted(map(tuple, tv.centres_zyx)) == sorted([(6, 6, 6), (8, 20, 20), (20, 8, 18), (14, 14, 14)])
    assert tv.mean == pytest.approx(float(np.mean(av.volume, dtype=np.float64)), rel=1e-5)


def test_classifier_targets_follow_names_selection_and_merging(shrec_dir):
    av = load_shrec_folder(shrec_dir)
    names = list(av.id_names.values())
    mapping = build_class_mapping(names, "classifier")
    assert mapping.class_names == ["background", "fiducial", "large", "small"]
    tv = prepare_volume(av, mapping)
    assert np.all(tv.targets[av.label_map == 2] == 2)
    assert np.all(tv.targets[av.label_map == 3] == 3)
    assert np.all(tv.targets[av.label_map == 5] == 1)

    picked = build_class_mapping(names, "classifier", select=["small", "large"])
    assert picked.class_names == ["background", "small", "large"]
    assert picked.index("fiducial") == 0 and picked.index("large") == 2

    merged = build_class_mapping(names, "classifier", merge=parse_merge(["protein=small,large"]))
    assert merged.class_names == ["background", "fiducial", "protein"]
    assert merged.index("small") == merged.index("large") == 2

    with_vesicles = build_class_mapping(names, "classifier", exclude=())
    assert "vesicle" in with_vesicles.class_names
    with pytest.raises(VPDetectError, match="not in the data: ribosome"):
        build_class_mapping(names, "classifier", select=["ribosome"])
    with pytest.raises(VPDetectError, match="NEW=OLD"):
        parse_merge(["protein"])
    with pytest.raises(VPDetectError, match="no particle classes"):
        build_class_mapping(["vesicle"], "localizer")


def test_class_mask_route_equals_occupancy_route(tmp_path, shrec_dir):
    via_occupancy = load_shrec_folder(shrec_dir)
    folder = make_shrec_folder(tmp_path / "m", with_class_mask=True)
    (folder / "occupancy_mask.mrc").unlink()
    via_class_mask = load_shrec_folder(folder)
    mapping = build_class_mapping(list(via_occupancy.id_names.values()), "classifier")
    a = prepare_volume(via_occupancy, mapping).targets
    b = prepare_volume(via_class_mask, mapping).targets
    assert np.array_equal(a, b)
    assert via_class_mask.radii_vox["large"] == 4.0  # from simulation.json


def test_radii_estimated_from_occupancy_without_a_class_table(tmp_path):
    folder = make_shrec_folder(tmp_path / "m", with_class_mask=False)
    (folder / "simulation.json").unlink()
    av = load_shrec_folder(folder)
    # Equivalent-sphere radius of a digitised ball is close to its radius.
    assert av.radii_vox["large"] == pytest.approx(4.0, abs=0.15)
    assert av.radii_vox["small"] == pytest.approx(2.5, abs=0.2)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(VPDetectError, match="not found"):
        load_shrec_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VPDetectError, match="no reconstruction.mrc"):
        load_shrec_folder(tmp_path / "empty")
    folder = make_shrec_folder(tmp_path / "m", with_class_mask=False)
    (folder / "occupancy_mask.mrc").unlink()
    with pytest.raises(VPDetectError, match="neither occupancy_mask.mrc"):
        load_shrec_folder(folder)


def test_spheres_from_coordinates():
    labels = paint_spheres((20, 20, 20), np.array([[10, 10, 10], [10, 10, 15]]), [1, 2], [4.0, 2.0])
    assert labels[10, 10, 6] == 1 and labels[10, 10, 5] == 0
    # The smaller ball is painted over the larger one where they touch.
    assert labels[10, 10, 13] == 2 and labels[10, 10, 17] == 2 and labels[10, 10, 18] == 0
    assert np.count_nonzero(labels == 2) == np.count_nonzero(paint_spheres((20, 20, 20), np.array([[10, 10, 15]]), [2], [2.0]))


def test_coordinate_table_targets_in_angstrom():
    frame = pd.DataFrame({"x": [5.0, 14.0], "y": [5.0, 14.0], "z": [5.0, 14.0], "class_name": ["a", "b"]})
    volume = np.zeros((20, 20, 20), np.float32)
    default, per_class = parse_class_values(["30", "b=20"], "--radius")
    av = annotate_from_table("t", volume, 10.0, frame, default, per_class, "angstrom")
    assert av.radii_vox == {"a": 3.0, "b": 2.0}
    expected = paint_spheres(volume.shape, np.array([[5, 5, 5], [14, 14, 14]]), [1, 2], [3.0, 2.0])
    assert np.array_equal(av.label_map, expected)
    with pytest.raises(VPDetectError, match="voxel size"):
        annotate_from_table("t", volume, None, frame, 3.0, {}, "angstrom")
    with pytest.raises(VPDetectError, match="no radius for class 'a'"):
        annotate_from_table("t", volume, 10.0, frame, None, {"b": 2.0}, "voxel")
    with pytest.raises(VPDetectError, match="positive"):
        parse_class_values(["a=-1"], "--radius")


# --------------------------------------------------------------------------- crops


def test_augmentation_flips_only_so_the_missing_wedge_stays_in_x_z(rng):
    image = rng.normal(size=(4, 6, 6)).astype(np.float32)
    labels = np.arange(4 * 36).reshape(4, 6, 6)
    z, y, x = np.indices(labels.shape)
    seen = set()
    for seed in range(60):
        img, lab = augment(image, labels, np.random.default_rng(seed))
        assert np.array_equal(img, image.reshape(-1)[lab])  # image and labels move together
        src_z, src_y, src_x = lab // 36, (lab // 6) % 6, lab % 6
        # each axis is kept or reversed, never exchanged with another (no x-y turns)
        flips = tuple(not np.array_equal(src, own) for src, own in ((src_z, z), (src_y, y), (src_x, x)))
        for src, own, n, flipped in ((src_z, z, 4, flips[0]), (src_y, y, 6, flips[1]), (src_x, x, 6, flips[2])):
            assert np.array_equal(src, n - 1 - own if flipped else own)
        seen.add(flips)
    assert len(seen) == 8

def test_cut_crop_pads_outside():
    volume = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    crop = cut_crop(volume, (-1, 0, 1), 3, fill=-5)
    assert np.all(crop[0] == -5)
    assert np.array_equal(crop[1:, :, :2], volume[:2, :, 1:])
    assert np.all(crop[:, :, 2] == -5)


def test_crops_are_deterministic_and_near_particles(shrec_dir):
    av = load_shrec_folder(shrec_dir)
    tv = prepare_volume(av, build_class_mapping(list(av.id_names.values()), "classifier"))
    data = CropDataset([tv], 12, seed=3, particle_share=1.0)
    a_img, a_lab = data[5]
    b_img, b_lab = data[5]
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert a_img.shape == (1, 12, 12, 12) and a_img.dtype == torch.float32
    assert a_lab.dtype == torch.int64
    assert not torch.equal(data[6][0], a_img)
    # Particle-centred crops always contain particle voxels; class-balanced over 3 classes.
    classes_seen = set()
    for i in range(30):
        lab = data[i][1]
        assert (lab > 0).any()
        classes_seen |= set(lab.unique().tolist())
    assert {1, 2, 3} <= classes_seen
    # A crop larger than the volume is padded with ignored targets and zeros (the mean).
    big = CropDataset([tv], 32, seed=0, particle_share=0.0, augment=False)
    img, lab = big[0]
    assert (lab == IGNORE_INDEX).sum() == 32**3 - 28**3
    assert torch.all(img[0][lab == IGNORE_INDEX] == 0)


def test_size_balance_centres_more_crops_on_small_particles():
    # one tomogram, one large (radius 8) and one small (radius 2) particle of one target class
    shape = (40, 40, 40)
    av = AnnotatedVolume(
        name="two", volume=np.random.default_rng(0).normal(size=shape).astype(np.float32),
        label_map=np.zeros(shape, np.int16),
        id_names={1: "big", 2: "small"}, centres_zyx=np.array([[10, 10, 10], [30, 30, 30]]),
        centre_names=["big", "small"], radii_vox={"big": 8.0, "small": 2.0},
    )
    av.label_map[8:13, 8:13, 8:13] = 1
    av.label_map[29:32, 29:32, 29:32] = 2
    tv = prepare_volume(av, build_class_mapping(["big", "small"], "localizer"), contrast="dark")
    assert list(tv.centre_radii) == [8.0, 2.0]

    def share_small(balance):
        data = CropDataset([tv], 8, seed=1, particle_share=1.0, augment=False, size_balance=balance)
        corners = [data._corner(np.random.default_rng([1, 0, i]))[1] for i in range(400)]
        return np.mean([c.mean() > 20 for c in corners])

    assert 0.4 < share_small(0.0) < 0.6
    assert share_small(2.0) > 0.9  # weights 1/4 : 1/64
    with pytest.raises(VPDetectError, match="size balance"):
        CropDataset([tv], 8, seed=1, size_balance=-1.0)


def _bead_volume():
    """Noise with one particle (target) at one end and a dense bead (not a target) at the other."""
    shape = (48, 48, 48)
    rng = np.random.default_rng(0)
    volume = rng.normal(size=shape).astype(np.float32)
    z, y, x = np.indices(shape)
    particle = (z - 12) ** 2 + (y - 12) ** 2 + (x - 12) ** 2 <= 9
    bead = (z - 36) ** 2 + (y - 36) ** 2 + (x - 36) ** 2 <= 9
    volume[particle] -= 3.0
    volume[bead] -= 30.0
    label_map = particle.astype(np.int16)
    av = AnnotatedVolume(name="bead", volume=volume, label_map=label_map, id_names={1: "p"},
                         centres_zyx=np.array([[12, 12, 12]]), centre_names=["p"], radii_vox={"p": 3.0})
    return prepare_volume(av, build_class_mapping(["p"], "localizer"), contrast="dark")


def test_structure_centres_find_the_bead_and_not_the_particle():
    tv = _bead_volume()
    centres = structure_centres(tv, seed=0, index=0)
    assert len(centres) > 0
    distance_to_bead = np.linalg.norm(centres - 36, axis=1)
    distance_to_particle = np.linalg.norm(centres - 12, axis=1)
    assert np.mean(distance_to_bead < 12) > 0.95  # around the bead: noise rarely exceeds the floor
    assert distance_to_particle.min() >= STRUCTURE_MARGIN
    assert np.array_equal(centres, structure_centres(tv, seed=0, index=0))


def test_structure_share_centres_crops_on_structure():
    tv = _bead_volume()

    def near_bead(share):
        data = CropDataset([tv], 16, seed=1, particle_share=0.2, augment=False, structure_share=share)
        corners = [data._corner(np.random.default_rng([1, 0, i]))[1] for i in range(400)]
        return np.mean([np.all(np.abs(c + 8 - 36) <= 8 + 3) for c in corners])  # the crop holds bead voxels

    uniform, structured = near_bead(0.0), near_bead(0.8)
    assert uniform < 0.3
    assert structured > 0.75
    # particle-centred crops are unchanged by the structure share: the same draw decides the kind
    plain = CropDataset([tv], 16, seed=1, particle_share=0.2, augment=False)
    mixed = CropDataset([tv], 16, seed=1, particle_share=0.2, augment=False, structure_share=0.5)
    for i in range(50):
        rng_a, rng_b = np.random.default_rng([1, 0, i]), np.random.default_rng([1, 0, i])
        if rng_a.random() < 0.2:
            assert np.array_equal(plain._corner(rng_b)[1], mixed._corner(np.random.default_rng([1, 0, i]))[1])
    with pytest.raises(VPDetectError, match="structure share"):
        CropDataset([tv], 16, seed=1, particle_share=0.7, structure_share=0.5)
    CropDataset([tv], 16, seed=1, particle_share=0.9, structure_share=0.1)  # shares adding up to 1 are fine


def test_shards_partition_the_epoch():
    shards = [shard_indices(40, 10, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(40, 50))
    assert shards[1] == [41, 44, 47]


# --------------------------------------------------------------------------- learning


def _volumes(shrec_dir, stage="localizer"):
    av = load_shrec_folder(shrec_dir)
    mapping = build_class_mapping(list(av.id_names.values()), stage)
    return [prepare_volume(av, mapping)], mapping.class_names


def _config(class_names, **kw):
    base = dict(width=2, depth=4, max_dilation=3, crop_size=14, batch_size=2, epochs=1,
                steps_per_epoch=4, lr=2e-2, lr_step=80, val_crops=4, class_names=class_names)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_network_learns_the_particles(shrec_dir):
    torch.manual_seed(0)
    volumes, names = _volumes(shrec_dir)
    train = CropDataset(volumes, 12, seed=0, particle_share=0.6)
    val = CropDataset(volumes, 12, seed=0, particle_share=0.6, augment=False, stream=1)
    trainer = Trainer(_config(names, steps_per_epoch=30, crop_size=12), train, val)
    images = torch.stack([val[i][0] for i in range(4)])
    targets = torch.stack([val[i][1] for i in range(4)])
    with torch.no_grad():
        before = focal_loss(trainer.model(images), targets).item()
    trainer.train_epoch()
    metrics = trainer.validate()
    assert metrics["val_loss"] < before / 10
    assert metrics["VA"] > 0.95
    assert metrics["MIoU"] > 0.75


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_reproduces_the_uninterrupted_run(shrec_dir, tmp_path):
    from vpdetect.nn.checkpoint import read_training_state, save_model

    volumes, names = _volumes(shrec_dir)

    def new_trainer(epochs):
        cfg = _config(names, epochs=epochs, steps_per_epoch=2, lr_step=2, crop_size=10, val_crops=2)
        train = CropDataset(volumes, 10, seed=1, particle_share=0.5)
        val = CropDataset(volumes, 10, seed=1, augment=False, stream=1)
        return Trainer(cfg, train, val)

    straight = new_trainer(4)
    assert fit(straight) == "done"

    first = new_trainer(4)
    first.config.epochs = 2
    fit(first)
    path = tmp_path / "last.pt"
    save_model(path, first.model, {"stage": "localizer", "class_names": names}, first.training_state())

    resumed = new_trainer(4)
    model, _ = load_model(path)
    resumed.load_training_state(read_training_state(path), model.state_dict())
    assert resumed.epoch == 2
    assert fit(resumed) == "done"
    assert torch.equal(_weights(straight.model), _weights(resumed.model))
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr() == pytest.approx([2e-4])
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]

    other = new_trainer(4)
    other.config.seed = 99
    with pytest.raises(VPDetectError, match="cannot resume: seed"):
        other.load_training_state(read_training_state(path), model.state_dict())


def test_history_csv_has_fixed_columns():
    text = history_csv([{"epoch": 1, "lr": 0.001, "train_loss": 0.5, "seconds": 2.0}])
    assert text.splitlines() == ["epoch,lr,train_loss,val_loss,VA,MVA,MIoU,seconds", "1,0.001,0.5,,,,,2"]


# --------------------------------------------------------------------------- command line


TINY = ["--width", "2", "--depth", "3", "--max-dilation", "2", "--crop-size", "10",
        "--batch-size", "2", "--steps-per-epoch", "2", "--val-crops", "2", "--threads", "1"]


def test_cli_trains_writes_model_log_curves_and_resumes(shrec_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "loc.pt"
    args = ["train", "localizer", "--data", str(shrec_dir), "--val", str(shrec_dir), "--out", str(out), *TINY]
    result = runner.invoke(app, [*args, "--epochs", "2"])
    assert result.exit_code == 0, result.output
    for name in ("loc.pt", "loc.last.pt", "loc.log.csv", "loc.curves.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "loc.curves.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "loc.log.csv").read_text().splitlines()) == 3
    card = read_model_card(out)
    assert card["stage"] == "localizer" and card["class_names"] == ["background", "particle"]
    assert card["arch"]["depth"] == 3 and card["crop_size"] == 10 and card["voxel_size"] == 10.0
    assert card["provenance"]["seed"] == 0 and "MIoU" in card["metrics"]
    assert card["background_sigma"] == 8.0  # the localizer default, recorded for inference
    # the training tomogram's spectrum, what --match-spectrum filters a user's tomogram towards
    seen = subtract_background(read_tomogram(shrec_dir / "reconstruction.mrc").data, 8.0)
    expected = reference_profile([np.asarray(seen)])
    assert card["spectrum_reference"] == pytest.approx(expected, abs=1e-5)

    again = runner.invoke(app, [*args, "--epochs", "2"])
    assert again.exit_code == 2 and "--resume" in again.output

    resumed = runner.invoke(app, [*args, "--epochs", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming after epoch 2" in resumed.output
    assert len((tmp_path / "loc.log.csv").read_text().splitlines()) == 4
    assert read_model_card(tmp_path / "loc.last.pt")["provenance"]["epochs"] == 3
    # the crop stream is part of the schedule: another structure share cannot resume it
    changed = runner.invoke(app, [*args, "--epochs", "4", "--resume", "--structure-share", "0.2"])
    assert changed.exit_code == 2 and "structure share was 0.0, now 0.2" in changed.output

    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0 and "localizer" in info.output
    assert "background subtracted: Gaussian of sigma 8 voxels" in info.output
    with pytest.raises(VPDetectError, match="classifier model is needed"):
        load_model(out, stage="classifier")


def test_cli_init_grows_a_shallower_localizer_and_refuses_another_width(shrec_dir, tmp_path):
    runner = CliRunner()
    base = ["train", "localizer", "--data", str(shrec_dir), "--epochs", "1", *TINY]
    first = runner.invoke(app, [*base, "--out", str(tmp_path / "a.pt")])
    assert first.exit_code == 0, first.output
    grown = runner.invoke(app, [*base, "--out", str(tmp_path / "b.pt"), "--depth", "5",
                                "--init", str(tmp_path / "a.pt")])
    assert grown.exit_code == 0, grown.output
    assert "depth 3 grown to 5" in " ".join(grown.output.split())
    assert read_model_card(tmp_path / "b.pt")["arch"]["depth"] == 5
    wider = runner.invoke(app, [*base, "--out", str(tmp_path / "c.pt"), "--width", "3",
                                "--init", str(tmp_path / "a.pt")])
    assert wider.exit_code == 2 and "only the depth may increase" in wider.output
    assert "Traceback" not in wider.output and not (tmp_path / "c.pt").exists()


def test_cli_init_from_a_verified_localizer_leaves_the_verifier_behind(shrec_dir, tmp_path):
    from vpdetect.nn.checkpoint import load_model, save_model
    from vpdetect.nn.verifier import PickVerifier

    runner = CliRunner()
    base = ["train", "localizer", "--data", str(shrec_dir), "--epochs", "1", *TINY]
    assert runner.invoke(app, [*base, "--out", str(tmp_path / "a.pt")]).exit_code == 0
    net, card = load_model(tmp_path / "a.pt")
    net.verifier = PickVerifier(2, 2, 8)
    save_model(tmp_path / "verified.pt", net, {**card, "verifier": {"min_score": 0.2}})
    again = runner.invoke(app, [*base, "--out", str(tmp_path / "b.pt"), "--init", str(tmp_path / "verified.pt")])
    assert again.exit_code == 0, again.output
    assert "not carried over" in " ".join(again.output.split())
    assert "verifier" not in read_model_card(tmp_path / "b.pt")


def test_cli_classifier_from_coordinates(tmp_path, shrec_dir):
    table = ParticleTable(
        data=pd.DataFrame({
            "x": [6.0, 20.0, 18.0], "y": [6.0, 20.0, 8.0], "z": [6.0, 8.0, 20.0],
            "class_name": ["small", "large", "small"],
        }),
        voxel_size=10.0,
    )
    write_particles(tmp_path / "picks.csv", table)
    out = tmp_path / "cls.pt"
    result = CliRunner().invoke(app, [
        "train", "classifier", "--tomogram", str(shrec_dir / "reconstruction.mrc"),
        "--table", str(tmp_path / "picks.csv"), "--radius", "25", "--radius", "large=40",
        "--out", str(out), "--epochs", "1", *TINY,
    ])
    assert result.exit_code == 0, result.output
    card = read_model_card(out)
    assert card["class_names"] == ["background", "large", "small"]
    # alpha from radii 4 and 2.5 voxels: the small class weighs (4/2.5)^3 times more.
    alpha = card["provenance"]["alpha"]
    assert alpha[2] / alpha[1] == pytest.approx((4 / 2.5) ** 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "detector", "--data", "X"], "stage must be localizer or classifier"),
        (["train", "localizer"], "no training data"),
        (["train", "classifier", "--data", "X", "--classes", "ribosome"], "not in the data: ribosome"),
        (["train", "localizer", "--tomogram", "X"], "one --table per --tomogram"),
        (["train", "localizer", "--data", "X", "--resume"], "cannot resume"),
        (["train", "classifier", "--data", "X", "--background-sigma", "4"], "applies to localizers only"),
        (["train", "classifier", "--data", "X", "--arch", "rb3d", "--size-balance", "2"], "applies to MSDNet crops"),
        (["train", "classifier", "--data", "X", "--arch", "rb3d", "--structure-share", "0.1"], "applies to MSDNet"),
        (["train", "localizer", "--data", "X", "--particle-share", "0.9", "--structure-share", "0.2"],
         "structure share must lie in"),
    ],
)
def test_cli_errors_are_one_line(args, message, shrec_dir, tmp_path):
    args = [str(shrec_dir) if a == "X" else a for a in args]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "m.pt"), *TINY, "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m.pt").exists()


def test_relion5_table_without_tomogram_block_uses_the_tomogram_size(tmp_path):
    # RELION 5's particles.star holds centred Angstrom coordinates but no tomogram
    # sizes (those live in tomograms.star); the tomogram given beside it has them.
    from vpdetect.train.data import load_coordinate_volume

    write_mrc(tmp_path / "TS_01.mrc", np.zeros((20, 24, 30), np.float32), voxel_size=10.0)
    (tmp_path / "particles.star").write_text(
        "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnTomoTiltSeriesPixelSize #2\n1 10.0\n\n"
        "data_particles\n\nloop_\n_rlnTomoName #1\n_rlnCenteredCoordinateXAngst #2\n"
        "_rlnCenteredCoordinateYAngst #3\n_rlnCenteredCoordinateZAngst #4\n_rlnOpticsGroup #5\n"
        "TS_01 -50.0 20.0 0.0 1\n"
    )
    av = load_coordinate_volume(tmp_path / "TS_01.mrc", tmp_path / "particles.star", 2.0, {}, "voxel")
    # x = -50/10 + 30/2, y = 20/10 + 24/2, z = 0 + 20/2, stored [z, y, x].
    np.testing.assert_allclose(av.centres_zyx, [[10.0, 14.0, 10.0]])
    assert av.label_map[10, 14, 10] == 1


def test_deterministic_training_repeats_and_leaves_the_flags_as_they_were(shrec_dir):
    volumes, names = _volumes(shrec_dir)
    seen = []

    def run():
        cfg = _config(names, steps_per_epoch=2, crop_size=10, val_crops=2, deterministic=True)
        trainer = Trainer(cfg, CropDataset(volumes, 10, seed=3), CropDataset(volumes, 10, seed=3, stream=1))
        fit(trainer, on_step=lambda step, loss: seen.append(
            (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)))
        return _weights(trainer.model)

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    assert torch.equal(run(), run())
    assert seen and all(flags == (True, True, False) for flags in seen)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic) == before


def test_cli_deterministic_is_recorded(shrec_dir, tmp_path):
    out = tmp_path / "det.pt"
    result = CliRunner().invoke(app, ["train", "localizer", "--data", str(shrec_dir), "--out", str(out),
                                      *TINY, "--epochs", "1", "--deterministic"])
    assert result.exit_code == 0, result.output
    assert read_model_card(out)["provenance"]["deterministic"] is True


def test_cli_match_spectrum_trains_on_matched_tomograms_and_the_model_matches_by_default(shrec_dir, tmp_path):
    from vpdetect.spectrum import match_spectrum
    from vpdetect.train.data import (
        build_class_mapping,
        load_shrec_folder,
        prepare_volume,
        spectrum_matched,
    )

    runner = CliRunner()
    out = tmp_path / "loc.pt"
    def args(path):
        return ["train", "localizer", "--data", str(shrec_dir), "--out", str(path), *TINY, "--epochs", "1"]

    result = runner.invoke(app, [*args(out), "--match-spectrum"])
    assert result.exit_code == 0, result.output
    card = read_model_card(out)
    assert card["match_spectrum"] is True and card["provenance"]["spectrum_matched"] is True
    # The reference is measured before matching: the same as without the option.
    plain = tmp_path / "plain.pt"
    assert runner.invoke(app, args(plain)).exit_code == 0
    assert "match_spectrum" not in read_model_card(plain)
    assert card["spectrum_reference"] == pytest.approx(read_model_card(plain)["spectrum_reference"], abs=1e-6)
    # What the crops are cut from: the tomogram as `localize` filters it, normalised again.
    av = load_shrec_folder(shrec_dir)
    mapping = build_class_mapping(list(av.id_names.values()) + av.centre_names, "localizer")
    tv = prepare_volume(av, mapping, "robust", background_sigma=8.0)
    matched = spectrum_matched(tv, card["spectrum_reference"], "robust")
    np.testing.assert_allclose(matched.volume, match_spectrum(tv.volume, card["spectrum_reference"]), atol=1e-6)
    assert matched.std * tv.std > 0 and matched.targets is tv.targets
    bad = runner.invoke(app, ["train", "classifier", "--data", str(shrec_dir), "--out", str(tmp_path / "c.pt"),
                              "--match-spectrum"])
    assert bad.exit_code != 0 and "localizers only" in bad.output


def _training_volume(volume, std=1.0, voxel_size=10.0):
    from vpdetect.train.data import TrainingVolume

    targets = np.zeros(volume.shape, dtype=np.int16)
    targets[0, 0, 0] = 1
    return TrainingVolume("t", volume, 0.0, std, targets, np.zeros((1, 3), np.int64), np.ones(1, np.int64),
                          voxel_size=voxel_size, clip=5.0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_streaks_removed_cleans_a_training_tomogram_as_localize_does(sign):
    from tests.test_gold_streaks import tomogram
    from vpdetect.localize.gold_streaks import remove_gold_streaks
    from vpdetect.preprocess import normalisation_params
    from vpdetect.train.data import streaks_removed

    volume, bead, rest = (sign * v for v in tomogram(np.random.default_rng(3)))
    tv = _training_volume(volume, std=-1.0)  # a flipped tomogram: the sign is the contrast's
    cleaned = streaks_removed(tv, "robust")
    expected, beads, _ = remove_gold_streaks(volume, *normalisation_params(volume, "robust"))
    assert len(beads) == 1
    np.testing.assert_array_equal(cleaned.volume, expected)
    streaks = (np.abs(bead) > 1.0) & (np.abs(bead) < 0.2 * np.abs(bead).max())  # its rays, not its core
    assert np.abs(cleaned.volume - rest)[streaks].mean() < 0.3 * np.abs(bead[streaks]).mean()
    # Normalisation measured again on the cleaned tomogram, contrast sign kept; labels untouched.
    centre, scale = normalisation_params(expected, "robust")
    assert cleaned.mean == pytest.approx(centre) and cleaned.std == pytest.approx(-scale)
    assert cleaned.targets is tv.targets
    quiet = _training_volume(np.random.default_rng(4).normal(size=(24, 24, 24)).astype(np.float32))
    assert streaks_removed(quiet, "robust") is quiet  # no bead: nothing copied


def test_membranes_erased_cleans_a_training_tomogram_as_localize_does():
    from tests.test_membranes import membrane_scene
    from vpdetect.localize.membranes import erase_membranes
    from vpdetect.train.data import membranes_erased

    volume, balls, plane = membrane_scene(np.random.default_rng(5))
    # Dense matter dark, as the model expects: the normalisation's scale is positive.
    tv = _training_volume(-volume, std=0.3)
    erased = membranes_erased(tv)
    expected, _ = erase_membranes(-volume, 0.0, 0.3, dense_sign=-1.0, voxel_nm=1.0)
    np.testing.assert_array_equal(erased.volume, expected)
    assert (erased.volume[plane] != -volume[plane]).mean() > 0.9 and (erased.volume[balls] == -volume[balls]).all()
    assert (erased.mean, erased.std) == (tv.mean, tv.std) and erased.targets is tv.targets
    # The same tomogram stored bright and flipped for training (negative scale): the same voxels erased.
    flipped = membranes_erased(_training_volume(volume, std=-0.3))
    np.testing.assert_array_equal(flipped.volume != volume, erased.volume != -volume)


def test_cli_cleaning_flags_are_recorded_and_refused_for_classifiers(shrec_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "clean.pt"
    result = runner.invoke(app, ["train", "localizer", "--data", str(shrec_dir), "--out", str(out), *TINY,
                                 "--epochs", "1", "--remove-gold-streaks", "--erase-membranes"])
    assert result.exit_code == 0, result.output
    assert "gold streaks subtracted in 0 of 1 tomogram(s)" in " ".join(result.output.split())  # no bead there
    card = read_model_card(out)
    assert card["remove_gold_streaks"] is True and card["erase_membranes"] is True
    assert card["provenance"]["gold_streaks_removed"] is True and card["provenance"]["membranes_erased"] is True
    for flag in ("--remove-gold-streaks", "--erase-membranes"):
        bad = runner.invoke(app, ["train", "classifier", "--data", str(shrec_dir), "--out", str(tmp_path / "c.pt"),
                                  flag])
        assert bad.exit_code != 0 and "localizers only" in bad.output
