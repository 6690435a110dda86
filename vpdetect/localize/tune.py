"""Choosing stage 1's post-processing on annotated tomograms.

The network's probability map is computed once per tomogram; the threshold,
mean-shift bandwidth, merge radius and minimum cluster size are then searched
on a grid for the best mean SHREC localization F1. The winning values are
stored in the model card (`postprocess`) and become `localize`'s defaults for
that model, so a model carries the settings it was validated with.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A small grid: each threshold x bandwidth x merge point costs one clustering.
DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6)
DEFAULT_BANDWIDTHS = (5.0, 7.0, 9.0)
# Merge radius as a multiple of the bandwidth.
DEFAULT_MERGE_FACTORS = (0.75, 1.0, 1.25)
DEFAULT_MIN_SIZES = (5, 10, 20, 40)


@dataclass
class AnnotatedMap:
    """A tomogram's foreground probability map [z, y, x] with its SHREC ground truth."""

    prob: np.ndarray
    occupancy: np.ndarray
    truth: object  # ParticleTable of the true particles
    voxel_size: float | None


def tune_postprocessing(
    maps: Sequence[AnnotatedMap],
    opening_radius: int = 1,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    merge_factors: Sequence[float] = DEFAULT_MERGE_FACTORS,
    min_sizes: Sequence[int] = DEFAULT_MIN_SIZES,
) -> tuple[dict, list[dict]]:
    """(best settings with their mean F1, every grid point's scores), ties to the earlier grid point.

    Each threshold is applied (and opened, labelled) once per map; each
    bandwidth and merge radius clustered once; minimum sizes only filter.
    """
    from vpdetect.evaluate.shrec import evaluate_picks
    from vpdetect.io.particles import ParticleTable
    from vpdetect.localize.cluster import (
        cluster_foreground,
        drop_hollow_components,
        extract_foreground,
    )

    rows: list[dict] = []
    for threshold in thresholds:
        foregrounds = [extract_foreground(m.prob, threshold, opening_radius) for m in maps]
        for bandwidth, factor in itertools.product(bandwidths, merge_factors):
            # As `find_particles` does by default: hollow components (membranes) are dropped.
            clustered = [
                cluster_foreground(drop_hollow_components(fg, bandwidth), bandwidth, bandwidth * factor)
                for fg in foregrounds
            ]
            for min_size in min_sizes:
                f1s = []
                for m, (centres, sizes, _) in zip(maps, clustered, strict=True):
                    kept = centres[sizes >= min_size]
                    table = ParticleTable.from_arrays(
                        kept[:, ::-1], voxel_size=m.voxel_size, tomo_size=m.occupancy.shape[::-1]
                    )
                    f1s.append(evaluate_picks(table, m.occupancy, m.truth)["localization"]["f1"])
                rows.append(
                    {
                        "threshold": float(threshold),
                        "opening_radius": int(opening_radius),
                        "bandwidth": float(bandwidth),
                        "merge_radius": float(bandwidth * factor),
                        "min_size": int(min_size),
                        "f1": float(np.mean(f1s)),
                    }
                )
    best = max(rows, key=lambda row: row["f1"])  # max keeps the first of equal scores
    return dict(best), rows
