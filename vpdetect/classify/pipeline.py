"""Stage 2 on one tomogram: extract a box per coordinate, then label it.

Classification runs only at the given coordinates, never as a sliding window.
Boxes are cut from the tomogram normalised once with its own z-score
statistics (as in training). The model card chooses the path:

- an MSDNet segments the boxes in batches (autocast on CUDA, the
  matrix-multiply engine of `vpdetect.nn.engine` on the CPU) and each box's
  label map is reduced to one class by the central-component vote of `vote.py`;
- a whole-box classifier (`vpdetect.nn.classifiers`) gives each box one
  softmax in one forward per batch; class 0 is "non-particle" (stage 1's false
  positives), and `vote_fraction` / `vote_margin` hold the winner's probability
  and its lead over the runner-up.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vpdetect.classify.extract import extract_boxes, inside_volume
from vpdetect.classify.vote import NO_VOTE, Vote, central_mask, needs_tiebreak, vote_in_mask
from vpdetect.errors import VPDetectError
from vpdetect.nn.flips import flip_averaged, resolve_flips

UNKNOWN_CLASS = "unknown"
NON_PARTICLE_CLASS = "non-particle"
# Boxes per forward pass when the options do not say: MSDNet segments every voxel, box classifiers do not.
DEFAULT_BATCH = {"msdnet": 8, "boxes": 64}
OUTPUT_COLUMNS = ("class_name", "class_number", "vote_fraction", "vote_margin")
CLASS_DTYPES = {"class_name": object, "class_number": "int64", "vote_fraction": float, "vote_margin": float}
# A tomogram and a classifier whose voxel sizes differ by more than this get a warning.
VOXEL_SIZE_TOLERANCE = 0.1


@dataclass
class ClassifyOptions:
    """Settings of stage 2 (the CLI fills these from its options)."""

    batch_size: int | None = None  # boxes per network call; None: 8 (MSDNet) or 64 (box classifiers)
    search_radius: float = 3.0  # voxels; how far from a background centre to look for the particle
    drop_unknown: bool = False  # drop "unknown" / "non-particle" particles instead of labelling them
    box_size: int | None = None  # None: the model card's crop_size
    precision: str = "auto"  # a vpdetect.nn.precision name (CUDA only; the CPU is fp32)
    # Box classifiers: average the softmax over this many of the 8 axis flips (1 = none).
    # Flips keep a single-axis tilt's missing wedge where it is (90-degree turns would not).
    # None: the model card's "test_time_flips", else 1.
    flips: int | None = None




def classifier_classes(card: dict) -> list[str]:
    """Class names of a classifier card, index 0 being background; other cards are refused."""
    from vpdetect.nn.checkpoint import check_inference_card

    check_inference_card(card, "classifier")
    names = list(card.get("class_names") or [])
    if len(names) < 2:
        raise VPDetectError("classifier model card lists no particle classes")
    return names


def tomogram_groups(data) -> list[tuple[str | None, np.ndarray]]:
    """Row positions of each tomogram in a table, in order of first appearance.

    Tables without a `tomo_name` column are one group named None.
    """
    if "tomo_name" not in data.columns:
        return [(None, np.arange(len(data)))]
    names = data["tomo_name"].astype(str).to_numpy()
    order = dict.fromkeys(names)
    return [(name, np.flatnonzero(names == name)) for name in order]


def classify_table(
    tomo,
    table,
    model,
    card: dict,
    options: ClassifyOptions | None = None,
    stats: tuple[float, float] | None = None,
    progress: Callable[[int], None] | None = None,
    timings: dict | None = None,
):
    """Classify every coordinate of `table` (a ParticleTable of one tomogram) in `tomo`.

    Returns a ParticleTable: the input rows (minus those outside the tomogram,
    which are skipped with a warning) plus class_name, class_number (index in
    the card's class_names; 0 = "unknown"), vote_fraction and vote_margin.
    `stats` reuses (mean, std) already computed for this tomogram (e.g. by
    localize in `vpdetect pick`); `progress(n)` is called after each batch with
    the number of boxes done; `timings` (a dict) receives seconds under
    "classify_load" (normalisation statistics) and "classify" (boxes, network, votes).
    """
    from vpdetect.nn.checkpoint import is_box_arch
    from vpdetect.preprocess import streamed_zscore_params

    options = options or ClassifyOptions()
    class_names = classifier_classes(card)
    boxes = is_box_arch(card.get("arch"))
    batch_size = options.batch_size or DEFAULT_BATCH["boxes" if boxes else "msdnet"]
    options = dataclasses.replace(options, flips=resolve_flips(options.flips, card))
    n_classes = len(class_names)
    if getattr(model, "n_classes", n_classes) != n_classes:
        raise VPDetectError(
            f"classifier has {model.n_classes} outputs but its card names {n_classes} classes"
        )
    box = int(options.box_size or card.get("crop_size") or 0)
    if box < 1:
        raise VPDetectError("classifier model card has no crop_size; give a box size")
    if batch_size < 1:
        raise VPDetectError(f"batch size must be at least 1, got {batch_size}")

    data = table.data
    if len(data) == 0:
        raise VPDetectError("particle table is empty: nothing to classify")
    missing = [c for c in ("x", "y", "z") if c not in data.columns]
    if missing:
        raise VPDetectError(f"particle table lacks coordinate column(s) {', '.join(missing)}")
    coords = data[["x", "y", "z"]].to_numpy(dtype=np.float64)
    inside = inside_volume(coords, tomo.data.shape)
    n_outside = int(np.count_nonzero(~inside))
    x, y, z = tomo.shape_xyz
    where = f"tomogram {tomo.name} ({x} x {y} x {z} voxels)"
    if n_outside == len(coords):
        raise VPDetectError(f"all {n_outside} coordinates lie outside {where}")
    if n_outside:
        warnings.warn(
            f"{n_outside} of {len(coords)} coordinates lie outside {where}; skipped", stacklevel=2
        )
    _warn_voxel_size_mismatch(tomo.voxel_size or table.voxel_size, card.get("voxel_size"))

    started = time.perf_counter()
    mean, std = stats if stats is not None else streamed_zscore_params(tomo.data)
    normalised_at = time.perf_counter()
    kept = data.iloc[np.flatnonzero(inside)].reset_index(drop=True)
    label = _label_boxes if boxes else _segment_and_vote
    votes = label(tomo.data, coords[inside], box, mean, std, model, n_classes, options, batch_size, progress)
    finished = time.perf_counter()
    if timings is not None:
        timings["classify_load"] = normalised_at - started
        timings["classify"] = finished - normalised_at

    indices = np.array([v.class_index for v in votes], dtype=np.int64)
    out = kept.copy()
    rejected = NON_PARTICLE_CLASS if boxes else UNKNOWN_CLASS
    out["class_name"] = [class_names[i] if i > 0 else rejected for i in indices]
    out["class_number"] = indices
    out["vote_fraction"] = np.array([v.fraction for v in votes], dtype=np.float64)
    out["vote_margin"] = np.array([v.margin for v in votes], dtype=np.float64)
    if options.drop_unknown:
        out = out[indices > 0].reset_index(drop=True)
    return dataclasses.replace(
        table,
        data=out,
        voxel_size=table.voxel_size if table.voxel_size is not None else tomo.voxel_size,
        tomo_size=table.tomo_size if table.tomo_size is not None else tomo.shape_xyz,
    )


def most_confident_first(table):
    """The rows reordered: particles with a class before `unknown` / `non-particle`, each group
    by classifier confidence (`vote_fraction`), highest first; ties keep their order.

    Where stage 1 put two picks in one particle, whoever reads the table first-hit first (the
    SHREC evaluation does) then sees the classifier's surest call for it, not an off-centre split."""
    data = table.data
    if len(data) < 2:
        return table
    order = np.lexsort((-data["vote_fraction"].to_numpy(dtype=np.float64), data["class_number"].to_numpy() == 0))
    return dataclasses.replace(table, data=data.iloc[order].reset_index(drop=True))


def with_empty_classes(table):
    """A table with no particles still gets the class columns, so every output has one layout."""
    import pandas as pd

    data = table.data.copy()
    for column, dtype in CLASS_DTYPES.items():
        data[column] = pd.Series([], dtype=dtype)
    return dataclasses.replace(table, data=data)


def _over_batches(volume, coords, box, mean, std, model, batch_size, progress, probabilities, votes_of):
    """Extract, predict and reduce the boxes batch by batch: a list of Votes, one per coordinate.

    `probabilities(model, inputs)` gives the network's softmax for a batch of boxes (on the
    CPU); `votes_of(probs)` turns it into one Vote per box.
    """
    import torch

    model.eval()
    votes = []
    # no_grad rather than inference_mode: the CPU engine's worker threads update
    # buffers in place, which inference tensors made here would refuse.
    with torch.no_grad():
        for start in range(0, len(coords), batch_size):
            chunk = coords[start : start + batch_size]
            inputs = torch.from_numpy(extract_boxes(volume, chunk, box, mean, std)).unsqueeze(1)
            votes.extend(votes_of(probabilities(model, inputs)))
            if progress is not None:
                progress(len(chunk))
    return votes


def _label_boxes(volume, coords, box, mean, std, model, n_classes, options, batch_size, progress):
    """One softmax per box, one forward per batch of boxes: (class, probability, lead) per box."""
    import torch

    from vpdetect.nn.precision import inference_arithmetic, resolve_precision

    device = next(model.parameters()).device
    arithmetic = resolve_precision(options.precision, device)

    flips = int(options.flips or 1)

    def probabilities(model, inputs):
        inputs = inputs.to(device, non_blocking=True)
        with inference_arithmetic(arithmetic, device):
            return flip_averaged(model.predict, inputs, flips)

    def votes_of(probs):
        top = torch.topk(probs, k=min(2, n_classes), dim=1).values.cpu().numpy().astype(np.float64)
        winners = probs.argmax(dim=1).cpu().numpy()
        runner_up = top[:, 1] if top.shape[1] > 1 else np.zeros(len(top))
        return [Vote(int(w), float(t), float(t - r)) for w, t, r in zip(winners, top[:, 0], runner_up, strict=True)]

    return _over_batches(volume, coords, box, mean, std, model, batch_size, progress, probabilities, votes_of)


def _segment_and_vote(volume, coords, box, mean, std, model, n_classes, options, batch_size, progress):
    """Segment each box (MSDNet) and vote inside its central component."""
    import torch

    from vpdetect.nn.engine import fast_predict

    def probabilities(model, inputs):
        # CPU: the matrix-multiply engine (float32); CUDA: cuDNN in `precision`.
        return fast_predict(model, inputs, options.precision)

    def votes_of(probs):
        labels = probs.argmax(dim=1).to(torch.int16).cpu().numpy()
        return [_vote_one(box_labels, probs[i], n_classes, options.search_radius) for i, box_labels in enumerate(labels)]

    return _over_batches(volume, coords, box, mean, std, model, batch_size, progress, probabilities, votes_of)


def _vote_one(labels, probs, n_classes, search_radius):
    mask = central_mask(labels, search_radius)
    if mask is None:
        return NO_VOTE
    prob_sums = None
    if needs_tiebreak(labels, mask, n_classes):
        # Only tied boxes pay for summing probabilities (on the device) and moving them.
        import torch

        mask_t = torch.from_numpy(mask).to(probs.device)
        prob_sums = probs[:, mask_t].double().sum(dim=1).cpu().numpy()
    return vote_in_mask(labels, mask, n_classes, prob_sums)


def _warn_voxel_size_mismatch(tomo_voxel: float | None, model_voxel: float | None) -> None:
    if tomo_voxel is None or not model_voxel:
        return
    if abs(tomo_voxel - model_voxel) > VOXEL_SIZE_TOLERANCE * model_voxel:
        warnings.warn(
            f"tomogram voxel size {tomo_voxel:.3g} A differs from the classifier's "
            f"{model_voxel:.3g} A; rescale the tomogram for reliable classes",
            stacklevel=3,
        )
