"""Training a localizer's pick verifier (`vpdetect.nn.verifier`) on the localizer's own picks.

Candidates are the picks the localizer makes on annotated tomograms, at its card's
threshold, at a lower one, and at its threshold with small components left unopened (more
near-misses, faint particles and false picks to learn from), each labelled by the SHREC hit
rule: 1 when it falls in a scored particle's dilated mask. The
verifier then learns which of them are particles from a box of the tomogram as the
localizer sees it and of its map (`vpdetect.localize.verify.verifier_boxes`), with the two
classes weighted to balance and the box flipped along z, y and x (mirrors that keep a
single-axis tilt series' missing wedge).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

# The lower of the two thresholds candidates are picked at (the card's is the other).
CANDIDATE_THRESHOLD = 0.3
# A third set at the card's threshold: components of up to this many typical particles left
# unopened (`--spare-small`), the faint blobs the opening erases.
CANDIDATE_SPARE_SMALL = 1.0
# Picks of the two thresholds closer than this (voxels) are one candidate.
SAME_PICK = 2.0
GAIN_JITTER = 0.3  # the input channel is scaled by exp(U(-J, J)): contrast differs between tomograms


@dataclass
class Candidates:
    """Boxes [n, 2, B, B, B] (float16) and labels [n] (1 = hits a particle)."""

    boxes: np.ndarray
    labels: np.ndarray

    @staticmethod
    def concatenate(parts: Sequence[Candidates]) -> Candidates:
        if not parts:
            raise ValueError("no candidates")
        return Candidates(np.concatenate([p.boxes for p in parts]), np.concatenate([p.labels for p in parts]))


def unique_picks(tables: Sequence[np.ndarray], min_distance: float = SAME_PICK) -> np.ndarray:
    """The rows of several (n, 3) coordinate arrays, dropping any closer than `min_distance`
    to a row kept before it (earlier arrays first)."""
    from scipy.spatial import cKDTree

    kept = np.zeros((0, 3))
    for table in tables:
        table = np.asarray(table, dtype=np.float64).reshape(-1, 3)
        if len(kept) and len(table):
            distance, _ = cKDTree(kept).query(table, k=1)
            table = table[distance >= min_distance]
        kept = np.concatenate([kept, table])
    return kept


def candidate_settings(options) -> list[dict]:
    """The post-processing settings candidates are picked with, in order (a pick close to an
    earlier one is the same candidate): the card's, CANDIDATE_THRESHOLD, and the card's
    threshold with CANDIDATE_SPARE_SMALL."""
    settings = [{"threshold": options.threshold}]
    if options.threshold != CANDIDATE_THRESHOLD:
        settings.append({"threshold": CANDIDATE_THRESHOLD})
    settings.append({"threshold": options.threshold, "spare_small": CANDIDATE_SPARE_SMALL})
    return settings


def tomogram_candidates(tomo, occupancy, truth, model, card: dict, options, box_size: int) -> Candidates:
    """One annotated tomogram's candidates: the localizer's picks with each of
    `candidate_settings`, boxed on the model grid and labelled by the SHREC hit rule."""
    from vpdetect.evaluate.shrec import round_and_clip, scoring_mask
    from vpdetect.localize.pipeline import model_input, particles_from_map, segment_volume
    from vpdetect.localize.verify import verifier_boxes

    # Picks on beads stay candidates, labelled by the truth like any other.
    options = replace(options, verify=False, drop_gold=False)
    prepared = model_input(tomo, card, options)
    prob, _ = segment_volume(tomo, model, card, options, prepared=prepared)
    picks = unique_picks([
        particles_from_map(prob, tomo, replace(options, **setting)).coords_xyz()
        for setting in candidate_settings(options)
    ])
    mask = scoring_mask(occupancy, truth)
    voxels, _ = round_and_clip(picks, mask.lookup.shape)
    labels = (mask.lookup[voxels[:, 2], voxels[:, 1], voxels[:, 0]] > 0).astype(np.int8)
    grid_zyx = picks[:, ::-1]
    if prepared.scale_zyx is not None:  # picks are on the tomogram's grid, boxes on the model's
        grid_zyx = grid_zyx / np.asarray(prepared.scale_zyx)
    boxes = verifier_boxes(prepared, prob, grid_zyx, box_size).astype(np.float16)
    return Candidates(boxes, labels)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (rank form; ties share ranks); nan when a class is missing."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _flipped(x, rng: np.random.Generator):
    for axis in (2, 3, 4):
        chosen = np.flatnonzero(rng.random(len(x)) < 0.5)
        if chosen.size:
            x[chosen] = x[chosen].flip(axis)
    return x


def train_verifier(
    train: Candidates,
    val: Candidates | None,
    *,
    width: int = 16,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    min_score: float = 0.5,
    device="cpu",
    time_limit_s: float | None = None,
    on_epoch: Callable[[dict], None] | None = None,
):
    """A trained PickVerifier and its history (one dict per epoch: loss, and on `val` the ROC AUC,
    the share of false candidates under `min_score` and of true ones at or above it). Adam with
    cosine decay over `epochs`; the same candidates and seed give the same verifier on a CPU."""
    import torch
    import torch.nn.functional as F

    from vpdetect.localize.verify import verifier_scores
    from vpdetect.nn.verifier import PickVerifier

    labels = np.asarray(train.labels)
    if labels.min() == labels.max():
        raise ValueError("the candidates are all true or all false picks: the verifier needs both")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    box_size = train.boxes.shape[-1]
    model = PickVerifier(train.boxes.shape[1], width, box_size).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    positive_weight = torch.tensor(float((labels == 0).sum()) / float((labels == 1).sum()), device=device)
    target = torch.from_numpy(labels.astype(np.float32))
    history: list[dict] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(labels))
        total = 0.0
        for first in range(0, len(order), batch_size):
            rows = np.sort(order[first:first + batch_size])
            x = _flipped(torch.from_numpy(train.boxes[rows].astype(np.float32)), rng)
            x[:, 0] *= torch.from_numpy(np.exp(rng.uniform(-GAIN_JITTER, GAIN_JITTER, len(rows))).astype(np.float32))[
                :, None, None, None]
            loss = F.binary_cross_entropy_with_logits(model(x.to(device)), target[rows].to(device),
                                                      pos_weight=positive_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        schedule.step()
        row = {"epoch": epoch + 1, "loss": total / len(labels), "seconds": time.perf_counter() - start}
        if val is not None and len(val.labels):
            scores = verifier_scores(model, val.boxes.astype(np.float32), device)
            true = val.labels == 1
            row.update(val_auc=roc_auc(scores, true),
                       val_false_dropped=float(np.mean(scores[~true] < min_score)) if (~true).any() else float("nan"),
                       val_true_kept=float(np.mean(scores[true] >= min_score)) if true.any() else float("nan"))
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            break
    return model.cpu().eval(), history
