"""The CZII challenge metric on hand-built tomograms whose counts are worked out on paper."""

from __future__ import annotations

import numpy as np
import pytest

from vpdetect.cli.options import parse_class_values
from vpdetect.errors import VPDetectError
from vpdetect.evaluate.czii import (
    evaluate_czii,
    fbeta,
    match_counts,
    radii_from_simulation,
)
from vpdetect.io.particles import ParticleTable

RADII = {"apo-ferritin": 60.0, "ribosome": 150.0, "thyroglobulin": 130.0}  # Angstrom; match within half
WEIGHTS = {"apo-ferritin": 1, "ribosome": 1, "thyroglobulin": 2}


def table(rows, voxel_size=10.0):
    """[(class, x, y, z), ...] in voxels."""
    return ParticleTable.from_arrays([r[1:] for r in rows], class_name=[r[0] for r in rows],
                                     voxel_size=voxel_size)


# Tomogram A (10 A voxels). Truth: apo-ferritin at (10,10,10) and (20,10,10), a ribosome at
# (40,40,10), a thyroglobulin at (60,60,10) that nothing predicts (an empty class).
TRUTH_A = [("apo-ferritin", 10, 10, 10), ("apo-ferritin", 20, 10, 10), ("ribosome", 40, 40, 10),
           ("thyroglobulin", 60, 60, 10)]
PRED_A = [
    ("apo-ferritin", 10, 10, 12),    # 20 A from the first: TP
    ("apo-ferritin", 11, 10, 10),    # 10 A from the first again: a duplicate, FP
    ("apo-ferritin", 20, 10, 13.5),  # 35 A > 30 A from the second: FP (and the second is FN)
    ("ribosome", 20, 10, 10),        # on an apo-ferritin, wrong class: a ribosome FP
    ("Ribosome", 40, 40, 17),        # 70 A <= 75 A: TP (names compare case-insensitively)
]
# Tomogram B: one apo-ferritin, found; a ribosome predicted where the truth has none.
TRUTH_B = [("apo-ferritin", 5, 5, 5)]
PRED_B = [("apo-ferritin", 5, 5, 5), ("ribosome", 30, 30, 5)]


def test_match_counts_duplicates_and_the_boundary():
    refs = np.array([[0.0, 0, 0], [100, 0, 0]])
    # Two candidates on the first reference: it counts once, the other is a false positive.
    assert match_counts(np.array([[0.0, 0, 0], [5, 0, 0]]), refs, 30.0) == (1, 1, 1)
    # Exactly at the distance matches (<=), just beyond does not.
    assert match_counts(np.array([[30.0, 0, 0]]), refs, 30.0) == (1, 0, 1)
    assert match_counts(np.array([[30.001, 0, 0]]), refs, 30.0) == (0, 1, 2)
    assert match_counts(np.zeros((0, 3)), refs, 30.0) == (0, 0, 2)
    assert match_counts(np.array([[1.0, 2, 3]]), np.zeros((0, 3)), 30.0) == (0, 1, 0)


def test_fbeta_weighs_recall():
    assert fbeta(0.5, 1.0, 4) == pytest.approx(17 * 0.5 / (16 * 0.5 + 1))
    assert fbeta(1.0, 0.5, 1) == pytest.approx(2 / 3)
    assert fbeta(0.0, 0.0) == 0.0


def test_one_tomogram_by_hand():
    results, total = evaluate_czii([(table(PRED_A), table(TRUTH_A))], RADII, WEIGHTS)
    assert total["per_class"] == results[0]["per_class"]
    per = total["per_class"]
    # Smallest radius first.
    assert list(per) == ["apo-ferritin", "thyroglobulin", "ribosome"]
    assert per["apo-ferritin"] == {"tp": 1, "fp": 2, "fn": 1, "precision": pytest.approx(1 / 3),
                                   "recall": 0.5, "fbeta": pytest.approx(17 / 35)}
    assert per["ribosome"] == {"tp": 1, "fp": 1, "fn": 0, "precision": 0.5, "recall": 1.0,
                               "fbeta": pytest.approx(17 / 18)}
    # The empty class: nothing predicted, its F-beta 0 still weighs in the score.
    assert per["thyroglobulin"] == {"tp": 0, "fp": 0, "fn": 1, "precision": 0.0, "recall": 0.0, "fbeta": 0.0}
    assert total["score"] == pytest.approx((17 / 35 + 17 / 18 + 2 * 0) / 4)
    assert total["radius_angstrom"] == {"apo-ferritin": 60.0, "thyroglobulin": 130.0, "ribosome": 150.0}
    assert total["beta"] == 4 and total["distance_multiplier"] == 0.5


def test_several_tomograms_sum_the_counts_before_fbeta():
    pairs = [(table(PRED_A), table(TRUTH_A)), (table(PRED_B), table(TRUTH_B))]
    results, total = evaluate_czii(pairs, RADII, WEIGHTS)
    b = results[1]["per_class"]
    assert (b["apo-ferritin"]["tp"], b["apo-ferritin"]["fp"], b["apo-ferritin"]["fn"]) == (1, 0, 0)
    # No ribosome in B's truth: its ribosome prediction is a false positive.
    assert (b["ribosome"]["tp"], b["ribosome"]["fp"], b["ribosome"]["fn"]) == (0, 1, 0)
    assert results[1]["score"] == pytest.approx((1 + 0 + 0) / 4)
    per = total["per_class"]
    assert (per["apo-ferritin"]["tp"], per["apo-ferritin"]["fp"], per["apo-ferritin"]["fn"]) == (2, 2, 1)
    assert per["apo-ferritin"]["fbeta"] == pytest.approx(17 / 26)  # P 1/2, R 2/3
    assert (per["ribosome"]["tp"], per["ribosome"]["fp"], per["ribosome"]["fn"]) == (1, 2, 0)
    assert per["ribosome"]["fbeta"] == pytest.approx(17 / 19)  # P 1/3, R 1
    assert total["score"] == pytest.approx((17 / 26 + 17 / 19 + 0) / 4)
    # Not the mean of the tomograms' scores.
    assert total["score"] != pytest.approx((results[0]["score"] + results[1]["score"]) / 2)


def test_parameters_weights_and_unscored_classes():
    pred = table(PRED_A + [("beta-amylase", 1, 1, 1), ("vesicle", 2, 2, 2)])
    truth = table(TRUTH_A + [("vesicle", 80, 80, 10)])
    # A weight of 0 drops a class from the score; a wider match turns the 35 A miss into a hit.
    _, total = evaluate_czii([(pred, truth)], RADII, {"thyroglobulin": 0}, distance_multiplier=0.6)
    per = total["per_class"]
    assert "vesicle" not in per  # context, not a target (as in the SHREC evaluation)
    assert (per["apo-ferritin"]["tp"], per["apo-ferritin"]["fp"], per["apo-ferritin"]["fn"]) == (2, 1, 0)
    assert total["score"] == pytest.approx((fbeta(2 / 3, 1.0) + 17 / 18) / 2)
    assert total["unscored_predictions"] == {"beta-amylase": 1}
    # beta 1 is the F1 score; a default radius for every class.
    _, f1 = evaluate_czii([(pred, truth)], {}, beta=1, default_radius=60.0)
    assert f1["radius_angstrom"] == {"apo-ferritin": 60.0, "ribosome": 60.0, "thyroglobulin": 60.0}
    assert f1["per_class"]["apo-ferritin"]["fbeta"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    # Context classes replace the default: ribosome is context now, and vesicle a class like any
    # other, scored with the default radius.
    _, ctx = evaluate_czii([(pred, truth)], {}, default_radius=60.0, context=["Ribosome"])
    assert set(ctx["per_class"]) == {"apo-ferritin", "thyroglobulin", "vesicle"}
    assert "ribosome" not in ctx["unscored_predictions"]


def test_coordinates_compare_in_angstrom():
    truth = table([("apo-ferritin", 10, 10, 10)], voxel_size=10.0)
    binned = table([("apo-ferritin", 5, 5, 5.9)], voxel_size=20.0)  # 18 A away
    _, total = evaluate_czii([(binned, truth)], RADII)
    assert total["per_class"]["apo-ferritin"]["tp"] == 1
    far = table([("apo-ferritin", 5, 5, 6.6)], voxel_size=20.0)  # 32 A away
    _, total = evaluate_czii([(far, truth)], RADII)
    assert total["per_class"]["apo-ferritin"]["tp"] == 0


def test_refusals():
    pred, truth = table(PRED_A), table(TRUTH_A)
    with pytest.raises(VPDetectError, match="no radius for class.*thyroglobulin"):
        evaluate_czii([(pred, truth)], {"apo-ferritin": 60, "ribosome": 150})
    with pytest.raises(VPDetectError, match="weight 0"):
        evaluate_czii([(pred, truth)], RADII, {"apo-ferritin": 0, "ribosome": 0, "thyroglobulin": 0})
    with pytest.raises(VPDetectError, match="predictions have no class names"):
        evaluate_czii([(ParticleTable.from_arrays([(1, 2, 3)], voxel_size=10.0), truth)], RADII)
    unknown = table(PRED_A, voxel_size=None)
    with pytest.raises(VPDetectError, match="voxel size of the predictions is unknown"):
        evaluate_czii([(unknown, truth)], RADII)
    with pytest.raises(VPDetectError, match="--beta"):
        evaluate_czii([(pred, truth)], RADII, beta=0)


def test_parse_class_values_and_simulation_radii():
    assert parse_class_values(["ribosome=150", "60", "apo-ferritin = 65"], "--radius") == (
        60.0, {"ribosome": 150.0, "apo-ferritin": 65.0})
    assert parse_class_values(["x=0"], "--weight", allow_zero=True) == (None, {"x": 0.0})
    for bad in (["x=0"], ["x=-1"], ["x=nan"], ["=3"], ["x=abc"]):
        with pytest.raises(VPDetectError, match="--radius"):
            parse_class_values(bad, "--radius")
    record = {"classes": [{"name": "syn-p97", "radius_nm": 4.645}, {"name": "vesicle"}]}
    assert radii_from_simulation(record) == {"syn-p97": pytest.approx(46.45)}
