"""vpdetect.api: arrays and DataFrames in and out, the same answers as the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_classify import ball, intensity_classifier
from test_localize_cli import CENTRES, SHAPE, intensity_localizer, run, scene

import vpdetect.api as vp
from vpdetect.errors import VPDetectError
from vpdetect.io.mrc import write_mrc
from vpdetect.preprocess import zscore_params

ROOT = Path(__file__).resolve().parents[1]

# Well separated balls of two densities in a 40^3 volume: (class, x, y, z, radius, density).
PARTICLES = [
    ("small", 10, 10, 10, 3, 1.0),
    ("large", 28, 12, 20, 5, 2.0),
    ("small", 12, 30, 28, 3, 1.0),
    ("large", 29, 29, 30, 5, 2.0),
]


def two_class_volume(rng):
    shape = (40, 40, 40)
    volume = rng.normal(0.0, 0.05, size=shape).astype(np.float32)
    for _, x, y, z, r, density in PARTICLES:
        volume[ball(shape, (z, y, x), r)] = density
    return volume


def classifier_for(volume):
    """The hand-made classifier: normalised intensity < 0.5 raw is background, < 1.5 small, else large."""
    mean, std = zscore_params(volume)
    return intensity_classifier((0.5 - mean) / std, (1.5 - mean) / std)


def test_localize_an_array_finds_the_planted_centres(tmp_path, rng):
    volume = scene(rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    seen = []
    picks = vp.localize(volume, model, voxel_size=10.0, tile=24,
                        progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert isinstance(picks, pd.DataFrame)
    got = picks[["z", "y", "x"]].to_numpy()
    assert len(got) == len(CENTRES)
    for c in CENTRES:
        assert np.min(np.linalg.norm(got - np.asarray(c), axis=1)) < 0.5
    assert picks.attrs == {"voxel_size": 10.0, "tomo_size": SHAPE[::-1]}
    assert "tomo_path" not in picks.columns  # an array has no file to record
    assert (picks["score"] > 0.9).all()
    # Progress counts tiles up to their total.
    assert seen and {s for s, _, _ in seen} == {"localize"} and seen[-1][1] == seen[-1][2]


def test_localize_matches_the_command_line(tmp_path, rng):
    volume = scene(rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    write_mrc(tmp_path / "TS_01.mrc", volume, voxel_size=10.0)
    result = run("localize", tmp_path / "TS_01.mrc", "--model", model, "-o", tmp_path / "p.csv",
                 "--tile", 24, "--min-size", 5, "--device", "cpu")
    assert result.exit_code == 0, result.output
    cli = vp.read_table(tmp_path / "p.csv")
    api = vp.localize(volume, model, tile=24, min_size=5)
    assert np.allclose(api[["x", "y", "z", "score"]].to_numpy(), cli[["x", "y", "z", "score"]].to_numpy(),
                       atol=1e-4)
    # The same file through a path gives the same table, with the tomogram's name and path.
    from_path = vp.localize(tmp_path / "TS_01.mrc", model, tile=24, min_size=5)
    assert set(from_path["tomo_name"]) == {"TS_01"} and "tomo_path" in from_path.columns


def test_options_are_passed_to_the_option_dataclasses_and_unknown_ones_refused(tmp_path, rng):
    volume = scene(rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    # Clusters smaller than the whole volume are dropped: the option reached LocalizeOptions.
    assert len(vp.localize(volume, model, min_size=10**6)) == 0
    # z_range restricts the search to the two upper balls (z 25, 26).
    upper = vp.localize(volume, model, z_range=(20, 35))
    assert sorted(np.round(upper["z"]).astype(int)) == [25, 26]
    with pytest.raises(VPDetectError, match="unknown option.*thresh"):
        vp.localize(volume, model, thresh=0.5)
    with pytest.raises(VPDetectError, match="3D volume"):
        vp.localize(volume[0], model)
    with pytest.raises(VPDetectError, match="mask has shape"):
        vp.localize(volume, model, mask=np.ones((3, 3, 3)))
    with pytest.raises(VPDetectError, match="mask selects no voxel"):
        vp.localize(volume, model, mask=np.zeros(volume.shape, bool))
    for bad in (0.0, -10.0, float("nan")):
        with pytest.raises(VPDetectError, match="must be a positive number"):
            vp.localize(volume, model, voxel_size=bad)


def test_classify_and_pick_give_each_ball_its_class(tmp_path, rng):
    volume = two_class_volume(rng)
    classifier = classifier_for(volume)
    coords = np.array([p[1:4] for p in PARTICLES], dtype=float)
    classes = vp.classify(volume, coords, classifier, batch_size=2)
    assert classes["class_name"].tolist() == [p[0] for p in PARTICLES]
    assert (classes["vote_fraction"] > 0.95).all()

    localizer = intensity_localizer(tmp_path / "loc.pt", volume)
    picks = vp.pick(volume, localizer, classifier, voxel_size=10.0, tile=24, box_batch_size=3,
                    search_radius=2.0)
    assert len(picks) == len(PARTICLES)
    truth = sorted(PARTICLES, key=lambda p: (p[3], p[2], p[1]))  # by z, y, x
    ordered = picks.iloc[np.lexsort((picks["x"], picks["y"], picks["z"]))]
    assert ordered["class_name"].tolist() == [p[0] for p in truth]
    assert np.abs(ordered[["x", "y", "z"]].to_numpy() - np.array([p[1:4] for p in truth])).max() < 0.5
    # The classifier's batch size goes by its command-line name; `batch_size` is the localizer's.
    with pytest.raises(VPDetectError, match="unknown option"):
        vp.pick(volume, localizer, classifier, not_an_option=1)
    # Nothing found: still the class columns, so every table has one layout.
    empty = vp.pick(volume, localizer, classifier, min_size=10**6)
    assert len(empty) == 0 and {"class_name", "vote_fraction"} <= set(empty.columns)


def test_evaluate_from_arrays_equals_evaluate_from_a_truth_folder(tmp_path):
    shape = (20, 20, 20)
    occupancy = np.zeros(shape, np.int16)
    occupancy[9:12, 9:12, 9:12] = 1
    occupancy[3:6, 3:6, 3:6] = 2
    truth = pd.DataFrame({"class_name": ["a", "b"], "x": [10.0, 4.0], "y": [10.0, 4.0], "z": [10.0, 4.0]})
    picks = pd.DataFrame({"x": [10.2, 15.0], "y": [9.8, 15.0], "z": [10.0, 15.0], "class_name": ["a", "a"]})
    scores = vp.evaluate(picks, truth, occupancy=occupancy)
    loc = scores["localization"]
    assert (loc["TP"], loc["FP"], loc["FN"]) == (1, 1, 1)
    assert loc["precision"] == 0.5 and loc["recall"] == 0.5

    folder = tmp_path / "model_0"
    folder.mkdir()
    write_mrc(folder / "occupancy_mask.mrc", occupancy)
    (folder / "particle_locations.txt").write_text("a 10 10 10 0 0 0\nb 4 4 4 0 0 0\n")
    assert vp.evaluate(picks, folder)["localization"] == loc
    with pytest.raises(VPDetectError, match="occupancy"):
        vp.evaluate(picks, truth)
    # Class b as context: not scored, so the one true particle is found.
    context = vp.evaluate(picks, folder, context=["vesicle", "b"])["localization"]
    assert (context["n_particles"], context["TP"], context["FP"], context["FN"]) == (1, 1, 1, 0)


def test_tables_round_trip_through_every_format(tmp_path):
    picks = pd.DataFrame({
        "x": [1.5, 20.0], "y": [2.0, 30.25], "z": [3.0, 4.0], "score": [0.9, 0.7],
        "class_name": ["ribosome", "proteasome"], "class_number": [1, 2],
    })
    picks.attrs = {"voxel_size": 10.0, "tomo_size": (64, 64, 32)}
    for name, fmt in (("p.star", None), ("p5.star", "relion5"), ("p.csv", None)):
        written = vp.write_table(tmp_path / name, picks, fmt=fmt)
        back = vp.read_table(tmp_path / name)
        assert written == (fmt or ("relion4" if name.endswith(".star") else "csv"))
        assert np.allclose(back[["x", "y", "z"]].to_numpy(), picks[["x", "y", "z"]].to_numpy())
        assert back["class_name"].tolist() == ["ribosome", "proteasome"]
        if name.endswith(".star"):  # CSV has no place for the voxel size
            assert back.attrs["voxel_size"] == 10.0
    assert vp.read_table(tmp_path / "p5.star").attrs["tomo_size"] == (64, 64, 32)
    # RELION 5 needs the tomogram size: without it, one line says so and nothing is written.
    with pytest.raises(VPDetectError):
        vp.write_table(tmp_path / "bad.star", pd.DataFrame({"x": [1.0], "y": [2.0], "z": [3.0]}), fmt="relion5")
    assert not (tmp_path / "bad.star").exists()
    # An (n, 3) array is a table of coordinates.
    assert vp.to_particle_table(np.zeros((4, 3))).data.shape == (4, 3)
    volume = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    vp.write_tomogram(tmp_path / "v.mrc", volume, voxel_size=7.0)
    tomo = vp.read_tomogram(tmp_path / "v.mrc")
    assert np.array_equal(tomo.data, volume) and tomo.voxel_size == pytest.approx(7.0)


@pytest.mark.slow
def test_api_example_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api_example.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "particles found, F1" in done.stdout
    assert (tmp_path / "picks.star").is_file() and "read" in done.stdout
