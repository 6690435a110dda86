"""Weighted focal loss for voxel-wise segmentation (VP-Detector eq. 6).

    L = -1/N sum_i sum_c alpha_c (1 - p_i^c)^gamma g_i^c log p_i^c

N counts the voxels that carry a label (voxels marked `ignore_index`, e.g.
padding outside a tomogram, take no part). gamma = 0 and alpha = 1 is plain
cross entropy; gamma > 0 shrinks the loss of voxels that are already
classified confidently so hard voxels dominate; alpha_c re-weights classes so
that small particles, which own few voxels, are not drowned out by large ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vpdetect.errors import VPDetectError

IGNORE_INDEX = -100


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: torch.Tensor | Sequence[float] | None = None,
    gamma: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted focal loss of `logits` (N, C, ...) against integer `target` (N, ...).

    `alpha` holds one weight per class (None = all ones). `reduction` "mean"
    divides by the number of labelled voxels (eq. 6), "sum" does not, "none"
    returns the per-voxel loss (0 at ignored voxels).
    """
    if gamma < 0:
        raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
    n_classes = logits.shape[1]
    # float32 even under autocast: log-probabilities near 0 need the precision.
    log_prob = F.log_softmax(logits.float(), dim=1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    log_p_true = log_prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = -log_p_true
    if gamma > 0:
        # 1 - p via expm1: exact for confident voxels, where 1 - exp(log p) rounds to 0;
        # the floor keeps pow's gradient finite for gamma < 1.
        one_minus_p = (-torch.expm1(log_p_true)).clamp_min(1e-30)
        loss = loss * one_minus_p.pow(gamma)
    if alpha is not None:
        weights = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)
        if weights.shape != (n_classes,):
            raise ValueError(f"alpha needs {n_classes} class weights, got shape {tuple(weights.shape)}")
        loss = loss * weights[safe_target]
    loss = loss * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


def alpha_from_radii(radii: Sequence[float], power: float = 3.0, background: float = 1.0) -> list[float]:
    """Class weights [background, class 1, ...] from the classes' effective radii.

    alpha_c is proportional to 1 / r_c^power (power 3: inverse particle volume,
    which evens out the voxel counts that make large particles dominate), scaled
    so the particle classes average 1; the background weight is given.
    """
    r = np.asarray(radii, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise VPDetectError("alpha from radii needs at least one particle class radius")
    if not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise VPDetectError(f"effective radii must be positive numbers, got {list(radii)}")
    raw = r ** (-power)
    scaled = raw / raw.mean()
    return [float(background)] + [float(v) for v in scaled]


def alpha_from_counts(counts: Sequence[float], max_ratio: float = 100.0) -> list[float]:
    """Class weights from voxel counts per class (background first): inverse frequency.

    Weights are scaled so the background gets 1 and capped at `max_ratio`, so a
    class with only a handful of voxels cannot blow up the loss. A class with no
    voxels gets weight 1 (it never contributes anyway).
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size < 2 or c[0] <= 0:
        raise VPDetectError("alpha from voxel counts needs background and at least one class with voxels")
    weights = np.ones_like(c)
    present = c > 0
    weights[present] = c[0] / c[present]
    return [float(v) for v in np.clip(weights, 1.0 / max_ratio, max_ratio)]


def parse_alpha(spec: str, class_names: Sequence[str], radii: Mapping[str, float] | None,
                counts: Sequence[float] | None) -> list[float] | None:
    """Turn an `--alpha` option into class weights.

    `none`: all ones; `radius`: from effective radii (needs `radii` for every
    non-background class); `frequency`: inverse voxel frequency (needs `counts`);
    otherwise a comma-separated list with one weight per class, background first.
    """
    spec = spec.strip().lower()
    n = len(class_names)
    if spec == "none":
        return None
    if spec == "radius":
        missing = [c for c in class_names[1:] if not radii or c not in radii]
        if missing:
            raise VPDetectError(
                f"--alpha radius needs the effective radius of every class; unknown for: {', '.join(missing)}"
            )
        return alpha_from_radii([radii[c] for c in class_names[1:]])  # type: ignore[index]
    if spec == "frequency":
        if counts is None:
            raise VPDetectError("--alpha frequency needs the training labels' voxel counts")
        return alpha_from_counts(counts)
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise VPDetectError(
            f"--alpha must be none, radius, frequency or {n} comma-separated numbers, got {spec!r}"
        ) from None
    if len(values) != n or not all(np.isfinite(values)) or any(v < 0 for v in values):
        raise VPDetectError(
            f"--alpha needs {n} non-negative weights (classes: {', '.join(class_names)}), got {spec!r}"
        )
    return values
