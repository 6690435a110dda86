"""The CZII CryoET Object Identification challenge metric (2025; data on the CryoET Data Portal).

Per class, with distances in Angstrom: a prediction within `distance_multiplier` x the
class's radius of a reference point (distance <= the limit) matches it. TP = the
reference points matched (each at most once, however many predictions reach it), FP =
that class's predictions minus TP, FN = the references left unmatched. As in the
challenge, FP is the prediction count minus TP, so it would go below 0 only if one
prediction matched two references of a class, i.e. references closer than twice the
matching distance (overlapping particles); a tomogram without references of a class
counts all of that class's predictions as FP. TP, FP and FN are summed over
tomograms before precision, recall and F-beta (beta 4: recall weighs far more); the
score is the weighted mean of the classes' F-beta.

The classes scored are those of the truth (any tomogram), smallest radius first; predictions of other classes
are counted apart (`unscored_predictions`) and change nothing. `vesicle` is context, not
a target, on both sides (as in the SHREC evaluation). Class names compare
case-insensitively and keep the truth's spelling.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.evaluate.shrec import _key, _safe_div, context_keys
from vpdetect.io.particles import ParticleTable

BETA = 4.0
DISTANCE_MULTIPLIER = 0.5
ANGSTROM_PER_NM = 10.0


def match_counts(candidates: np.ndarray, references: np.ndarray, max_distance: float) -> tuple[int, int, int]:
    """(TP, FP, FN) of candidate points against reference points (both (n, 3), same unit)."""
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1, 3)
    references = np.asarray(references, dtype=np.float64).reshape(-1, 3)
    if len(references) == 0:
        return 0, len(candidates), 0
    if len(candidates) == 0:
        return 0, 0, len(references)
    from scipy.spatial import cKDTree

    reached = cKDTree(candidates).query_ball_tree(cKDTree(references), r=max_distance)
    tp = len({j for row in reached for j in row})
    return tp, len(candidates) - tp, len(references) - tp


def fbeta(precision: float, recall: float, beta: float = BETA) -> float:
    b2 = beta * beta
    return _safe_div((1 + b2) * precision * recall, b2 * precision + recall)


def _labels(table: ParticleTable, what: str) -> list[str]:
    labels = table.class_labels()
    if labels is None:
        raise VPDetectError(
            f"the CZII metric scores each class, but the {what} have no class names "
            "(class_name or class_number)"
        )
    return labels


def truth_classes(truths: Sequence[ParticleTable], context: Collection[str] | None = None) -> dict[str, str]:
    """{key: display name} of the scored classes (not `context`, default vesicles) over all truth
    tables, in first-seen order."""
    keys = context_keys(context)
    classes: dict[str, str] = {}
    for truth in truths:
        for name in _labels(truth, "truth particles"):
            if _key(name) not in keys:
                classes.setdefault(_key(name), name)
    return classes


def tomogram_counts(
    pred: ParticleTable,
    truth: ParticleTable,
    classes: Mapping[str, str],
    radii: Mapping[str, float],
    distance_multiplier: float = DISTANCE_MULTIPLIER,
    context: Collection[str] | None = None,
) -> tuple[dict[str, tuple[int, int, int]], dict[str, int]]:
    """Per-class (TP, FP, FN) of one tomogram, and the count of predictions of unscored classes
    (neither scored nor `context`, default vesicles).

    Both tables need their voxel size (Angstrom): coordinates are compared in Angstrom.
    `classes` maps keys to display names (`truth_classes`); `radii` maps keys to Angstrom.
    """
    for table, what in ((pred, "predictions"), (truth, "truth")):
        if table.voxel_size is None:
            raise VPDetectError(f"the voxel size of the {what} is unknown: give --pixel-size")
    pred_keys = np.array([_key(v) for v in _labels(pred, "predictions")], dtype=object)
    truth_keys = np.array([_key(v) for v in _labels(truth, "truth particles")], dtype=object)
    pred_xyz = pred.coords_xyz() * pred.voxel_size
    truth_xyz = truth.coords_xyz() * truth.voxel_size
    counts = {}
    for key in classes:
        counts[key] = match_counts(
            pred_xyz[pred_keys == key], truth_xyz[truth_keys == key], distance_multiplier * radii[key]
        )
    unscored: dict[str, int] = {}
    context_classes = context_keys(context)
    for name in _labels(pred, "predictions"):
        if _key(name) not in classes and _key(name) not in context_classes:
            unscored[name] = unscored.get(name, 0) + 1
    return counts, unscored


def czii_metrics(
    counts: Mapping[str, tuple[int, int, int]],
    classes: Mapping[str, str],
    weights: Mapping[str, float],
    beta: float = BETA,
) -> dict:
    """`{"per_class": {NAME: {tp, fp, fn, precision, recall, fbeta}}, "score"}` from summed counts;
    the score is the mean F-beta weighted by `weights` (key -> weight; missing keys weigh 1)."""
    per_class: dict[str, dict] = {}
    weighted = total_weight = 0.0
    for key, name in classes.items():
        tp, fp, fn = counts[key]
        precision = _safe_div(tp, tp + fp)
        recall = _safe_div(tp, tp + fn)
        score = fbeta(precision, recall, beta)
        per_class[name] = {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
                           "fbeta": score}
        weight = float(weights.get(key, 1.0))
        weighted += weight * score
        total_weight += weight
    if classes and total_weight == 0:
        raise VPDetectError("every class has weight 0: nothing to score")
    return {"per_class": per_class, "score": _safe_div(weighted, total_weight)}


def evaluate_czii(
    pairs: Sequence[tuple[ParticleTable, ParticleTable]],
    radii: Mapping[str, float],
    weights: Mapping[str, float] | None = None,
    beta: float = BETA,
    distance_multiplier: float = DISTANCE_MULTIPLIER,
    default_radius: float | None = None,
    default_weight: float = 1.0,
    context: Collection[str] | None = None,
) -> tuple[list[dict], dict]:
    """CZII results of each (predictions, truth) tomogram and their total (counts summed).

    `radii` and `weights` map class names (any case) to Angstrom and to weights; classes
    they do not name take `default_radius` and `default_weight`. Each result is the
    `czii_metrics` dict plus the parameters it used and `unscored_predictions`. `context`: classes
    that are context, not targets (default vesicles).
    """
    if not (math.isfinite(beta) and beta > 0):
        raise VPDetectError(f"--beta must be positive, got {beta}")
    if not (math.isfinite(distance_multiplier) and distance_multiplier > 0):
        raise VPDetectError(f"--distance-multiplier must be positive, got {distance_multiplier}")
    classes = truth_classes([truth for _, truth in pairs], context)
    radius = {_key(k): float(v) for k, v in radii.items()}
    weight = {_key(k): float(v) for k, v in (weights or {}).items()}
    for key in classes:
        if default_radius is not None:
            radius.setdefault(key, float(default_radius))
        weight.setdefault(key, float(default_weight))
    missing = [name for key, name in classes.items() if key not in radius]
    if missing:
        raise VPDetectError(
            f"no radius for class(es) {', '.join(missing)}: give --radius NAME=ANGSTROM for each"
        )
    classes = dict(sorted(classes.items(), key=lambda item: (radius[item[0]], item[0])))  # smallest first
    parameters = {
        "beta": beta,
        "distance_multiplier": distance_multiplier,
        "radius_angstrom": {name: radius[key] for key, name in classes.items()},
        "weight": {name: weight[key] for key, name in classes.items()},
    }
    results = []
    summed = {key: (0, 0, 0) for key in classes}
    unscored_total: dict[str, int] = {}
    for pred, truth in pairs:
        counts, unscored = tomogram_counts(pred, truth, classes, radius, distance_multiplier, context)
        results.append({**czii_metrics(counts, classes, weight, beta), **parameters,
                        "unscored_predictions": unscored})
        summed = {key: tuple(a + b for a, b in zip(summed[key], counts[key], strict=True)) for key in classes}
        for name, n in unscored.items():
            unscored_total[name] = unscored_total.get(name, 0) + n
    total = {**czii_metrics(summed, classes, weight, beta), **parameters,
             "unscored_predictions": unscored_total}
    return results, total


def radii_from_simulation(record: Mapping) -> dict[str, float]:
    """{class name: radius in Angstrom} from a simulation.json record (`classes[].radius_nm`)."""
    radii = {}
    for entry in record.get("classes", []):
        value = entry.get("radius_nm")
        if isinstance(value, (int, float)) and value > 0:
            radii[str(entry["name"])] = float(value) * ANGSTROM_PER_NM
    return radii
