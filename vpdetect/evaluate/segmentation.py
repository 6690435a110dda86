"""Voxel-wise segmentation metrics (VP-Detector section 3.3.1): VA, MVA, MIoU.

p_ij is the number of voxels of true class i predicted as class j; the
confusion matrix here is indexed [true, predicted].
"""

from __future__ import annotations

import numpy as np

from vpdetect.errors import VPDetectError


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts, rows = true class, columns = predicted class."""
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise VPDetectError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    p = pred.ravel().astype(np.int64)
    t = target.ravel().astype(np.int64)
    if p.size and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= n_classes):
        raise VPDetectError(f"labels must lie in 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )


def segmentation_metrics(cm: np.ndarray) -> dict[str, float]:
    """VA, MVA and MIoU from a [true, predicted] confusion matrix.

    The paper averages over all M classes; a class absent from both target and
    prediction would make its terms 0/0, so MVA averages over the classes present
    in the target and MIoU over the classes present in target or prediction.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    diag = np.diag(cm)
    true_count = cm.sum(axis=1)
    pred_count = cm.sum(axis=0)
    union = true_count + pred_count - diag
    va = float(diag.sum() / total) if total > 0 else 0.0
    present = true_count > 0
    mva = float(np.mean(diag[present] / true_count[present])) if present.any() else 0.0
    seen = union > 0
    miou = float(np.mean(diag[seen] / union[seen])) if seen.any() else 0.0
    return {"VA": va, "MVA": mva, "MIoU": miou}
