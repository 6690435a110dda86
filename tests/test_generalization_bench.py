"""The generalization benchmark's independent simulator, its DoG baseline and its plumbing."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import bench_generalization as bench
from benchmarks.independent_sim import IndependentParams, simulate, with_changes

# Small enough for a second or two per tomogram.
TINY = IndependentParams(shape_xyz=(48, 48, 32), tilt_step=6.0, snr=0.5)


@pytest.fixture(scope="module")
def dark():
    return simulate(TINY, 9500)


def test_same_seed_same_bytes_other_seed_other_scene(dark):
    again = simulate(TINY, 9500)
    assert again.volume.tobytes() == dark.volume.tobytes()
    assert again.occupancy.tobytes() == dark.occupancy.tobytes()
    assert np.array_equal(again.centres_xyz, dark.centres_xyz)
    other = simulate(TINY, 9501)
    assert not np.array_equal(other.occupancy, dark.occupancy)


def test_snr_is_the_target_measured_over_the_whole_reconstruction(dark):
    # Same seed, other SNR: same signal and noise draws, noise scaled by sqrt(0.5 / 4) relative.
    # V_a - V_b is pure noise, which separates signal and noise of the whole volume.
    high = simulate(with_changes(TINY, snr=4.0), 9500)
    ratio = np.sqrt(4.0 / 0.5)  # noise scale of the SNR 0.5 tomogram over the SNR 4 one
    noise = (dark.volume.astype(np.float64) - high.volume) * ratio / (ratio - 1.0)
    signal = dark.volume - noise
    whole = np.var(signal) / np.var(noise)
    assert whole == pytest.approx(0.5, rel=0.2)
    assert dark.snr_measured == pytest.approx(0.5, rel=0.2)
    assert high.snr_measured == pytest.approx(4.0, rel=0.2)
    assert dark.snr_particles == dark.snr_measured
    # Context adds signal, not noise: the particles keep their SNR.
    gold = simulate(with_changes(TINY, context=("gold",)), 9500)
    assert gold.snr_particles == pytest.approx(0.5, rel=1e-3)
    assert gold.snr_measured > 10 * dark.snr_measured


def test_bright_is_negated_dark_and_particles_are_dark(dark):
    bright = simulate(with_changes(TINY, contrast="bright"), 9500)
    assert np.array_equal(bright.volume, -dark.volume)
    assert np.array_equal(bright.occupancy, dark.occupancy)
    clean = simulate(with_changes(TINY, snr=50.0), 9500)
    inside = clean.volume[clean.occupancy > 0].mean()
    outside = clean.volume[clean.occupancy == 0].mean()
    assert inside < outside - 0.5 * clean.volume.std()


def test_occupancy_mask_and_table_agree(dark):
    n = len(dark.centres_xyz)
    assert n >= 4
    assert len(dark.shapes) == n and len(dark.radii_vox) == n
    ids = np.unique(dark.occupancy)
    assert np.array_equal(ids, np.arange(n + 1))  # 0 background, then 1..n, none empty
    voxels = np.floor(dark.centres_xyz + 0.5).astype(int)
    assert np.array_equal(dark.occupancy[voxels[:, 2], voxels[:, 1], voxels[:, 0]], np.arange(1, n + 1))
    volumes = np.bincount(dark.occupancy.ravel())[1:]
    assert np.allclose(dark.radii_vox, np.cbrt(3 * volumes / (4 * np.pi)))
    # Each particle's mask is one piece around its centre, no farther than its size allows.
    for k in range(1, n + 1):
        zyx = np.argwhere(dark.occupancy == k)
        spread = np.linalg.norm(zyx[:, ::-1] - dark.centres_xyz[k - 1], axis=1).max()
        assert spread <= 12.0 / TINY.voxel_nm


def test_ground_truth_scores_f1_one_with_vpdetect_evaluation(dark, tmp_path):
    from vpdetect.evaluate.shrec import evaluate_picks, read_truth

    bench._write_truth(tmp_path, dark.occupancy, dark.centres_xyz, dark.shapes, dark.voxel_size_angstrom)
    occupancy, truth = read_truth(tmp_path)
    assert np.array_equal(occupancy, dark.occupancy)
    assert truth.voxel_size == pytest.approx(10.0)
    scores = evaluate_picks(truth, occupancy, truth)["localization"]
    assert scores["f1"] == 1.0 and scores["n_particles"] == len(dark.centres_xyz)
    assert bench.typical_radius(occupancy, truth) == pytest.approx(np.median(dark.radii_vox))


def test_dog_baseline_finds_planted_blobs():
    rng = np.random.default_rng(3)
    shape = (40, 48, 48)
    centres = []
    while len(centres) < 12:
        c = rng.uniform([6, 6, 6], np.asarray(shape[::-1]) - 6)  # x, y, z
        if all(np.linalg.norm(c - o) > 9 for o in centres):
            centres.append(c)
    centres = np.round(np.asarray(centres))
    z, y, x = np.indices(shape)
    volume = np.zeros(shape)
    for cx, cy, cz in centres:
        volume -= np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 2.0**2))  # dark blobs
    volume += 0.02 * rng.normal(size=shape)
    picks = bench.dog_pick(volume, radius=3.0, n=12, dark=True)
    assert picks.shape == (12, 3)
    distances = np.linalg.norm(centres[:, None, :] - picks[None, :, :], axis=2)
    assert np.all(distances.min(axis=1) <= 1.0)
    # Picks keep their distance (non-maximum suppression).
    gaps = np.linalg.norm(picks[:, None] - picks[None, :], axis=2) + np.eye(12) * 99
    assert gaps.min() >= 3.0


def test_grid_names_are_unique_and_quick_cells_exist():
    cells = bench.grid()
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    assert {c.source for c in cells} == {"independent", "vpdetect"}
    assert all(9000 <= c.seed <= 9999 for c in cells)
    assert [c.name for c in bench.select_cells(cells, None, quick=True)] == list(bench.QUICK_CELLS)
    assert [c.name for c in bench.select_cells(cells, "tilt", quick=False)] == [
        "tilt=+-40", "tilt=+-55", "tilt=+-70", "tilt=-50..+66"]
    assert [c.name for c in bench.select_cells(cells, ["tilt=+-40", "snr=0.02"], quick=False)] == [
        "snr=0.02", "tilt=+-40"]
    for c in cells:
        if c.params is not None:
            c.params.validate()


def test_validation_grid_is_the_same_cells_on_other_seeds_in_other_folders():
    test, validation = bench.grid(), bench.grid(validation=True)
    assert [c.name for c in validation] == [c.name for c in test]
    assert [c.params for c in validation] == [c.params for c in test]
    assert {c.seed for c in test}.isdisjoint({c.seed for c in validation})
    assert all(9000 <= c.seed <= 9999 for c in validation)
    args = bench.parse_args(["--validation"])
    assert args.work_dir != bench.WORK_DIR and args.json != bench.DEFAULT_JSON
    assert bench.parse_args([]).work_dir == bench.WORK_DIR


def test_design_draws_repeat_the_cells_on_other_seeds_in_folders_of_their_own():
    cells = bench.select_cells(bench.grid(), ["context=gold", "vpdetect snr=4"], quick=False)
    drawn = bench.draws(cells, [9100, 9200])
    assert [(c.name, c.seed) for c in drawn] == [
        ("context=gold", 9100), ("vpdetect snr=4", 9101), ("vpdetect snr=4 inverted", 9101),
        ("context=gold", 9200), ("vpdetect snr=4", 9201), ("vpdetect snr=4 inverted", 9201)]
    assert [c.params for c in drawn[:3]] == [c.params for c in cells]
    with pytest.raises(ValueError, match="9999 is outside"):
        bench.draws(cells, [9999])
    args = bench.parse_args(["--seeds", "9100", "9200"])
    assert args.seeds == [9100, 9200] and args.work_dir not in (bench.WORK_DIR, bench.parse_args(["--validation"]).work_dir)
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "9100", "--validation"])
    row = {"cell": "context=gold", "localizer": {"f1": 0.9}, "dog": {"f1": 0.2}}
    summary = bench.draws_summary([row, row | {"localizer": {"f1": 0.7}}, row | {"cell": "base"}])
    assert "| context=gold | 2 | 0.8000 (0.700 - 0.900) | 0.200 |" in summary
    assert "| base | 1 | 0.9000 (0.900 - 0.900) | 0.200 |" in summary
    assert summary.endswith("over the 3 tomograms: 0.8333")


def test_benchmark_runner_refuses_options_for_several_benchmarks(capsys):
    from benchmarks.__main__ import main

    assert main(["simulate", "generalization", "--quick"]) == 2
    assert main(["no_such_bench"]) == 2
    assert "error" in capsys.readouterr().err


def test_failing_vpdetect_command_raises_and_table_renders(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 2"):
        bench._run_cli(["localize", str(tmp_path / "missing.mrc"), "-o", str(tmp_path / "p.csv"), "--quiet"])
    scores = {"f1": 0.5, "precision": 1.0, "recall": 1 / 3, "RR": 3}
    row = {"cell": "base", "axis": "base", "value": "-", "snr_measured": 0.4987, "snr_particles": 0.4987,
           "n_true": 9,
           "localizer": scores, "dog": scores | {"f1": 0.75}}
    lines = bench.markdown_table([row]).splitlines()
    assert lines[0].startswith("| cell | axis | value | SNR measured | n true | localizer F1")
    assert lines[2] == "| base | base | - | 0.499 | 9 | 0.50 | 1.00 / 0.33 | 3 | 0.75 |"
    row |= {"snr_measured": 12.0, "snr_particles": 0.5}
    assert "| 12 (particles 0.5) |" in bench.markdown_table([row])


def test_ice_gradient_adds_ice_along_every_ray_and_particles_keep_their_contrast():
    # The gradient draws nothing and blocks nothing, so both scenes hold the same particles; it adds
    # the same ramp inside and outside them (thicker ice, not denser ice that protein cannot exceed).
    from benchmarks.independent_sim import ICE, PROTEIN_EXCESS, _slab_bounds, build_scene

    plain = build_scene(TINY, np.random.default_rng(3))
    params = with_changes(TINY, context=("ice_gradient",))
    ramped = build_scene(params, np.random.default_rng(3))
    assert np.array_equal(plain.occupancy, ramped.occupancy) and plain.occupancy.max() > 0
    nx, nz = TINY.shape_xyz[0], TINY.shape_xyz[2]
    z0, z1 = _slab_bounds(TINY)
    z = np.arange(nz)
    in_slab = (z >= z0) & (z <= z1)
    ramp = 0.5 + np.arange(nx) / nx - ICE
    expected = np.where(in_slab[:, None, None], ramp[None, None, :], 0.0)
    assert np.allclose(ramped.density - plain.density, expected)
    inside = plain.occupancy > 0
    assert plain.density[inside].max() == pytest.approx(PROTEIN_EXCESS, rel=0.05)
    assert np.array_equal(plain.particles, ramped.particles)


def test_membrane_proteins_touch_the_membranes_and_leave_the_free_particles_alone():
    from scipy import ndimage

    from benchmarks.independent_sim import build_scene

    params = with_changes(TINY, shape_xyz=(64, 64, 40), context=("membranes",))
    plain = build_scene(params, np.random.default_rng(5))
    bound = build_scene(with_changes(params, context=("membranes", "membrane_proteins")), np.random.default_rng(5))
    n_free = len(plain.centres)
    assert len(bound.centres) > n_free  # some sit on the membranes
    assert np.array_equal(bound.occupancy[bound.occupancy <= n_free], plain.occupancy[bound.occupancy <= n_free])
    lipid = (plain.density - plain.particles) > 0.05  # the membranes' own density
    for label in range(n_free + 1, len(bound.centres) + 1):
        near = ndimage.binary_dilation(bound.occupancy == label, iterations=2)
        assert (near & lipid).any(), label
    with pytest.raises(ValueError, match="needs membranes"):
        simulate(with_changes(TINY, context=("membrane_proteins",)), 1)
