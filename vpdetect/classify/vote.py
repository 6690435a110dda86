"""Masking and voting (VP-Detector steps 6 and 7) on one labelled subtomogram.

The network labels every voxel of a box with a class (0 = background). Only
the target particle, the connected component of non-background voxels at the
box centre, may vote: neighbours in the box, however large, are masked out.
When the centre voxel itself is background (a coordinate slightly off the
particle, or a hollow particle), the component nearest to the centre within
`search_radius` voxels is taken instead.

Ties between classes with equal voxel counts break by the larger summed
softmax probability inside the mask when probabilities are given, and then by
the lowest class index, so a vote is always reproducible.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Vote(NamedTuple):
    """Result of one vote. class_index 0 means no central component (unknown)."""

    class_index: int
    fraction: float  # share of the mask's voxels labelled with the winning class
    margin: float  # (winner count - runner-up count) / mask size


NO_VOTE = Vote(0, 0.0, 0.0)


def box_centre(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Index of the centre voxel, matching extract_boxes (size // 2 on each axis)."""
    return tuple(s // 2 for s in shape)


def central_mask(labels: np.ndarray, search_radius: float = 0.0) -> np.ndarray | None:
    """Boolean mask of the non-background component at the centre, or None if there is none.

    The box is labelled once with scipy.ndimage.label. If the centre voxel is
    background, the foreground voxel nearest to the centre (Euclidean, at most
    `search_radius` voxels away) picks the component; equally near voxels
    resolve to the component found first in raster order.
    """
    from scipy import ndimage

    # scipy's default structure is 6-connectivity: particles touching only at
    # an edge or a corner stay apart.
    components, n_components = ndimage.label(labels > 0)
    if n_components == 0:
        return None
    centre = box_centre(labels.shape)
    chosen = int(components[centre])
    if chosen == 0:
        chosen = _nearest_component(components, centre, search_radius)
        if chosen == 0:
            return None
    return components == chosen


def _nearest_component(components: np.ndarray, centre: tuple[int, ...], radius: float) -> int:
    reach = int(np.floor(radius))
    if reach < 1:
        return 0
    lo = [max(c - reach, 0) for c in centre]
    window = components[tuple(slice(a, c + reach + 1) for a, c in zip(lo, centre, strict=True))]
    hits = np.nonzero(window)
    if len(hits[0]) == 0:
        return 0
    dist2 = sum((h + a - c) ** 2 for h, a, c in zip(hits, lo, centre, strict=True))
    nearest = np.flatnonzero(dist2 <= radius * radius)
    if len(nearest) == 0:
        return 0
    # np.nonzero returns raster order, so the first minimum is the raster-first voxel.
    best = nearest[np.argmin(dist2[nearest])]
    return int(window[tuple(h[best] for h in hits)])


def vote_in_mask(
    labels: np.ndarray,
    mask: np.ndarray,
    n_classes: int,
    prob_sums: np.ndarray | None = None,
) -> Vote:
    """Majority label among the mask's voxels, with the deterministic tie-break above.

    `prob_sums[c]` is the summed probability of class c over the mask (optional).
    """
    selected = labels[mask]
    total = selected.size
    if total == 0:
        return NO_VOTE
    counts = np.bincount(selected.astype(np.int64, copy=False), minlength=n_classes)
    if len(counts) > n_classes:
        raise ValueError(f"label {len(counts) - 1} out of range for {n_classes} classes")
    counts[0] = 0  # background never wins (the mask holds none anyway)
    candidates = np.arange(1, n_classes)
    if len(candidates) == 0:
        return NO_VOTE
    tiebreak = (
        np.zeros(n_classes) if prob_sums is None else np.asarray(prob_sums, dtype=np.float64)
    )
    # lexsort sorts by the last key first: count desc, probability desc, index asc.
    order = candidates[
        np.lexsort((candidates, -tiebreak[candidates], -counts[candidates]))
    ]
    winner = int(order[0])
    runner_up = int(counts[order[1]]) if len(order) > 1 else 0
    return Vote(winner, counts[winner] / total, (counts[winner] - runner_up) / total)


def needs_tiebreak(labels: np.ndarray, mask: np.ndarray, n_classes: int) -> bool:
    """True when two classes share the top voxel count inside the mask."""
    counts = np.bincount(labels[mask].astype(np.int64, copy=False), minlength=n_classes)[1:]
    return counts.size > 1 and counts.max() > 0 and np.count_nonzero(counts == counts.max()) > 1


def central_vote(
    labels: np.ndarray,
    n_classes: int,
    search_radius: float = 0.0,
    probs: np.ndarray | None = None,
) -> Vote:
    """Class of the particle at the centre of a labelled box: mask, then vote.

    `labels` [z, y, x] ints in 0..n_classes-1 (0 = background); `probs`
    (n_classes, z, y, x) softmax output, used only to break ties.
    Returns Vote(class_index, fraction, margin); (0, 0, 0) when no central
    component lies within `search_radius`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label box, got shape {labels.shape}")
    mask = central_mask(labels, search_radius)
    if mask is None:
        return NO_VOTE
    prob_sums = None
    if probs is not None:
        prob_sums = np.asarray(probs, dtype=np.float64)[:, mask].sum(axis=1)
    return vote_in_mask(labels, mask, n_classes, prob_sums)
