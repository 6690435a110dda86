"""copick projects and OME-Zarr tomograms: a small local project built with copick's own API."""

from __future__ import annotations

import numpy as np
import pytest

copick = pytest.importorskip("copick")

from copick.models import PickableObject  # noqa: E402
from copick.ops.add import add_tomogram  # noqa: E402
from test_classify import run_cli  # noqa: E402
from test_localize_cli import CENTRES, intensity_localizer, scene  # noqa: E402

from vpdetect.errors import VPDetectError  # noqa: E402
from vpdetect.io.mrc import read_mrc_header, read_tomogram  # noqa: E402
from vpdetect.io.particles import ParticleTable, zxz_matrix  # noqa: E402
from vpdetect.io.particles.copick_picks import (  # noqa: E402
    copick_tomograms,
    open_copick,
    read_copick_picks,
    write_copick_picks,
)


def make_project(folder, objects=("ribosome",)):
    return copick.new_config(
        str(folder / "config.json"), str(folder / "overlay"),
        pickable_objects=[PickableObject(name=n, is_particle=True, label=k, radius=50)
                          for k, n in enumerate(objects, start=1)],
    )


@pytest.fixture
def project(tmp_path, rng):
    root = make_project(tmp_path)
    volume = scene(rng)
    for run in ("TS_01", "TS_02"):
        add_tomogram(root, run, "denoised", volume, voxel_spacing=10.0)
    return tmp_path, root, volume


def test_omezarr_tomograms_read_directly(project):
    folder, root, volume = project
    paths = copick_tomograms(root, None, 10.0, "denoised")
    assert [p.name for p in paths] == ["denoised.zarr", "denoised.zarr"]
    tomo = read_tomogram(paths[0])
    np.testing.assert_array_equal(tomo.data, volume)
    assert tomo.voxel_size == 10.0 and tomo.name == "TS_01"  # a copick tomogram is named after its run
    assert read_mrc_header(paths[1]) == {"shape": volume.shape, "mode": None, "voxel_size": 10.0}
    with pytest.raises(VPDetectError, match="no 'wbp' tomogram"):
        copick_tomograms(root, ["TS_01"], 10.0, "wbp")
    with pytest.raises(VPDetectError, match="no run 'TS_09'"):
        copick_tomograms(root, ["TS_09"], 10.0, "denoised")


def test_picks_round_trip_through_copick(tmp_path):
    root = make_project(tmp_path, ("ribosome", "apoferritin"))
    table = ParticleTable.from_arrays(
        [[1, 2, 3], [10.5, 20, 30], [4, 5, 6]], voxel_size=10.0, tomo_name=["TS_01", "TS_01", "TS_02"],
        class_name=["ribosome", "apoferritin", "ribosome"], score=[0.9, 0.8, 0.7],
        phi=[10, 20, 30], theta=[40, 50, 60], psi=[70, 80, 90],
    )
    assert write_copick_picks(root, table, "vpdetect", "7") == 3
    # What copick itself holds: Angstrom from the first voxel's centre, the rotation in the transform.
    again = open_copick(tmp_path / "config.json")
    picks = again.get_run("TS_01").get_picks(object_name="apoferritin", user_id="vpdetect", session_id="7")
    positions, transforms = picks[0].numpy()
    np.testing.assert_allclose(positions, [[105, 200, 300]])
    np.testing.assert_allclose(transforms[0, :3, :3], zxz_matrix(20, 50, 80), atol=1e-9)
    back = read_copick_picks(again, 10.0, user_id="vpdetect")
    back.data = back.data.sort_values(["tomo_name", "x"]).reset_index(drop=True)
    np.testing.assert_allclose(back.coords_xyz(), [[1, 2, 3], [10.5, 20, 30], [4, 5, 6]])
    assert back.class_labels() == ["ribosome", "apoferritin", "ribosome"]
    np.testing.assert_allclose(back.data["score"], [0.9, 0.8, 0.7])
    np.testing.assert_allclose(
        zxz_matrix(*(back.data[c] for c in ("phi", "theta", "psi"))), zxz_matrix([10, 20, 30], [40, 50, 60], [70, 80, 90]),
        atol=1e-9)
    with pytest.raises(VPDetectError, match="not a pickable object"):
        write_copick_picks(root, ParticleTable.from_arrays([[1, 2, 3]], voxel_size=10.0, class_name="x"), "u", "0")
    unknown = ParticleTable.from_arrays([[1, 2, 3], [4, 5, 6]], voxel_size=10.0, tomo_name="TS_03",
                                        class_name=["unknown", "ribosome"], class_number=[0, 1])
    write_copick_picks(root, unknown, "u", "0")  # class 0 (unknown) is not stored
    assert len(read_copick_picks(root, 10.0, runs=["TS_03"], user_id="u")) == 1
    with pytest.raises(VPDetectError, match="no classes"):
        write_copick_picks(root, ParticleTable.from_arrays([[1, 2, 3]], voxel_size=10.0), "u", "0")


def test_localize_a_copick_project_and_store_the_picks(project):
    folder, root, volume = project
    model = intensity_localizer(folder / "localizer.pt", volume)
    out = folder / "out"
    out.mkdir()
    result = run_cli("localize", "--copick", folder / "config.json", "--voxel-spacing", 10, "--run", "TS_02",
                     "--copick-user", "vpdetect", "--model", model, "--output-dir", out, "--tile", 24,
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.star")) == ["TS_02.star"]
    back = read_copick_picks(open_copick(folder / "config.json"), 10.0, user_id="vpdetect")
    assert set(back.data["tomo_name"]) == {"TS_02"} and set(back.data["class_name"]) == {"ribosome"}
    found = back.data[["z", "y", "x"]].to_numpy()
    assert len(found) == len(CENTRES)
    for centre in CENTRES:
        assert np.min(np.linalg.norm(found - np.asarray(centre), axis=1)) < 0.5
    result = run_cli("localize", folder / "x.mrc", "--copick", folder / "config.json", "--voxel-spacing", 10,
                     "--model", model)
    assert result.exit_code == 2 and "not both" in result.output


def test_evaluate_against_copick_picks(tmp_path):
    import json

    from vpdetect.io.particles import write_particles

    root = make_project(tmp_path, ("ribosome", "apoferritin"))
    truth = ParticleTable.from_arrays(
        [[10, 10, 10], [30, 30, 30], [10, 30, 20]], voxel_size=10.0, tomo_name=["TS_01", "TS_01", "TS_02"],
        class_name=["ribosome", "apoferritin", "ribosome"])
    write_copick_picks(root, truth, "curator", "0")
    write_copick_picks(root, ParticleTable.from_arrays([[0, 0, 0]], voxel_size=10.0, tomo_name="TS_01",
                                                       class_name="ribosome"), "other", "0")
    # The predictions: TS_01 exact, TS_02's ribosome missed; the other user's pick is not truth.
    pred = truth.copy()
    pred.data = pred.data.iloc[:2]
    write_particles(tmp_path / "pred.csv", pred)
    result = run_cli("evaluate", tmp_path / "pred.csv", "--truth", tmp_path / "config.json", "--truth-user",
                     "curator", "--pixel-size", 10, "--metric", "czii", "--radius", 50,
                     "--json", tmp_path / "scores.json")
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    ribosome = scores["czii"]["per_class"]["ribosome"]
    assert (ribosome["tp"], ribosome["fp"], ribosome["fn"]) == (1, 0, 1)  # the other user's pick is not truth
    # F-beta, beta 4: (1 + 16) P R / (16 P + R) with P = 1, R = 0.5.
    assert ribosome["fbeta"] == pytest.approx(17 * 0.5 / 16.5)
    assert scores["tomograms"]["TS_01"]["czii"]["score"] == 1.0
    result = run_cli("evaluate", tmp_path / "pred.csv", "--truth", tmp_path / "config.json", "--metric", "czii",
                     "--radius", 50)
    assert result.exit_code == 2 and "--pixel-size" in result.output


def test_train_on_a_copick_project(project, tmp_path):
    from test_train import TINY

    from vpdetect.nn.checkpoint import read_model_card
    from vpdetect.train.data import load_copick_volumes

    folder, root, volume = project
    balls = ParticleTable.from_arrays([(c[2], c[1], c[0]) for c in CENTRES], voxel_size=10.0, class_name="ribosome")
    for run in ("TS_01", "TS_02"):
        part = balls.copy()
        part.data["tomo_name"] = run
        write_copick_picks(root, part, "curator", "0")
    # The pickable object's radius (50 A = 5 voxels) paints the targets.
    (volume_01,) = load_copick_volumes(folder / "config.json", ["TS_01"], 10.0, "denoised", "curator", None, {})
    assert volume_01.radii_vox == {"ribosome": pytest.approx(5.0)}
    assert volume_01.label_map[10, 12, 12] > 0 and volume_01.label_map[10, 12, 18] == 0  # 6 voxels away
    out = tmp_path / "m.pt"
    result = run_cli("train", "localizer", "--copick", folder / "config.json", "--voxel-spacing", 10,
                     "--val-run", "TS_02", "--truth-user", "curator", "--out", out, "--epochs", 1, *TINY)
    assert result.exit_code == 0, result.output
    assert read_model_card(out)["stage"] == "localizer"


def test_pick_a_copick_project_stores_classified_picks(tmp_path, rng):
    from test_classify import save_scene_model, write_shrec_scene
    from test_pick_cli import LOCALIZE_ARGS, save_intensity_localizer

    volume, particles = write_shrec_scene(tmp_path / "model_0", rng)
    root = make_project(tmp_path, ("small", "large"))
    add_tomogram(root, "TS_01", "denoised", volume, voxel_spacing=10.0)
    localizer = save_intensity_localizer(tmp_path / "localizer.pt", volume)
    classifier = save_scene_model(tmp_path / "classifier.pt", volume)
    result = run_cli("pick", "--copick", tmp_path / "config.json", "--voxel-spacing", 10, "--copick-user", "vp",
                     "--localizer", localizer, "--classifier", classifier, "--output-dir", tmp_path,
                     *LOCALIZE_ARGS)
    assert result.exit_code == 0, result.output
    stored = read_copick_picks(open_copick(tmp_path / "config.json"), 10.0, user_id="vp")
    assert set(stored.data["tomo_name"]) == {"TS_01"} and len(stored) > 0
    assert set(stored.data["class_name"]) <= {"small", "large"}
    from vpdetect.io.particles import read_particles

    table = read_particles(tmp_path / "TS_01.star")
    assert sorted(map(tuple, np.round(table.coords_xyz(), 3))) == sorted(map(tuple, np.round(stored.coords_xyz(), 3)))
