"""`vpdetect evaluate` on several tomograms, with both metrics, read at 80 columns."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from test_cli_foundation import assert_one_line_error, invoke
from test_czii import PRED_A, PRED_B, TRUTH_A, TRUTH_B, table

from vpdetect.errors import VPDetectError
from vpdetect.evaluate.pairing import Tomogram, pair_by_name, split_by_tomogram
from vpdetect.io.mrc import write_mrc
from vpdetect.io.particles import ParticleTable, write_particles

# One SHREC folder: 16 x 12 x 8 (x, y, z), a "long-named-particle-class" at (3, 3, 3) and a
# "short" at (10, 8, 4), both 3x3x3 blocks in the occupancy mask.
CLASSES = ["long-named-particle-class", "short"]
SIMULATION = {"voxel_size_angstrom": 10.0, "classes": [
    {"name": "long-named-particle-class", "radius_nm": 1.5, "size_group": "small"},
    {"name": "short", "radius_nm": 2.0, "size_group": "large"}]}


def shrec_folder(folder):
    folder.mkdir(parents=True)
    occupancy = np.zeros((8, 12, 16), dtype=np.int16)
    occupancy[2:5, 2:5, 2:5] = 1
    occupancy[3:6, 7:10, 9:12] = 2
    write_mrc(folder / "occupancy_mask.mrc", occupancy, voxel_size=10.0)
    write_particles(folder / "particle_locations.txt",
                    ParticleTable.from_arrays([(3, 3, 3), (10, 8, 4)], class_name=CLASSES))
    (folder / "simulation.json").write_text(json.dumps(SIMULATION))
    return folder


def picks_of(folder, path, rows):
    """A STAR file as `pick` writes it for folder/reconstruction.mrc: tomo_name and tomo_path."""
    write_particles(path, ParticleTable.from_arrays(
        [r[1:] for r in rows], class_name=[r[0] for r in rows], tomo_name="reconstruction",
        tomo_path=str((folder / "reconstruction.mrc").resolve()), voxel_size=10.0))
    return path


@pytest.fixture
def two_folders(tmp_path):
    sim = tmp_path / "sim"
    folders = [shrec_folder(sim / f"model_{k}") for k in (0, 1)]
    # model_0: both found, the short one called long; model_1: the long one found twice, one FP.
    p0 = picks_of(folders[0], tmp_path / "a.star", [("long-named-particle-class", 3, 3, 3),
                                                   ("long-named-particle-class", 10, 8, 4)])
    p1 = picks_of(folders[1], tmp_path / "b.star", [("long-named-particle-class", 3.5, 3, 3),
                                                   ("short", 3, 2, 3), ("short", 14, 1, 1)])
    return sim, folders, p0, p1


def assert_fits_80_columns(output):
    assert max(len(line) for line in output.splitlines()) <= 80, output


def test_many_shrec_folders_per_tomogram_and_total(tmp_path, two_folders):
    sim, _, p0, p1 = two_folders
    json_path, csv_path = tmp_path / "m.json", tmp_path / "confusion.csv"
    result = invoke("evaluate", p1, p0, "--truth", sim, "--json", json_path, "--confusion-csv", csv_path)
    assert result.exit_code == 0, result.output
    assert_fits_80_columns(result.output)
    assert "long-named-particle-class" in result.output and "total" in result.output
    metrics = json.loads(json_path.read_text())
    assert metrics["metric"] == "shrec" and list(metrics["tomograms"]) == ["model_0", "model_1"]
    counts = ("RR", "TP", "FP", "FN", "MH")
    one = {k: metrics["tomograms"]["model_0"]["localization"][k] for k in counts}
    two = {k: metrics["tomograms"]["model_1"]["localization"][k] for k in counts}
    assert one == {"RR": 2, "TP": 2, "FP": 0, "FN": 0, "MH": 0}
    # (3.5, 3, 3) rounds to (4, 3, 3) and (3, 2, 3) lies in the same block: two hits on particle 1.
    assert two == {"RR": 3, "TP": 1, "FP": 1, "FN": 1, "MH": 1}
    total = metrics["localization"]
    assert {k: total[k] for k in counts} == {"RR": 5, "TP": 3, "FP": 1, "FN": 1, "MH": 1}
    assert total["recall"] == pytest.approx(3 / 4) and total["precision"] == pytest.approx(3 / 5)
    confusion = metrics["classification"]["confusion"]
    assert confusion == {"labels": CLASSES + ["background"], "matrix": [[2, 0, 0], [1, 0, 1], [0, 0, 0]]}
    rows = list(csv.reader(csv_path.open()))
    assert rows[0] == ["true \\ assigned", *CLASSES, "background"]
    assert rows[2] == ["short", "1", "0", "1"]


def test_czii_is_the_default_for_a_table_of_several_tomograms(tmp_path):
    truth = tmp_path / "truth.star"
    rows = [(*r, "TS_A") for r in TRUTH_A] + [(*r, "TS_B") for r in TRUTH_B]
    write_particles(truth, ParticleTable.from_arrays(
        [r[1:4] for r in rows], class_name=[r[0] for r in rows], tomo_name=[r[4] for r in rows],
        voxel_size=10.0), fmt="relion4")
    # Predictions: one CSV per tomogram, paired by file name (no tomo_name column, no voxel size).
    write_particles(tmp_path / "TS_A.csv", table(PRED_A, voxel_size=None))
    write_particles(tmp_path / "TS_B.csv", table(PRED_B, voxel_size=None))
    json_path = tmp_path / "m.json"
    result = invoke("evaluate", tmp_path / "TS_B.csv", tmp_path / "TS_A.csv", "--truth", truth,
                    "--radius", "apo-ferritin=60", "--radius", "ribosome=150", "--radius", "thyroglobulin=130",
                    "--weight", "thyroglobulin=2", "--json", json_path)
    assert result.exit_code == 0, result.output
    assert_fits_80_columns(result.output)
    assert "CZII score" in result.output and "TS_A" in result.output
    metrics = json.loads(json_path.read_text())
    assert metrics["metric"] == "czii" and list(metrics["tomograms"]) == ["TS_A", "TS_B"]
    czii = metrics["czii"]
    assert set(czii) >= {"per_class", "score"}
    assert czii["per_class"]["apo-ferritin"] == {
        "tp": 2, "fp": 2, "fn": 1, "precision": 0.5, "recall": pytest.approx(2 / 3), "fbeta": pytest.approx(17 / 26)}
    assert set(czii["per_class"]) == {"apo-ferritin", "ribosome", "thyroglobulin"}
    assert czii["score"] == pytest.approx((17 / 26 + 17 / 19 + 0) / 4)
    assert metrics["tomograms"]["TS_B"]["czii"]["score"] == pytest.approx(1 / 4)


def test_czii_on_a_simulated_folder_takes_the_radii_of_simulation_json(tmp_path, two_folders):
    _, folders, p0, _ = two_folders
    json_path = tmp_path / "m.json"
    result = invoke("evaluate", p0, "--truth", folders[0], "--metric", "czii", "--json", json_path)
    assert result.exit_code == 0, result.output
    czii = json.loads(json_path.read_text())["czii"]
    assert czii["radius_angstrom"] == {"long-named-particle-class": 15.0, "short": 20.0}
    # The long-named class: one TP and one FP (predicted on the short particle); short: one FN.
    assert {k: v["tp"] for k, v in czii["per_class"].items()} == {"long-named-particle-class": 1, "short": 0}
    assert czii["per_class"]["long-named-particle-class"]["fp"] == 1
    assert czii["score"] == pytest.approx((17 * 0.5 / (16 * 0.5 + 1) + 0) / 2)
    # Given radii win; a bare number is every class's radius.
    wide = invoke("evaluate", p0, "--truth", folders[0], "--metric", "czii", "--radius", "100", "--json", json_path)
    assert wide.exit_code == 0, wide.output
    assert json.loads(json_path.read_text())["czii"]["radius_angstrom"] == {
        "long-named-particle-class": 100.0, "short": 100.0}


def test_missing_predictions_count_as_missed(tmp_path, two_folders):
    sim, _, p0, _ = two_folders
    json_path = tmp_path / "m.json"
    with pytest.warns(UserWarning, match=r"no predictions for truth tomogram\(s\) model_1"):
        result = invoke("evaluate", p0, "--truth", sim, "--json", json_path)
    assert result.exit_code == 0, result.output
    total = json.loads(json_path.read_text())["localization"]
    assert (total["TP"], total["FN"], total["RR"]) == (2, 2, 2)


def test_a_truth_without_particles_is_named_in_a_warning(tmp_path, two_folders):
    sim, folders, p0, p1 = two_folders
    (folders[1] / "particle_locations.txt").write_text("")
    write_mrc(folders[1] / "occupancy_mask.mrc", np.zeros((8, 12, 16), dtype=np.int16), voxel_size=10.0)
    with pytest.warns(UserWarning, match=r"truth tomogram\(s\) model_1 list no scored particle"):
        result = invoke("evaluate", p0, p1, "--truth", sim, "--metric", "shrec")
    assert result.exit_code == 0, result.output


def test_evaluate_refusals(tmp_path, two_folders):
    sim, folders, p0, p1 = two_folders
    truth_table = folders[0] / "particle_locations.txt"
    json_path = tmp_path / "m.json"

    def check(*args, fragment):
        assert_one_line_error(invoke("evaluate", *args, "--json", json_path), fragment)
        assert not json_path.exists()

    check(p0, "--truth", truth_table, "--metric", "shrec", fragment="needs an occupancy mask")
    check(p0, "--truth", truth_table, "--plot", tmp_path / "c.png", fragment="--metric shrec")
    check(p0, "--truth", folders[0], "--metric", "f1", fragment="--metric must be one of")
    check(folders[1], "--truth", folders[0], fragment="give each truth folder its own --truth")
    check(p0, p1, "--truth", folders[0], fragment="match no truth tomogram")
    check(p0, p0, "--truth", sim, fragment="two sets of predictions for truth tomogram model_0")
    check(p0, "--truth", tmp_path, fragment="nor a folder of them")
    bare = tmp_path / "truth.txt"  # no simulation.json beside it
    bare.write_text(truth_table.read_text())
    check(p0, "--truth", bare, "--radius", "short=20", fragment="no radius for class(es) long-named")


def test_pairing_rules():
    empty = ParticleTable.from_arrays(np.zeros((0, 3)))
    data = ParticleTable.from_arrays([(1, 1, 1), (2, 2, 2), (3, 3, 3)],
                                     tomo_name=["reconstruction"] * 3,
                                     tomo_path=["/d/model_0/reconstruction.mrc", "/d/model_1/reconstruction.mrc",
                                                "/d/model_1/reconstruction.mrc"])
    parts = split_by_tomogram(data, "/x/picks.star")
    assert [(p.names, len(p.table)) for p in parts] == [
        (("reconstruction", "model_0"), 1), (("reconstruction", "model_1"), 2)]
    truths = [Tomogram(empty, (name,), name) for name in ("model_0", "model_1", "model_2")]
    paired = pair_by_name(parts[::-1], truths)
    assert paired[0] is parts[0] and paired[1] is parts[1] and paired[2] is None
    # A SHREC list is named after its folder; other tables after the file, then the folder.
    assert split_by_tomogram(empty, "/d/model_3/particle_locations.txt")[0].names == ("model_3",)
    assert split_by_tomogram(empty, "/d/run/TS_01.csv")[0].names == ("TS_01", "run")
    # One and one pair whatever their names; empty sets that match nothing are dropped.
    lone = Tomogram(empty, ("other",), "o.csv")
    assert pair_by_name([lone], truths[:1])[0] is lone
    assert pair_by_name([lone, parts[0]], truths[:1])[0] is parts[0]
    with pytest.raises(VPDetectError, match="several truth tomograms are named model_0"):
        pair_by_name(parts, [truths[0], truths[0]])
    # Aliases count only when no primary name matches.
    aliased = [Tomogram(empty, ("TS_01", "run"), "a"), Tomogram(empty, ("TS_02", "run"), "b")]
    assert pair_by_name([Tomogram(data, ("TS_02",), "p")], aliased)[1] is not None
    with pytest.raises(VPDetectError, match="match several truth tomograms"):
        pair_by_name([Tomogram(data, ("run",), "p")], aliased)


def test_confusion_table_numbers_columns_and_keeps_names_whole():
    from rich.console import Console

    from vpdetect.evaluate.report import confusion_legend, confusion_table, per_class_table

    labels = ["virus-like-particle", "beta-galactosidase", "unknown", "background"]
    confusion = {"labels": labels, "matrix": [[3, 1, 0, 2], [0, 4, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]}
    console = Console(width=40, record=True)
    console.print(confusion_table(confusion))
    console.print(per_class_table({"virus-like-particle": {"n_true": 6, "precision": 1.0, "recall": 0.5,
                                                           "f1": 2 / 3}}))
    text = console.export_text()
    lines = text.splitlines()
    header = next(line for line in lines if "assigned" in line)
    assert header.split()[-4:] == ["1", "2", "3", "bg"]
    assert any(line.split() == ["1", "virus-like-particle", "3", "1", ".", "2"] for line in lines)
    assert any(line.split() == ["2", "beta-galactosidase", ".", "4", "1", "."] for line in lines)
    assert not any("unknown" in line for line in lines)  # never true: a column, not a row
    assert any(line.split()[:2] == ["virus-like-particle", "6"] for line in lines)  # not cut at 40 columns
    assert confusion_legend(confusion).splitlines()[1] == "assigned but never true: 3 unknown"
