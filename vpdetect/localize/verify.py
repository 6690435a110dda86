"""Scoring picks with the localizer's pick verifier (`vpdetect.nn.verifier`).

Each pick gets a box of the tomogram as the localizer sees it (`ModelInput`: resampled,
cleaned, normalised and clipped as the network's tiles are) and of the localizer's map,
centred on the pick's voxel; the verifier's probability, averaged over the box and its
x flip (a mirror that keeps the missing wedge), is the pick's `verified` score. Picks
scoring below the card's (or the user's) minimum are dropped.
"""

from __future__ import annotations

import numpy as np

# Boxes per verifier call: ~2 MB each at 24^3 x 2 channels in float32.
VERIFY_BATCH = 64


def verifier_boxes(prepared, prob: np.ndarray, centres_zyx: np.ndarray, box_size: int) -> np.ndarray:
    """Boxes [n, 2, B, B, B] (float32) around the rounded centres [z, y, x] (model grid): the
    network's input (as `predict_map` normalises it) and the map; zero outside the volume."""
    volume = prepared.volume
    half = box_size // 2
    centres = np.rint(np.asarray(centres_zyx, dtype=np.float64)).astype(np.int64).reshape(-1, 3)
    centres = np.clip(centres, 0, np.asarray(volume.shape) - 1)
    boxes = np.zeros((len(centres), 2, box_size, box_size, box_size), dtype=np.float32)
    for i, centre in enumerate(centres):
        lo = centre - half
        src = tuple(slice(max(a, 0), min(a + box_size, n)) for a, n in zip(lo, volume.shape, strict=True))
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
        box = (np.asarray(volume[src], dtype=np.float32) - prepared.centre) / prepared.scale
        if prepared.clip is not None:
            np.clip(box, -prepared.clip, prepared.clip, out=box)
        boxes[(i, 0, *dst)] = box
        boxes[(i, 1, *dst)] = np.asarray(prob[src], dtype=np.float32)
    return boxes


def verifier_scores(verifier, boxes: np.ndarray, device="cpu", batch_size: int = VERIFY_BATCH) -> np.ndarray:
    """P(particle) per box: the verifier's sigmoid, averaged over the box and its x flip."""
    import torch

    verifier.eval()
    dtype = next(verifier.parameters()).dtype
    scores = []
    with torch.no_grad():
        for start in range(0, len(boxes), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(boxes[start:start + batch_size])).to(device, dtype)
            p = torch.sigmoid(verifier(x).float()) + torch.sigmoid(verifier(x.flip(-1)).float())
            scores.append((p / 2).cpu().numpy())
    return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)


def score_picks(verifier, prepared, prob: np.ndarray, centres_zyx: np.ndarray, device="cpu") -> np.ndarray:
    """The verifier's score of each pick [z, y, x] on the model grid."""
    if len(centres_zyx) == 0:
        return np.zeros(0)
    boxes = verifier_boxes(prepared, prob, centres_zyx, verifier.box_size)
    return verifier_scores(verifier, boxes, device)
