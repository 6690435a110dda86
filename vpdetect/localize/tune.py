"""Choosing stage 1's post-processing on annotated tomograms.

The network's probability map is computed once per tomogram; the threshold,
mean-shift bandwidth, merge radius, minimum cluster size and minimum score are then searched
on a grid for the best mean SHREC localization F1, with the largest component
kept (membranes and carbon segmented as foreground are long components). By
default the bandwidth is searched as a multiple of the particles' radius measured on each map
(`cluster.adaptive_bandwidth`): a fixed number of voxels suits only the particle
size of the tuning data, a multiple follows the user's particles. The winning values are
stored in the model card (`postprocess`) and become `localize`'s defaults for
that model, so a model carries the settings it was validated with.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# A small grid: each threshold x bandwidth point costs one mean-shift per map.
DEFAULT_THRESHOLDS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_BANDWIDTH_FACTORS = (1.5, 2.0, 2.5, 3.0)  # multiples of the measured particle radius
# Merge radius as a multiple of the bandwidth.
DEFAULT_MERGE_FACTORS = (0.75, 1.0, 1.25)
DEFAULT_MIN_SIZES = (5, 10, 20, 40)
# Least mean probability of a cluster's voxels (0: keep all); strong structure that is not a
# particle (membranes, carbon) tends to come out as clusters of lower mean probability.
DEFAULT_MIN_SCORES = (0.0,)
# Largest component kept, in balls of the bandwidth (0: no limit; see `cluster.oversized_components`).
DEFAULT_MAX_COMPONENTS = (0.0, 4.0, 8.0)
# Components of at most this many typical particles left unopened (0: open all; see
# `cluster.spare_small_components`).
DEFAULT_SPARE_SMALLS = (0.0,)


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
    bandwidths: Sequence[float] | None = None,
    merge_factors: Sequence[float] = DEFAULT_MERGE_FACTORS,
    min_sizes: Sequence[int] = DEFAULT_MIN_SIZES,
    bandwidth_factors: Sequence[float] = DEFAULT_BANDWIDTH_FACTORS,
    max_components: Sequence[float] = DEFAULT_MAX_COMPONENTS,
    min_scores: Sequence[float] = DEFAULT_MIN_SCORES,
    progress: Callable[[int, int], None] | None = None,
    drop_thin: bool = False,
    spare_smalls: Sequence[float] = DEFAULT_SPARE_SMALLS,
) -> tuple[dict, list[dict]]:
    """(best settings with their mean F1, every grid point's scores), ties to the earlier grid point.

    `bandwidths` (voxels) searches fixed bandwidths; None searches `bandwidth_factors`
    (rows then hold bandwidth_factor and merge_factor, and the bandwidth per map).
    Each threshold is applied (and opened, labelled) once per map; each
    bandwidth and largest component clustered once; merge radii, minimum sizes and
    minimum scores only merge and filter those modes.
    `progress(done, total)` is called after each mean-shift of all maps.
    """
    from vpdetect.evaluate.shrec import scoring_mask
    from vpdetect.localize.cluster import (
        adaptive_bandwidth,
        cluster_foreground,
        drop_components,
        drop_hollow_components,
        oversized_components,
        particle_foreground,
    )

    masks = [scoring_mask(m.occupancy, m.truth) for m in maps]  # once, for every grid point
    adaptive = bandwidths is None
    size_grid = list(bandwidth_factors if adaptive else bandwidths)
    total, done = len(thresholds) * len(spare_smalls) * len(size_grid) * len(max_components), 0
    rows: list[dict] = []
    for threshold, spare_small in itertools.product(thresholds, spare_smalls):
        foregrounds = [particle_foreground(m.prob, threshold, opening_radius, drop_thin, spare_small)
                       for m in maps]
        for size in size_grid:
            per_map = [adaptive_bandwidth(fg, size) if adaptive else float(size) for fg in foregrounds]
            # As `find_particles` does by default: hollow components (membranes) are dropped.
            solid = [drop_hollow_components(fg, bw) for fg, bw in zip(foregrounds, per_map, strict=True)]
            for max_component in max_components:
                # Mean-shift once per bandwidth and largest component; each merge radius only merges its modes.
                unmerged = [
                    cluster_foreground(drop_components(fg, oversized_components(fg, bw, max_component)), bw,
                                       merge_radius=0.0)
                    for fg, bw in zip(solid, per_map, strict=True)
                ]
                common = {"threshold": float(threshold), "opening_radius": int(opening_radius),
                          "max_component": float(max_component), "drop_thin": bool(drop_thin),
                          "spare_small": float(spare_small)}
                rows += _score_modes(maps, masks, unmerged, per_map, common, size, adaptive, merge_factors,
                                     min_sizes, min_scores)
                done += 1
                if progress is not None:
                    progress(done, total)
    best = max(rows, key=lambda row: row["f1"])  # max keeps the first of equal scores
    return dict(best), rows


def _score_modes(maps, masks, unmerged, per_map, common: dict, size: float, adaptive: bool,
                 merge_factors, min_sizes, min_scores) -> list[dict]:
    """Grid rows for every merge factor and minimum size of one clustering of all maps
    (`unmerged`: each map's modes); `common` holds the row's other settings."""
    from vpdetect.evaluate.shrec import evaluate_picks
    from vpdetect.io.particles import ParticleTable
    from vpdetect.localize.cluster import keep_clusters, merge_close

    rows = []
    for factor in merge_factors:
        clustered = [merge_close(*modes, bw * factor) for modes, bw in zip(unmerged, per_map, strict=True)]
        for min_size in min_sizes:
            for min_score in min_scores:
                f1s = []
                for m, mask, (centres, sizes, prob_sums) in zip(maps, masks, clustered, strict=True):
                    kept = centres[keep_clusters(sizes, prob_sums, min_size, min_score)]
                    table = ParticleTable.from_arrays(
                        kept[:, ::-1], voxel_size=m.voxel_size, tomo_size=m.occupancy.shape[::-1]
                    )
                    f1s.append(evaluate_picks(table, m.occupancy, m.truth, prepared=mask)["localization"]["f1"])
                row = {"threshold": common["threshold"], "opening_radius": common["opening_radius"]}
                if adaptive:
                    row.update(bandwidth_factor=float(size), merge_factor=float(factor),
                               bandwidths=[round(bw, 2) for bw in per_map])
                else:
                    row.update(bandwidth=float(size), merge_radius=float(size * factor))
                row.update(min_size=int(min_size), min_score=float(min_score), max_component=common["max_component"],
                           drop_thin=common["drop_thin"], spare_small=common["spare_small"],
                           f1=float(np.mean(f1s)), f1_per_map=[round(f, 4) for f in f1s])
                rows.append(row)
    return rows


def grid_table(rows: Sequence[dict], names: Sequence[str]):
    """Every grid point as a table: its settings, the mean F1 and one F1 column per tomogram
    (`names`, in the order of the maps), best first (ties in grid order)."""
    import pandas as pd

    records = []
    for row in rows:
        record = {k: v for k, v in row.items() if k not in ("f1_per_map", "bandwidths")}
        record.update({f"f1 {name}": f for name, f in zip(names, row["f1_per_map"], strict=True)})
        records.append(record)
    return pd.DataFrame.from_records(records).sort_values("f1", ascending=False, kind="stable")
