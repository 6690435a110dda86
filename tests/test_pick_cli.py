"""`vpdetect pick`: localize then classify in one process, one table per tomogram."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_classify import (
    intensity_classifier,
    run_cli,
    save_scene_model,
    write_shrec_scene,
)


def save_intensity_localizer(path, volume, sharpness: float = 20.0):
    """A localizer MSDNet whose foreground is 'normalised intensity above raw 0.5' (layers zeroed)."""
    import torch

    from vpdetect.nn.checkpoint import save_model
    from vpdetect.nn.msdnet import MSDNet
    from vpdetect.preprocess import zscore_params

    mean, std = zscore_params(volume)
    model, card = intensity_classifier((0.5 - mean) / std, 1e9, sharpness)  # class 2 never wins

    localizer = MSDNet(in_channels=1, n_classes=2, width=1, depth=2, max_dilation=1)
    with torch.no_grad():
        for p in localizer.parameters():
            p.zero_()
        localizer.final.weight[1] = model.final.weight[1]
        localizer.final.bias[1] = model.final.bias[1]
    card = dict(card, stage="localizer", class_names=["background", "particle"], arch=localizer.arch())
    save_model(path, localizer, card)
    return path


@pytest.fixture
def scenes(tmp_path, rng):
    """Two SHREC folders with the two-class scene (independent noise) and both models."""
    volume, particles = write_shrec_scene(tmp_path / "model_0", rng)
    write_shrec_scene(tmp_path / "model_1", rng)
    tomos = tmp_path / "tomos"
    tomos.mkdir()
    for k in (0, 1):
        (tomos / f"TS_0{k}.mrc").symlink_to(tmp_path / f"model_{k}" / "reconstruction.mrc")
    return {
        "root": tmp_path,
        "tomos": tomos,
        "particles": particles,
        "localizer": save_intensity_localizer(tmp_path / "localizer.pt", volume),
        "classifier": save_scene_model(tmp_path / "classifier.pt", volume),
    }


LOCALIZE_ARGS = ("--device", "cpu", "--tile", "32", "--bandwidth", "3", "--min-size", "5", "--opening-radius", "0")


def test_pick_tables_per_tomogram_then_evaluate(scenes):
    from vpdetect.io.particles import read_particles

    root = scenes["root"]
    out_dir = root / "picks"
    result = run_cli(
        "pick", scenes["tomos"] / "*.mrc", "--localizer", scenes["localizer"],
        "--classifier", scenes["classifier"], "--output-dir", out_dir, *LOCALIZE_ARGS,
    )
    assert result.exit_code == 0, result.output
    truth = np.array([p[1:4] for p in scenes["particles"]], dtype=float)
    names = [p[0] for p in scenes["particles"]]
    for k in (0, 1):
        table = read_particles(out_dir / f"TS_0{k}.star")
        data = table.data
        assert {"score", "class_name", "class_number", "vote_fraction", "vote_margin"} <= set(data.columns)
        assert set(data["tomo_name"]) == {f"TS_0{k}"}
        # every true particle is picked near its centre and given its class (cut particles at
        # the edge are found at the centroid of their visible part, hence 3 voxels)
        coords = table.coords_xyz()
        for centre, name in zip(truth, names, strict=True):
            nearest = np.argmin(np.linalg.norm(coords - centre, axis=1))
            assert np.linalg.norm(coords[nearest] - centre) < 3.0
            assert data["class_name"].iloc[nearest] == name
        sidecar = json.loads((out_dir / f"TS_0{k}.star.json").read_text())
        assert sidecar["command"] == "pick" and set(sidecar["models"]) == {"localizer", "classifier"}
        assert sidecar["result"]["n_particles"] == len(data)

    metrics = root / "metrics.json"
    scored = run_cli("evaluate", out_dir / "TS_00.star", "--truth", root / "model_0", "--json", metrics)
    assert scored.exit_code == 0, scored.output
    classification = json.loads(metrics.read_text())["classification"]["per_class"]
    assert {k.lower(): v["recall"] for k, v in classification.items()} == {"small": 1.0, "large": 1.0}

    # a rerun resumes: finished tomograms are skipped
    again = run_cli(
        "pick", scenes["tomos"] / "*.mrc", "--localizer", scenes["localizer"],
        "--classifier", scenes["classifier"], "--output-dir", out_dir, *LOCALIZE_ARGS,
    )
    assert again.exit_code == 0 and "2 skipped" in again.output


def test_pick_single_output_and_same_result_as_two_stages(scenes, monkeypatch):
    import vpdetect.io.mrc
    from vpdetect.io.particles import read_particles

    root = scenes["root"]
    tomo = scenes["tomos"] / "TS_00.mrc"
    picked = root / "one.csv"
    reads = []
    original_read = vpdetect.io.mrc.read_tomogram

    def counting_read(path, *args, **kwargs):
        reads.append(str(path))
        return original_read(path, *args, **kwargs)

    monkeypatch.setattr(vpdetect.io.mrc, "read_tomogram", counting_read)
    result = run_cli(
        "pick", tomo, "--localizer", scenes["localizer"], "--classifier", scenes["classifier"],
        "-o", picked, *LOCALIZE_ARGS,
    )
    assert result.exit_code == 0, result.output
    assert reads == [str(tomo)]  # both stages share one read of the tomogram
    monkeypatch.undo()
    # localize, then classify the localize table: the same rows and classes
    located = root / "located.star"
    assert run_cli("localize", tomo, "--model", scenes["localizer"], "-o", located, *LOCALIZE_ARGS).exit_code == 0
    classified = root / "classified.csv"
    two_stage = run_cli("classify", located, "--model", scenes["classifier"], "-o", classified, "--device", "cpu")
    assert two_stage.exit_code == 0, two_stage.output
    one, two = read_particles(picked).data, read_particles(classified).data
    np.testing.assert_allclose(one[["x", "y", "z"]], two[["x", "y", "z"]], atol=1e-5)
    assert one["class_name"].tolist() == two["class_name"].tolist()
    np.testing.assert_allclose(one["vote_fraction"], two["vote_fraction"], atol=1e-6)


def test_pick_wrong_models_and_empty_tomogram(scenes, rng):
    from vpdetect.io.mrc import write_mrc
    from vpdetect.io.particles import read_particles

    root = scenes["root"]
    tomo = scenes["tomos"] / "TS_00.mrc"
    swapped = run_cli(
        "pick", tomo, "--localizer", scenes["classifier"], "--classifier", scenes["classifier"],
        "-o", root / "x.star", *LOCALIZE_ARGS,
    )
    assert swapped.exit_code == 2 and "localizer" in swapped.output and not (root / "x.star").exists()
    swapped = run_cli(
        "pick", tomo, "--localizer", scenes["localizer"], "--classifier", scenes["localizer"],
        "-o", root / "x.star", *LOCALIZE_ARGS,
    )
    assert swapped.exit_code == 2 and "classifier" in swapped.output and not (root / "x.star").exists()

    # a tomogram of noise only: an empty table that still has the class columns
    noise = root / "noise.mrc"
    volume = rng.normal(0, 0.05, size=(40, 40, 40)).astype(np.float32)
    volume[0, 0, 0] = 30.0  # one hot voxel sets the scale; too small to be a particle
    write_mrc(noise, volume, voxel_size=10.0)
    empty = run_cli(
        "pick", noise, "--localizer", scenes["localizer"], "--classifier", scenes["classifier"],
        "-o", root / "empty.csv", *LOCALIZE_ARGS,
    )
    assert empty.exit_code == 0, empty.output
    data = read_particles(root / "empty.csv").data
    assert len(data) == 0 and {"class_name", "vote_fraction"} <= set(data.columns)


def test_pick_normalises_each_tomogram_once_for_both_stages(scenes, monkeypatch):
    import vpdetect.preprocess

    calls = []
    original = vpdetect.preprocess.zscore_params

    def counting(volume):
        calls.append(volume.shape)
        return original(volume)

    monkeypatch.setattr(vpdetect.preprocess, "zscore_params", counting)
    result = run_cli(
        "pick", scenes["tomos"] / "TS_00.mrc", "--localizer", scenes["localizer"],
        "--classifier", scenes["classifier"], "-o", scenes["root"] / "once.csv", *LOCALIZE_ARGS,
    )
    assert result.exit_code == 0, result.output
    assert len(calls) == 1  # one pass over the tomogram serves localization and classification
