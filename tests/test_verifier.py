"""The localizer's pick verifier: network, boxes, scores, training, model files and the commands."""

import numpy as np
import pytest
import torch

import vpdetect.cli  # noqa: F401  registers the commands
from tests.test_localize_cli import CENTRES, RADIUS, SHAPE, intensity_localizer, run, scene
from vpdetect.errors import VPDetectError
from vpdetect.io.mrc import write_mrc
from vpdetect.io.particles import ParticleTable, read_particles, write_particles
from vpdetect.localize.pipeline import LocalizeOptions, ModelInput
from vpdetect.localize.verify import verifier_boxes, verifier_scores
from vpdetect.nn.checkpoint import load_model, read_model_card, save_model
from vpdetect.nn.verifier import PickVerifier, build_verifier
from vpdetect.train.verifier import (
    Candidates,
    candidate_settings,
    roc_auc,
    train_verifier,
    unique_picks,
)

# Balls the intensity localizer finds but the truth does not list: its false picks.
EXTRA = [(10.0, 30.0, 12.0), (26.0, 12.0, 12.0)]  # [z, y, x]


def constant_verifier(logit: float, box_size: int = 8) -> PickVerifier:
    """A verifier that gives every box the score sigmoid(logit)."""
    verifier = PickVerifier(2, 2, box_size)
    with torch.no_grad():
        verifier.head[1].weight.zero_()
        verifier.head[1].bias.fill_(logit)
    return verifier.eval()


def test_verifier_scores_boxes_and_its_arch_rebuilds_it():
    verifier = PickVerifier(2, 4, 12).eval()
    assert verifier(torch.zeros(3, 2, 12, 12, 12)).shape == (3,)
    assert build_verifier(verifier.arch()).arch() == verifier.arch()
    with pytest.raises(ValueError, match="multiple of 4"):
        PickVerifier(2, 4, 10)
    with pytest.raises(ValueError, match="incomplete"):
        build_verifier({"name": "pick-verifier", "in_channels": 2, "width": 0, "box_size": 12})


def test_boxes_hold_the_normalised_input_and_the_map_centred_on_the_pick():
    volume = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    prob = (volume / volume.max()).astype(np.float16)
    prepared = ModelInput(volume, centre=100.0, scale=-4.0, clip=None, contrast="dark", contrast_score=None,
                          scale_zyx=None)
    boxes = verifier_boxes(prepared, prob, np.array([[5.2, 6.0, 7.4], [0.0, 0.0, 13.0]]), 4)
    assert boxes.shape == (2, 2, 4, 4, 4) and boxes.dtype == np.float32
    # The pick's voxel (5, 6, 7) sits at index 2 of a 4-voxel box.
    np.testing.assert_allclose(boxes[0, 0], (volume[3:7, 4:8, 5:9] - 100.0) / -4.0)
    np.testing.assert_allclose(boxes[0, 1], prob[3:7, 4:8, 5:9].astype(np.float32))
    # At the corner, what lies outside the volume is zero.
    assert (boxes[1, :, :2] == 0).all() and (boxes[1, :, :, :2] == 0).all() and (boxes[1, :, :, :, 3:] == 0).all()
    np.testing.assert_allclose(boxes[1, 0, 2:, 2:, :3], (volume[:2, :2, 11:] - 100.0) / -4.0)
    clipped = verifier_boxes(ModelInput(volume, 0.0, 1.0, 5.0, "dark", None, None), prob, np.array([[5, 6, 7]]), 4)
    assert clipped[0, 0].max() == 5.0


def test_scores_average_the_box_and_its_x_flip():
    torch.manual_seed(1)
    verifier = PickVerifier(2, 2, 8).eval()
    boxes = np.random.default_rng(0).normal(size=(5, 2, 8, 8, 8)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(boxes)
        expected = (torch.sigmoid(verifier(x)) + torch.sigmoid(verifier(x.flip(-1)))).numpy() / 2
    np.testing.assert_allclose(verifier_scores(verifier, boxes, batch_size=2), expected, rtol=1e-5)
    assert verifier_scores(verifier, boxes[:0]).shape == (0,)


def test_unique_picks_keep_the_first_of_close_pairs():
    first = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    second = np.array([[1.0, 1.0, 0.0], [20.0, 0.0, 0.0]])
    np.testing.assert_array_equal(unique_picks([first, second]), [[0, 0, 0], [10, 0, 0], [20, 0, 0]])


def test_candidates_come_from_the_cards_threshold_a_lower_one_and_unopened_blobs():
    assert candidate_settings(LocalizeOptions(threshold=0.5)) == [
        {"threshold": 0.5}, {"threshold": 0.3}, {"threshold": 0.5, "spare_small": 1.0}]
    assert candidate_settings(LocalizeOptions(threshold=0.3)) == [{"threshold": 0.3}, {"threshold": 0.3, "spare_small": 1.0}]


def test_roc_auc_matches_the_pairwise_definition(rng):
    scores = rng.normal(size=60).round(1)  # with ties
    labels = rng.random(60) < 0.4
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in scores[labels] for n in scores[~labels]]
    assert roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert roc_auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert np.isnan(roc_auc(np.array([0.1, 0.9]), np.array([1, 1])))


def synthetic_candidates(rng, n=160, box=8):
    """True boxes hold a bright centre in the input channel, false ones noise only."""
    boxes = rng.normal(0.0, 1.0, (n, 2, box, box, box)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.int8)
    c = slice(box // 2 - 2, box // 2 + 2)
    boxes[labels == 1, 0, c, c, c] += 3.0
    return Candidates(boxes.astype(np.float16), labels)


def test_training_learns_a_separable_task_and_repeats_by_seed(rng):
    train = synthetic_candidates(rng)
    val = synthetic_candidates(np.random.default_rng(5), 60)
    model, history = train_verifier(train, val, width=4, epochs=4, seed=3)
    assert len(history) == 4 and history[-1]["val_auc"] > 0.95
    assert set(history[-1]) >= {"loss", "val_true_kept", "val_false_dropped"}
    again, _ = train_verifier(train, val, width=4, epochs=4, seed=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    with pytest.raises(ValueError, match="all true or all false"):
        train_verifier(Candidates(train.boxes[:4], np.ones(4, np.int8)), None, epochs=1)


def verified_localizer(tmp_path, volume, logit: float, min_score: float = 0.5):
    """The ball scene's intensity localizer holding a constant verifier; its card asks for `min_score`."""
    path = intensity_localizer(tmp_path / "plain.pt", volume)
    net, card = load_model(path)
    net.verifier = constant_verifier(logit)
    out = tmp_path / f"verified_{logit:g}.pt"
    save_model(out, net, {**card, "verifier": {"min_score": min_score}})
    return out


def test_model_file_keeps_the_verifier_and_refuses_a_bad_entry(tmp_path, rng):
    path = verified_localizer(tmp_path, scene(rng), 2.0)
    net, card = load_model(path)
    assert card["verifier"]["arch"] == {"name": "pick-verifier", "in_channels": 2, "width": 2, "box_size": 8}
    assert card["verifier"]["min_score"] == 0.5
    assert net.verifier.head[1].bias.item() == pytest.approx(2.0)
    # A network without a verifier drops a copied card's claim to one.
    plain, _ = load_model(tmp_path / "plain.pt")
    save_model(tmp_path / "copy.pt", plain, card)
    assert "verifier" not in read_model_card(tmp_path / "copy.pt")
    with pytest.raises(VPDetectError, match="min_score"):
        save_model(tmp_path / "bad.pt", net, {**card, "verifier": {"min_score": 1.5}})
    assert run("info", path).output.count("pick verifier") == 1


def test_options_take_the_verifier_from_the_card():
    card = {"verifier": {"min_score": 0.3, "arch": {}}}
    resolved = LocalizeOptions().with_model_defaults(card)
    assert resolved.verify is True and resolved.min_verified == 0.3
    assert LocalizeOptions(verify=False, min_verified=0.6).with_model_defaults(card).min_verified == 0.6
    assert LocalizeOptions().with_model_defaults({}).verify is False
    with pytest.raises(VPDetectError, match="no pick verifier"):
        LocalizeOptions(verify=True).with_model_defaults({})
    with pytest.raises(VPDetectError, match=r"\[0, 1\]"):
        LocalizeOptions(min_verified=2.0).with_model_defaults(card)


def test_localize_drops_what_the_verifier_rejects_unless_told_not_to(tmp_path, rng):
    volume = scene(rng)
    write_mrc(tmp_path / "TS_01.mrc", volume, voxel_size=10.0)
    common = ("--tile", 24, "--device", "cpu", "--spare-small", 1, "--overwrite")
    rejecting = verified_localizer(tmp_path, volume, -4.0)
    result = run("localize", tmp_path / "TS_01.mrc", "--model", rejecting, "-o", tmp_path / "none.csv", *common)
    assert result.exit_code == 0, result.output
    assert len(read_particles(tmp_path / "none.csv")) == 0
    assert "pick verifier dropped 4 of 4 pick(s) under 0.5" in " ".join(result.output.split())
    assert " verify " in result.output  # its own phase in the timing line
    result = run("localize", tmp_path / "TS_01.mrc", "--model", rejecting, "-o", tmp_path / "all.csv", "--no-verify",
                 *common)
    assert result.exit_code == 0, result.output
    assert len(read_particles(tmp_path / "all.csv")) == len(CENTRES)
    result = run("localize", tmp_path / "TS_01.mrc", "--model", rejecting, "-o", tmp_path / "low.csv",
                 "--min-verified", 0.01, *common)
    assert len(read_particles(tmp_path / "low.csv")) == len(CENTRES)
    for flag, expected in (("--verify", 0), ("--no-verify", len(CENTRES))):  # pick: the same stage 1
        result = run("pick", tmp_path / "TS_01.mrc", "--localizer", rejecting, "-o", tmp_path / "pick.csv", flag,
                     *common)
        assert result.exit_code == 0, result.output
        assert len(read_particles(tmp_path / "pick.csv")) == expected
    accepting = verified_localizer(tmp_path, volume, 4.0)
    result = run("localize", tmp_path / "TS_01.mrc", "--model", accepting, "-o", tmp_path / "kept.csv", *common)
    assert len(read_particles(tmp_path / "kept.csv")) == len(CENTRES)
    plain = tmp_path / "plain.pt"
    result = run("localize", tmp_path / "TS_01.mrc", "--model", plain, "-o", tmp_path / "x.csv", "--verify", *common)
    assert result.exit_code == 2 and "no pick verifier" in result.output


def annotated_folder(folder, rng, listed=CENTRES):
    """A SHREC folder of the ball scene plus EXTRA balls, of which the truth lists `listed`."""
    folder.mkdir()
    z, y, x = np.indices(SHAPE)
    volume = scene(rng, centres=CENTRES + EXTRA)
    occupancy = np.zeros(SHAPE, np.int16)
    for k, c in enumerate(listed, start=1):
        occupancy[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= RADIUS**2] = k
    truth = ParticleTable.from_arrays(np.array(listed)[:, ::-1], voxel_size=10.0, tomo_size=SHAPE[::-1],
                                      class_name=["ball"] * len(listed))
    write_mrc(folder / "reconstruction.mrc", volume, voxel_size=10.0)
    write_mrc(folder / "occupancy_mask.mrc", occupancy, voxel_size=10.0)
    write_particles(folder / "particle_locations.txt", truth, fmt="shrec")
    return volume


def test_train_verifier_command_stores_a_verifier_trained_on_the_picks(tmp_path, rng):
    volume = annotated_folder(tmp_path / "train", rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    args = ("train-verifier", model, "--data", tmp_path / "train", "--val", tmp_path / "train", "--box-size", 8,
            "--width", 2, "--epochs", 2, "--min-score", 0.4)
    result = run(*args, "--out", tmp_path / "v.pt")
    assert result.exit_code == 0, result.output
    card = read_model_card(tmp_path / "v.pt")
    entry = card["verifier"]
    assert entry["min_score"] == 0.4 and entry["arch"]["box_size"] == 8
    assert entry["provenance"]["candidates"] == len(CENTRES) + len(EXTRA)
    assert entry["provenance"]["true_candidates"] == len(CENTRES)
    assert 0.0 <= entry["metrics"]["val_auc"] <= 1.0
    # Same data and seed: the same verifier.
    assert run(*args, "--out", tmp_path / "again.pt").exit_code == 0
    first, _ = load_model(tmp_path / "v.pt")
    second, _ = load_model(tmp_path / "again.pt")
    for key, value in first.verifier.state_dict().items():
        assert torch.equal(value, second.verifier.state_dict()[key]), key
    # The file exists: refused without --overwrite.
    result = run(*args, "--out", tmp_path / "v.pt")
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_train_verifier_refuses_data_without_false_picks_or_files(tmp_path, rng):
    volume = annotated_folder(tmp_path / "all", rng, listed=CENTRES + EXTRA)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    result = run("train-verifier", model, "--data", tmp_path / "all", "--out", tmp_path / "v.pt", "--box-size", 8)
    assert result.exit_code == 2 and "all true or all false" in result.output
    assert not (tmp_path / "v.pt").exists()
    (tmp_path / "empty").mkdir()
    result = run("train-verifier", model, "--data", tmp_path / "empty", "--out", tmp_path / "v.pt")
    assert result.exit_code == 2 and "no reconstruction.mrc" in result.output


def test_the_python_api_verifies_by_default_too(tmp_path, rng):
    from vpdetect import api

    volume = scene(rng)
    rejecting = verified_localizer(tmp_path, volume, -4.0)
    assert len(api.localize(volume, rejecting, voxel_size=10.0, tile=24, spare_small=1.0)) == 0
    kept = api.localize(volume, rejecting, voxel_size=10.0, tile=24, spare_small=1.0, verify=False)
    assert len(kept) == len(CENTRES)


def test_tune_keeps_the_verifier_and_a_bad_box_size_is_refused(tmp_path, rng):
    volume = annotated_folder(tmp_path / "val", rng)
    verified = verified_localizer(tmp_path, volume, 4.0, min_score=0.3)
    result = run("tune", verified, "--data", tmp_path / "val", "-o", tmp_path / "tuned.pt", "--tile", 24,
                 "--device", "cpu", "--threshold", 0.5, "--min-size", 5)
    assert result.exit_code == 0, result.output
    card = read_model_card(tmp_path / "tuned.pt")
    assert card["verifier"]["min_score"] == 0.3 and "postprocess" in card
    tuned, _ = load_model(tmp_path / "tuned.pt")
    assert tuned.verifier.head[1].bias.item() == pytest.approx(4.0)
    result = run("train-verifier", verified, "--data", tmp_path / "val", "--out", tmp_path / "v.pt",
                 "--box-size", 10)
    assert result.exit_code == 2 and "multiple of 4" in result.output and not (tmp_path / "v.pt").exists()
