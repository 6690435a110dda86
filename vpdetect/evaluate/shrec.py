"""The SHREC'20/'21 evaluation protocol (SHREC'21 paper section 2.2, tables 3-6).

A prediction is a position (and a class). Positions are rounded to the nearest
voxel with Python's `round` (halves to even, as the official SHREC'21 script does)
and clipped into the volume; RO counts the clipped ones.
The occupancy mask (0 background, k = the particle on line k of
particle_locations.txt) is dilated once with a 6-connected cross as a greyscale
maximum, so where particles touch the higher id wins, and looked up at [z, y, x]:
0 is a false positive, k a hit on particle k.

AD is measured from the rounded, clipped voxel of a particle's first hit in file
order to the particle's listed centre (as the official script does). Classification
gives each scored true particle the class of its first hit, or `background` when it
has none; the confusion matrix [true, assigned] covers true particles only, so false
positives lower localization precision but not a class's precision (as in the SHREC
tables). Several tomograms add up in `combine_results`.

Truth particles of class `vesicle` are not scored (as in SHREC'21, where vesicles
are context, not targets): their voxels are background before the dilation, so a
prediction on a vesicle is a false positive, and they do not count in n_particles.
Predictions labelled `vesicle` are dropped before scoring for the same reason, so
a ground-truth file scores perfectly against itself.
`context` (`evaluate --context`) names other context classes in place of vesicles,
e.g. gold beads (`fiducial`), which SHREC'21 scores but vpdetect's localizer drops.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vpdetect.errors import VPDetectError
from vpdetect.io.particles import ParticleTable
from vpdetect.io.shrec import read_truth  # noqa: F401  (re-exported: the evaluation's input)

# SHREC'21 table 5: groups by molecular weight (small < 200 kDa, medium 200-600, large > 600).
SHREC21_SIZE_GROUPS: dict[str, list[str]] = {
    "small": ["1s3x", "3qm1", "3gl1", "3h84", "2cg9"],
    "medium": ["3d2f", "1u6g", "3cf3", "1bxn", "1qvr"],
    "large": ["4cr2", "5mrc"],
}
UNSCORED_CLASSES = frozenset({"vesicle"})  # the default context classes
BACKGROUND = "background"


def context_keys(context: Collection[str] | None = None) -> frozenset[str]:
    """The classes that are context, not targets, as comparison keys (None: UNSCORED_CLASSES)."""
    return UNSCORED_CLASSES if context is None else frozenset(_key(name) for name in context)


def _key(name: str) -> str:
    """Class names compare case-insensitively."""
    return str(name).strip().lower()


def dilate_occupancy(occupancy: np.ndarray) -> np.ndarray:
    """One greyscale dilation with the 6-connected cross: each voxel takes the highest id
    among itself and its 6 face neighbours (voxels outside the volume do not count)."""
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(3, 1)
    return ndimage.grey_dilation(occupancy, footprint=cross, mode="constant", cval=0)


def round_and_clip(coords_xyz: np.ndarray, shape_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest voxel (halves to even, as Python's `round`) clipped into the volume.

    Returns the (n, 3) integer x, y, z indices and a boolean mask of the clipped rows.
    """
    coords = np.asarray(coords_xyz, dtype=np.float64).reshape(-1, 3)
    rounded = np.rint(coords).astype(np.int64)  # IEEE round-half-even, the same as round()
    upper = np.asarray(shape_zyx[::-1], dtype=np.int64) - 1  # x, y, z maxima
    clipped = np.clip(rounded, 0, upper)
    return clipped, np.any(clipped != rounded, axis=1)


def _safe_div(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _safe_div(2 * precision * recall, precision + recall)


def _check_truth(occupancy: np.ndarray, truth: ParticleTable) -> np.ndarray:
    occupancy = np.asarray(occupancy)
    if occupancy.ndim != 3:
        raise VPDetectError(f"occupancy mask must be 3D, got shape {occupancy.shape}")
    if occupancy.dtype.kind == "f":
        if not np.all(np.isfinite(occupancy)) or np.any(occupancy != np.round(occupancy)):
            raise VPDetectError("occupancy mask holds non-integer values (is it a tomogram?)")
    occupancy = occupancy.astype(np.int64 if len(truth) >= 2**31 - 1 else np.int32)
    n = len(truth)
    if occupancy.size and (occupancy.min() < 0 or occupancy.max() > n):
        raise VPDetectError(
            f"occupancy mask holds particle ids up to {int(occupancy.max())} "
            f"but the truth lists {n} particles"
        )
    shape_xyz = tuple(int(v) for v in occupancy.shape[::-1])
    if len(truth):
        centre = np.floor(truth.coords_xyz() + 0.5)
        outside = np.any((centre < 0) | (centre >= np.asarray(shape_xyz)), axis=1)
        if outside.any():
            row = int(np.argmax(outside))
            raise VPDetectError(
                f"truth particle {row + 1} at {tuple(truth.coords_xyz()[row])} lies outside the "
                f"occupancy mask of size (x, y, z) {shape_xyz}: mask and particle list disagree"
            )
    return occupancy


def _check_pred(pred: ParticleTable, shape_zyx: Sequence[int], truth: ParticleTable) -> None:
    shape_xyz = tuple(int(v) for v in shape_zyx[::-1])
    if pred.tomo_size is not None and tuple(pred.tomo_size) != shape_xyz:
        raise VPDetectError(
            f"predictions are for a tomogram of size (x, y, z) {tuple(pred.tomo_size)} "
            f"but the occupancy mask is {shape_xyz}"
        )
    if (
        pred.voxel_size is not None and truth.voxel_size is not None
        and abs(pred.voxel_size - truth.voxel_size) > 0.01 * truth.voxel_size
    ):
        raise VPDetectError(
            f"predictions are at {pred.voxel_size:g} A/voxel but the truth at "
            f"{truth.voxel_size:g} A/voxel; pick in a tomogram sampled like the truth"
        )


@dataclass(frozen=True)
class ScoringMask:
    """One tomogram's truth prepared for scoring (`scoring_mask`): the dilated particle-id
    lookup [z, y, x] and which ids count. Prepare once to score many prediction sets."""

    lookup: np.ndarray
    scored: np.ndarray


def scored_particles(truth: ParticleTable, context: Collection[str] | None = None) -> np.ndarray:
    """Per row of `truth`, whether the particle counts: not of a `context` class (default:
    vesicles, which are context, not targets)."""
    labels = truth.class_labels()
    if labels is None:
        return np.ones(len(truth), dtype=bool)
    keys = context_keys(context)
    return np.array([_key(v) not in keys for v in labels], dtype=bool)


def scoring_mask(occupancy: np.ndarray, truth: ParticleTable, context: Collection[str] | None = None) -> ScoringMask:
    """The checked, dilated lookup of `occupancy` for `truth` (particles of `context` classes,
    default vesicles, are background)."""
    occupancy = _check_truth(occupancy, truth)
    n = len(truth)
    # ids 1..n; scored[k] says whether particle k counts.
    scored = np.concatenate([[False], scored_particles(truth, context)])
    id_map = np.where(scored, np.arange(n + 1), 0).astype(occupancy.dtype)
    return ScoringMask(dilate_occupancy(id_map[occupancy]), scored)


def evaluate_picks(
    pred: ParticleTable,
    occupancy: np.ndarray,
    truth: ParticleTable,
    size_groups: Mapping[str, Sequence[str]] | None = None,
    prepared: ScoringMask | None = None,
    context: Collection[str] | None = None,
) -> dict:
    """SHREC metrics of `pred` against the occupancy mask [z, y, x] and the truth table.

    `size_groups` maps a group name to class names (default: SHREC'21 table 5);
    groups report the mean F1 of their classes that occur in the truth.
    `prepared`: `scoring_mask(occupancy, truth, context)` made beforehand (when scoring many sets).
    `context`: classes that are context, not targets (default vesicles; SHREC'21 scores gold
    beads, class `fiducial`): their particles are background, predictions of them are dropped.
    Returns {"localization": {...}, "classification": {...} or None}.
    """
    mask = scoring_mask(occupancy, truth, context) if prepared is None else prepared
    lookup, scored = mask.lookup, mask.scored
    _check_pred(pred, lookup.shape, truth)
    pred_labels = pred.class_labels()
    if pred_labels is not None:
        keys = context_keys(context)
        keep = np.array([_key(v) not in keys for v in pred_labels], dtype=bool)
        if not keep.all():
            pred = ParticleTable(pred.data[keep].reset_index(drop=True), pred.voxel_size, pred.tomo_size)
    n = len(truth)
    truth_labels = truth.class_labels()

    coords = pred.coords_xyz()
    voxels, was_clipped = round_and_clip(coords, lookup.shape)
    hits = lookup[voxels[:, 2], voxels[:, 1], voxels[:, 0]].astype(np.int64)
    counts = np.bincount(hits, minlength=n + 1)
    # First hit of each particle in file order (np.unique returns first occurrences).
    first_hit = np.full(n + 1, -1, dtype=np.int64)
    ids, first_index = np.unique(hits, return_index=True)
    first_hit[ids] = first_index
    first_hit[0] = -1

    found = scored & (counts > 0)
    found_ids = np.flatnonzero(found)
    # From the rounded, clipped voxel of the first hit, as the official script measures.
    deltas = voxels[first_hit[found_ids]] - truth.coords_xyz()[found_ids - 1]
    localization = localization_metrics(
        rr=len(pred),
        tp=int(found.sum()),
        fp=int(np.count_nonzero(hits == 0)),
        mh=int(np.count_nonzero(scored & (counts > 1))),
        ro=int(was_clipped.sum()),
        distance_sum=float(np.linalg.norm(deltas, axis=1).sum()),
        n_particles=int(scored.sum()),
    )

    classification = None
    pred_labels = pred.class_labels()
    if pred_labels is not None and truth_labels is not None:
        assigned = [
            pred_labels[first_hit[k]] if counts[k] > 0 else BACKGROUND
            for k in range(1, n + 1) if scored[k]
        ]
        true_names = [truth_labels[k - 1] for k in range(1, n + 1) if scored[k]]
        groups = dict(SHREC21_SIZE_GROUPS if size_groups is None else size_groups)
        classification = classification_metrics(true_names, assigned, pred_labels, groups)
    return {"localization": localization, "classification": classification}


def localization_metrics(
    rr: int, tp: int, fp: int, mh: int, ro: int, distance_sum: float, n_particles: int
) -> dict:
    """The localization table row from its counts; AD = distance_sum / TP (None without hits)."""
    precision = _safe_div(tp, rr)
    recall = _safe_div(tp, n_particles)
    return {
        "RR": rr,
        "TP": tp,
        "FP": fp,
        "FN": n_particles - tp,
        "MH": mh,
        "RO": ro,
        "AD": distance_sum / tp if tp else None,  # no hit, no distance (JSON null)
        "precision": precision,
        "recall": recall,
        "miss_rate": 1.0 - recall if n_particles else 0.0,
        "f1": _f1(precision, recall),
        "n_particles": n_particles,
    }


def combine_results(results: Sequence[Mapping], size_groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The total over several tomograms' `evaluate_picks` results: counts summed, AD the mean
    over all first hits, classification from the summed confusion matrices (None unless every
    tomogram has one)."""
    if len(results) == 1:
        return {"localization": dict(results[0]["localization"]),
                "classification": results[0]["classification"]}
    locs = [r["localization"] for r in results]
    localization = localization_metrics(
        **{key.lower(): sum(loc[key] for loc in locs) for key in ("RR", "TP", "FP", "MH", "RO")},
        distance_sum=sum(loc["AD"] * loc["TP"] for loc in locs if loc["TP"]),
        n_particles=sum(loc["n_particles"] for loc in locs),
    )
    classification = None
    if results and all(r["classification"] for r in results):
        true_names: list[str] = []
        assigned: list[str] = []
        labels: list[str] = []
        for result in results:
            confusion = result["classification"]["confusion"]
            labels += confusion["labels"]
            for true, row in zip(confusion["labels"], confusion["matrix"], strict=True):
                for got, count in zip(confusion["labels"], row, strict=True):
                    true_names += [true] * count
                    assigned += [got] * count
        groups = dict(SHREC21_SIZE_GROUPS if size_groups is None else size_groups)
        classification = classification_metrics(true_names, assigned, labels, groups)
    return {"localization": localization, "classification": classification}


def _label_order(
    true_names: Sequence[str], pred_names: Sequence[str], groups: Mapping[str, Sequence[str]]
) -> tuple[list[str], dict[str, str]]:
    """Class keys in table order (size-group order, then the rest sorted) and display names."""
    display: dict[str, str] = {}
    for name in list(true_names) + list(pred_names):
        display.setdefault(_key(name), str(name))
    true_keys = {_key(v) for v in true_names}
    other_keys = {_key(v) for v in pred_names} - true_keys
    grouped = [_key(c) for members in groups.values() for c in members]
    order = [k for k in dict.fromkeys(grouped) if k in true_keys]
    order += sorted(true_keys - set(order))
    order += sorted(other_keys - {BACKGROUND})
    order = [k for k in order if k != BACKGROUND] + [BACKGROUND]
    display.setdefault(BACKGROUND, BACKGROUND)
    return order, display


def classification_metrics(
    true_names: Sequence[str],
    assigned_names: Sequence[str],
    all_pred_names: Sequence[str],
    size_groups: Mapping[str, Sequence[str]],
) -> dict:
    """Confusion matrix [true, assigned] over true particles, per-class P/R/F1, group means.

    `assigned_names[i]` is the class of true particle i's first hit or "background";
    `all_pred_names` only widens the label set to classes predicted but never true.
    """
    order, display = _label_order(true_names, all_pred_names, size_groups)
    index = {k: i for i, k in enumerate(order)}
    matrix = np.zeros((len(order), len(order)), dtype=np.int64)
    for true, got in zip(true_names, assigned_names, strict=True):
        matrix[index[_key(true)], index[_key(got)]] += 1
    per_class: dict[str, dict] = {}
    for key in order:
        if key == BACKGROUND:
            continue
        i = index[key]
        precision = _safe_div(matrix[i, i], matrix[:, i].sum())
        recall = _safe_div(matrix[i, i], matrix[i, :].sum())
        per_class[display[key]] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "n_true": int(matrix[i, :].sum()),
        }
    true_keys = {_key(v) for v in true_names}
    groups_out: dict[str, dict] = {}
    for group, members in size_groups.items():
        present = [display[_key(c)] for c in dict.fromkeys(members) if _key(c) in true_keys]
        if present:
            groups_out[group] = {
                "f1": float(np.mean([per_class[c]["f1"] for c in present])),
                "classes": present,
            }
    return {
        "per_class": per_class,
        "confusion": {"labels": [display[k] for k in order], "matrix": matrix.tolist()},
        "size_groups": groups_out,
    }


# --------------------------------------------------------------------------- truth folders


def size_groups_from_simulation(simulation: Mapping) -> dict[str, list[str]]:
    """Groups from a simulation.json record: `classes: [{name, size_group, ...}]`."""
    groups: dict[str, list[str]] = {}
    classes = simulation.get("classes", []) if isinstance(simulation, Mapping) else []
    if not isinstance(classes, list):
        raise VPDetectError("simulation.json: 'classes' must be a list")
    for entry in classes:
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise VPDetectError("simulation.json: every class needs a 'name'")
        group = entry.get("size_group")
        if group:
            groups.setdefault(str(group), []).append(str(entry["name"]))
    return groups


def merge_size_groups(
    base: Mapping[str, Sequence[str]], extra: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """`base` groups plus `extra` ones; a class named in `extra` leaves its `base` group."""
    moved = {_key(c) for members in extra.values() for c in members}
    merged = {g: [c for c in members if _key(c) not in moved] for g, members in base.items()}
    for group, members in extra.items():
        merged.setdefault(group, [])
        merged[group].extend(str(c) for c in members)
    return {g: members for g, members in merged.items() if members}


def read_size_groups(model_dir: str | os.PathLike) -> dict[str, list[str]]:
    """SHREC'21 groups, extended by the class groups in `simulation.json` when the folder has one."""
    from vpdetect.io.shrec import read_simulation_record

    simulation = read_simulation_record(model_dir)
    if simulation is None:
        return {g: list(m) for g, m in SHREC21_SIZE_GROUPS.items()}
    return merge_size_groups(SHREC21_SIZE_GROUPS, size_groups_from_simulation(simulation))
