"""SHREC evaluation on hand-built masks whose answers are worked out on paper, and VA/MVA/MIoU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from vpdetect.errors import VPDetectError
from vpdetect.evaluate.segmentation import confusion_matrix, segmentation_metrics
from vpdetect.evaluate.shrec import (
    SHREC21_SIZE_GROUPS,
    combine_results,
    dilate_occupancy,
    evaluate_picks,
    merge_size_groups,
    read_size_groups,
    read_truth,
    round_and_clip,
    scored_particles,
    scoring_mask,
)
from vpdetect.io.mrc import write_mrc
from vpdetect.io.particles import ParticleTable, write_particles

SHAPE = (10, 12, 14)  # z, y, x

# Truth (line k = particle k), x y z:
#   1 1s3x    single voxel (2, 2, 1)
#   2 5mrc    2x2x2 block x,y,z in 6..7, listed centre (6, 6, 6)
#   3 5mrc    single voxel (9, 6, 6): the gap voxel (8, 6, 6) between 2 and 3 goes to 3 after dilation
#   4 3qm1    single voxel (10, 2, 2), touching particle 5
#   5 4CR2    single voxel (11, 2, 2): dilation turns particle 4's voxel into 5 (higher id wins)
#   6 vesicle 2x2x2 block at x 2..3, y 9..10, z 7..8: not scored, background for the lookup
#   7 3qm1    single voxel (12, 10, 8), never hit
TRUTH_CLASSES = ["1s3x", "5mrc", "5mrc", "3qm1", "4CR2", "vesicle", "3qm1"]
TRUTH_XYZ = [(2, 2, 1), (6, 6, 6), (9, 6, 6), (10, 2, 2), (11, 2, 2), (2, 9, 7), (12, 10, 8)]

# Predictions in file order -> rounded/clipped voxel -> lookup:
#   a (2.4, 2, 1)     1s3x  -> (2,2,1)   particle 1 (first hit of 1; AD from the voxel: 0)
#   b (3, 2, 1)       5mrc  -> (3,2,1)   particle 1 (dilated neighbour; second hit)
#   c (6.5, 7.5, 6.5) 5mrc  -> (6,8,6)   particle 2 (halves to even; a dilated neighbour)
#   d (8, 6, 6)       1s3x  -> (8,6,6)   particle 3 (gap voxel; misclassified)
#   e (10, 2, 2)      4cr2  -> (10,2,2)  particle 5 (touching, higher id wins)
#   f (2, 9, 7)       1s3x  -> 0          false positive (the vesicle is background)
#   g (5, 10, 1)      1s3x  -> 0          false positive
#   h (2, 2, -0.6)    5mrc  -> z -1 clipped to 0: (2,2,0) particle 1 (third hit), RO
#   i (20, 6, 6)      5mrc  -> x clipped to 13: background, RO
PRED_XYZ = [(2.4, 2, 1), (3, 2, 1), (6.5, 7.5, 6.5), (8, 6, 6), (10, 2, 2), (2, 9, 7), (5, 10, 1),
            (2, 2, -0.6), (20, 6, 6)]
PRED_CLASSES = ["1s3x", "5mrc", "5mrc", "1s3x", "4cr2", "1s3x", "1s3x", "5mrc", "5mrc"]


def hand_truth() -> tuple[np.ndarray, ParticleTable]:
    occupancy = np.zeros(SHAPE, dtype=np.int32)
    for k, (x, y, z) in enumerate(TRUTH_XYZ, start=1):
        occupancy[z, y, x] = k
    occupancy[6:8, 6:8, 6:8] = 2
    occupancy[7:9, 9:11, 2:4] = 6
    truth = ParticleTable.from_arrays(TRUTH_XYZ, class_name=TRUTH_CLASSES, tomo_size=SHAPE[::-1])
    return occupancy, truth


def hand_predictions() -> ParticleTable:
    return ParticleTable.from_arrays(PRED_XYZ, class_name=PRED_CLASSES)


def test_dilation_is_a_cross_shaped_grey_maximum():
    occupancy, _ = hand_truth()
    dilated = dilate_occupancy(occupancy)
    assert dilated[1, 2, 3] == 1 and dilated[0, 2, 2] == 1 and dilated[2, 2, 2] == 1
    assert dilated[1, 3, 3] == 0  # diagonal neighbours are not in the 6-connected cross
    assert dilated[6, 6, 8] == 3  # gap voxel between 2 and 3: the higher id
    assert dilated[2, 2, 10] == 5  # particle 4's own voxel, touching particle 5
    assert dilated[2, 2, 9] == 4


def test_round_and_clip_rounds_halves_to_even_and_counts_clipping():
    coords = np.array([[0.5, 1.49, -0.5], [-0.51, 2.5, 9.6], [1.5, 3.5, 4.5], [-1.5, 0.49, 7.5]])
    voxels, clipped = round_and_clip(coords, (10, 5, 8))
    np.testing.assert_array_equal(voxels, [[0, 1, 0], [0, 2, 9], [2, 4, 4], [0, 0, 8]])
    np.testing.assert_array_equal(clipped, [False, True, False, True])
    # The same as Python's round, which the official SHREC'21 script uses.
    expected = [[min(max(round(v), 0), hi) for v, hi in zip(row, (7, 4, 9), strict=True)] for row in coords]
    np.testing.assert_array_equal(voxels, expected)


def test_every_localization_metric_on_the_hand_example():
    occupancy, truth = hand_truth()
    loc = evaluate_picks(hand_predictions(), occupancy, truth)["localization"]
    assert loc["n_particles"] == 6  # the vesicle is not scored
    assert (loc["RR"], loc["TP"], loc["FP"], loc["FN"], loc["MH"], loc["RO"]) == (9, 4, 3, 2, 1, 2)
    assert loc["precision"] == pytest.approx(4 / 9)
    assert loc["recall"] == pytest.approx(2 / 3)
    assert loc["miss_rate"] == pytest.approx(1 / 3)
    assert loc["f1"] == pytest.approx(8 / 15)
    # First hits, from their rounded voxel: a (2,2,1)->1 (0), c (6,8,6)->2 (2), d->3 (1),
    # e->5 (1); b and h are later hits on 1.
    assert loc["AD"] == pytest.approx((0 + 2 + 1 + 1) / 4)


def test_half_voxel_positions_follow_the_official_rules():
    # Two single-voxel particles at x 2 and x 8 (y 2, z 2); the dilation covers x 1..3 and 7..9.
    occupancy = np.zeros((5, 5, 12), dtype=np.int32)
    occupancy[2, 2, 2], occupancy[2, 2, 8] = 1, 2
    truth = ParticleTable.from_arrays([(2, 2, 2), (8, 2, 2)], class_name=["a", "b"])
    # Halves to even: 0.5 -> 0 (miss), 2.5 -> 2 (hit 1 at distance 0), 6.5 -> 6 (miss),
    # (7.5, 2, 2.5) -> (8, 2, 2) (hit 2 at distance 0). Rounding halves up would hit all four.
    pred = ParticleTable.from_arrays([(0.5, 2, 2), (2.5, 2, 2), (6.5, 2, 2), (7.5, 2, 2.5)])
    loc = evaluate_picks(pred, occupancy, truth)["localization"]
    assert (loc["RR"], loc["TP"], loc["FP"], loc["FN"], loc["MH"], loc["RO"]) == (4, 2, 2, 0, 0, 0)
    assert loc["AD"] == 0.0  # measured from the rounded voxel, not the reported position


def official_rules(pred_xyz, pred_classes, occupancy, truth_xyz):
    """The SHREC'21 rules as the official script states them, one prediction at a time:
    Python's round, clip, skimage's dilation, first hit in file order, AD from the voxel."""
    from skimage.morphology import dilation

    lookup = dilation(occupancy)
    upper = [s - 1 for s in occupancy.shape[::-1]]
    hits: dict[int, list] = {k: [] for k in range(len(truth_xyz) + 1)}
    clipped = 0
    for (x, y, z), name in zip(pred_xyz, pred_classes, strict=True):
        voxel = [int(round(float(v))) for v in (x, y, z)]
        kept = [min(max(v, 0), hi) for v, hi in zip(voxel, upper, strict=True)]
        clipped += kept != voxel
        k = int(lookup[kept[2], kept[1], kept[0]])
        centre = truth_xyz[k - 1] if k else kept
        hits[k].append((name, math.dist(kept, centre)))
    found = [hits[k] for k in range(1, len(truth_xyz) + 1)]
    tp = sum(1 for h in found if h)
    return {
        "TP": tp, "FP": len(hits[0]), "FN": sum(1 for h in found if not h),
        "MH": sum(1 for h in found if len(h) > 1), "RO": clipped,
        "AD": sum(h[0][1] for h in found if h) / tp, "assigned": [h[0][0] if h else None for h in found],
    }


def test_matches_the_official_rules_on_random_half_voxel_picks():
    rng = np.random.default_rng(5)
    shape = (12, 20, 24)  # z, y, x
    occupancy = np.zeros(shape, dtype=np.int32)
    # Non-overlapping 2x2x2 particles on a grid, some touching their neighbour.
    truth_xyz = []
    for z in range(1, 11, 4):
        for y in range(1, 19, 3):
            for x in range(1, 23, 5):
                truth_xyz.append((x, y, z))
                occupancy[z : z + 2, y : y + 2, x : x + 2] = len(truth_xyz)
    names = [f"c{k % 3}" for k in range(len(truth_xyz))]
    truth = ParticleTable.from_arrays(truth_xyz, class_name=names)
    # Predictions on the half-voxel grid (exact .5 ties everywhere), a few outside the volume.
    pred_xyz = rng.integers(-4, 2 * np.array(shape[::-1]) + 4, size=(400, 3)) / 2.0
    pred_classes = [f"c{k}" for k in rng.integers(0, 3, size=len(pred_xyz))]
    result = evaluate_picks(ParticleTable.from_arrays(pred_xyz, class_name=pred_classes), occupancy, truth)
    expected = official_rules(pred_xyz, pred_classes, occupancy, truth_xyz)
    loc = result["localization"]
    assert {k: loc[k] for k in ("TP", "FP", "FN", "MH", "RO")} == {
        k: expected[k] for k in ("TP", "FP", "FN", "MH", "RO")}
    assert loc["TP"] > 50 and loc["RO"] > 0 and loc["MH"] > 0
    assert loc["AD"] == pytest.approx(expected["AD"], rel=1e-12)
    confusion = result["classification"]["confusion"]
    diagonal = sum(confusion["matrix"][i][i] for i in range(len(confusion["labels"]) - 1))
    assert diagonal == sum(a == t for a, t in zip(expected["assigned"], names, strict=True))
    # The truth prepared once (as `tune` does for its grid) scores the same.
    prepared = evaluate_picks(ParticleTable.from_arrays(pred_xyz, class_name=pred_classes), occupancy, truth,
                              prepared=scoring_mask(occupancy, truth))
    assert prepared == result


def test_totals_over_tomograms_sum_the_counts():
    occupancy, truth = hand_truth()
    one = evaluate_picks(hand_predictions(), occupancy, truth)
    empty = evaluate_picks(ParticleTable.from_arrays(np.zeros((0, 3)), class_name=[]), occupancy, truth)
    total = combine_results([one, empty])
    loc = total["localization"]
    assert (loc["RR"], loc["TP"], loc["FP"], loc["FN"], loc["MH"], loc["RO"]) == (9, 4, 3, 8, 1, 2)
    assert loc["n_particles"] == 12 and loc["recall"] == pytest.approx(4 / 12)
    assert loc["AD"] == pytest.approx(one["localization"]["AD"])
    twice = combine_results([one, one])
    assert twice["localization"]["AD"] == pytest.approx(one["localization"]["AD"])
    assert twice["classification"]["confusion"]["matrix"] == [
        [2 * v for v in row] for row in one["classification"]["confusion"]["matrix"]]
    assert twice["classification"]["per_class"] == one["classification"]["per_class"] | {
        name: {**v, "n_true": 2 * v["n_true"]} for name, v in one["classification"]["per_class"].items()}
    assert combine_results([one]) == one
    assert combine_results([one, evaluate_picks(ParticleTable.from_arrays(PRED_XYZ), occupancy, truth)])[
        "classification"] is None


def test_predictions_labelled_vesicle_are_not_scored():
    occupancy, truth = hand_truth()
    pred = hand_predictions()
    with_vesicle = pred.data.copy()
    with_vesicle.loc[len(with_vesicle)] = {"x": 2.0, "y": 9.0, "z": 7.0, "class_name": "Vesicle"}
    before = evaluate_picks(pred, occupancy, truth)["localization"]
    after = evaluate_picks(ParticleTable(with_vesicle), occupancy, truth)["localization"]
    assert after == before


def test_context_classes_are_background_and_their_predictions_are_dropped():
    occupancy, truth = hand_truth()
    context = ["Vesicle", "5MRC"]  # particles 2 and 3 are context too; b, c, h, i are labelled 5mrc
    loc = evaluate_picks(hand_predictions(), occupancy, truth, context=context)["localization"]
    # a -> 1, d on the gap between 2 and 3 -> background now, e -> 5, f and g background.
    assert loc["n_particles"] == 4
    assert (loc["RR"], loc["TP"], loc["FP"], loc["FN"], loc["MH"], loc["RO"]) == (5, 2, 3, 2, 0, 0)
    prepared = scoring_mask(occupancy, truth, context)
    assert evaluate_picks(hand_predictions(), occupancy, truth, prepared=prepared, context=context)["localization"] == loc
    assert scored_particles(truth, context).tolist() == [True, False, False, True, True, False, True]


def test_first_hit_rule_uses_file_order():
    occupancy, truth = hand_truth()
    pred = hand_predictions()
    swapped = pred.data.iloc[[1, 0] + list(range(2, len(pred)))].reset_index(drop=True)
    result = evaluate_picks(ParticleTable(swapped), occupancy, truth)
    # Now b (3, 2, 1), class 5mrc, is particle 1's first hit: distance 1, and 1s3x is lost.
    assert result["localization"]["AD"] == pytest.approx((1 + 2 + 1 + 1) / 4)
    assert result["classification"]["per_class"]["1s3x"]["recall"] == 0.0


def test_classification_confusion_per_class_and_size_groups():
    occupancy, truth = hand_truth()
    cls = evaluate_picks(hand_predictions(), occupancy, truth)["classification"]
    labels = cls["confusion"]["labels"]
    # SHREC order (small, then large), then predicted-only classes, background last;
    # names compare case-insensitively and keep the truth's spelling.
    assert labels == ["1s3x", "3qm1", "4CR2", "5mrc", "background"]
    assert cls["confusion"]["matrix"] == [
        [1, 0, 0, 0, 0],  # 1s3x: particle 1 -> 1s3x
        [0, 0, 0, 0, 2],  # 3qm1: particles 4 and 7 never hit
        [0, 0, 1, 0, 0],  # 4CR2: particle 5 -> 4cr2
        [1, 0, 0, 1, 0],  # 5mrc: particle 2 -> 5mrc, particle 3 -> 1s3x
        [0, 0, 0, 0, 0],
    ]
    per = cls["per_class"]
    assert per["1s3x"]["precision"] == pytest.approx(0.5) and per["1s3x"]["recall"] == 1.0
    assert per["1s3x"]["f1"] == pytest.approx(2 / 3)
    # 3qm1 never occurs in the predictions: zeros, no division error.
    assert per["3qm1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n_true": 2}
    assert per["4CR2"]["f1"] == 1.0
    assert per["5mrc"]["precision"] == 1.0 and per["5mrc"]["recall"] == 0.5
    assert per["5mrc"]["f1"] == pytest.approx(2 / 3)
    groups = cls["size_groups"]
    assert set(groups) == {"small", "large"}  # no medium class in this truth
    assert groups["small"]["f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert groups["large"]["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert groups["large"]["classes"] == ["4CR2", "5mrc"]


def test_zero_predictions():
    occupancy, truth = hand_truth()
    empty = ParticleTable.from_arrays(np.zeros((0, 3)), class_name=[])
    result = evaluate_picks(empty, occupancy, truth)
    loc = result["localization"]
    assert (loc["RR"], loc["TP"], loc["FP"], loc["FN"], loc["MH"]) == (0, 0, 0, 6, 0)
    assert loc["precision"] == 0.0 and loc["recall"] == 0.0 and loc["f1"] == 0.0
    assert loc["AD"] is None and loc["miss_rate"] == 1.0
    assert all(v["f1"] == 0.0 for v in result["classification"]["per_class"].values())
    json.dumps(result, allow_nan=False)


def test_predictions_without_classes_skip_classification():
    occupancy, truth = hand_truth()
    result = evaluate_picks(ParticleTable.from_arrays(PRED_XYZ), occupancy, truth)
    assert result["classification"] is None
    assert result["localization"]["TP"] == 4


def test_custom_size_groups_for_simulated_classes(tmp_path):
    occupancy = np.zeros((6, 6, 6), dtype=np.int32)
    occupancy[1, 1, 1], occupancy[4, 4, 4] = 1, 2
    truth = ParticleTable.from_arrays([(1, 1, 1), (4, 4, 4)], class_name=["blobA", "rodB"])
    pred = ParticleTable.from_arrays([(1, 1, 1), (4, 4, 4)], class_name=["BLOBA", "blobA"])
    (tmp_path / "simulation.json").write_text(json.dumps(
        {"classes": [{"name": "blobA", "size_group": "small"}, {"name": "rodB", "size_group": "large"},
                     {"name": "1s3x", "size_group": "large"}]}))
    groups = read_size_groups(tmp_path)
    assert "blobA" in groups["small"] and "1s3x" not in groups["small"] and "1s3x" in groups["large"]
    cls = evaluate_picks(pred, occupancy, truth, size_groups=groups)["classification"]
    assert cls["per_class"]["blobA"]["f1"] == pytest.approx(2 / 3)  # P 1/2, R 1
    assert cls["size_groups"]["small"] == {"f1": pytest.approx(2 / 3), "classes": ["blobA"]}
    assert cls["size_groups"]["large"]["f1"] == 0.0
    assert read_size_groups(tmp_path / "missing") == SHREC21_SIZE_GROUPS
    assert merge_size_groups({"a": ["x", "y"]}, {"b": ["Y"]}) == {"a": ["x"], "b": ["Y"]}


def test_inconsistent_inputs_are_refused():
    occupancy, truth = hand_truth()
    with pytest.raises(VPDetectError, match="lists 6 particles"):
        evaluate_picks(hand_predictions(), occupancy, ParticleTable(truth.data.iloc[:6].reset_index(drop=True)))
    far = truth.copy()
    far.data.loc[0, "x"] = 40
    with pytest.raises(VPDetectError, match="outside the occupancy mask"):
        evaluate_picks(hand_predictions(), occupancy, far)
    wrong_size = hand_predictions()
    wrong_size.tomo_size = (14, 12, 11)
    with pytest.raises(VPDetectError, match="occupancy mask is"):
        evaluate_picks(wrong_size, occupancy, truth)
    with pytest.raises(VPDetectError, match="non-integer"):
        evaluate_picks(hand_predictions(), occupancy + 0.5, truth)


def test_read_truth_folder(tmp_path):
    occupancy, truth = hand_truth()
    write_mrc(tmp_path / "occupancy_mask.mrc", occupancy, voxel_size=10.0)
    write_particles(tmp_path / "particle_locations.txt", truth)
    mask, table = read_truth(tmp_path)
    np.testing.assert_array_equal(mask, occupancy)
    assert table.tomo_size == (14, 12, 10) and table.voxel_size == 10.0
    assert table.class_labels() == TRUTH_CLASSES
    (tmp_path / "occupancy_mask.mrc").unlink()
    with pytest.raises(VPDetectError, match="no occupancy_mask.mrc"):
        read_truth(tmp_path)


# --------------------------------------------------------------------------- segmentation


def test_segmentation_metrics_hand_example():
    pred = np.array([0, 0, 1, 1, 2, 2])
    target = np.array([0, 1, 1, 1, 2, 0])
    cm = confusion_matrix(pred, target, 3)
    np.testing.assert_array_equal(cm, [[1, 0, 1], [1, 2, 0], [0, 0, 1]])
    metrics = segmentation_metrics(cm)
    assert metrics["VA"] == pytest.approx(4 / 6)
    assert metrics["MVA"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # IoU: class 0 1/(2+2-1), class 1 2/(3+2-2), class 2 1/(1+2-1)
    assert metrics["MIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_segmentation_metrics_skip_absent_classes_and_check_labels():
    cm = confusion_matrix(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [1, 0]]), 4)
    metrics = segmentation_metrics(cm)
    assert metrics["MVA"] == pytest.approx((1 / 2 + 1) / 2)  # classes 2, 3 absent
    assert metrics["MIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert segmentation_metrics(np.zeros((2, 2))) == {"VA": 0.0, "MVA": 0.0, "MIoU": 0.0}
    with pytest.raises(VPDetectError):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)
