"""Post-processing search (`vpdetect tune`) on a hand-made annotated scene."""

import numpy as np
import pytest
from typer.testing import CliRunner

import vpdetect.cli  # noqa: F401  registers the commands
from tests.test_localize_cli import CENTRES, RADIUS, SHAPE, intensity_localizer, scene
from vpdetect.cli.app import app
from vpdetect.io.mrc import write_mrc
from vpdetect.io.particles import ParticleTable, write_particles
from vpdetect.localize.tune import AnnotatedMap, tune_postprocessing
from vpdetect.nn.checkpoint import read_model_card


def annotated_scene(rng):
    """The ball scene, its occupancy mask (id k = ball k) and the true particles."""
    z, y, x = np.indices(SHAPE)
    occupancy = np.zeros(SHAPE, np.int16)
    for k, c in enumerate(CENTRES, start=1):
        occupancy[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= RADIUS**2] = k
    truth = ParticleTable.from_arrays(np.array(CENTRES)[:, ::-1], voxel_size=10.0,
                                      tomo_size=SHAPE[::-1], class_name=["ball"] * len(CENTRES))
    return scene(rng), occupancy, truth


def shrec_folder(folder, rng):
    """A SHREC-layout folder holding `annotated_scene`."""
    folder.mkdir()
    volume, occupancy, truth = annotated_scene(rng)
    write_mrc(folder / "reconstruction.mrc", volume, voxel_size=10.0)
    write_mrc(folder / "occupancy_mask.mrc", occupancy, voxel_size=10.0)
    write_particles(folder / "particle_locations.txt", truth, fmt="shrec")
    return volume


def test_search_prefers_settings_that_find_each_particle_once(rng):
    _, occupancy, truth = annotated_scene(rng)
    prob = (occupancy > 0).astype(np.float32)
    # A speck of 3 voxels: only a minimum size above 3 removes it.
    prob[2, 2, 2:5] = 1.0
    best, rows = tune_postprocessing(
        [AnnotatedMap(prob, occupancy, truth, 10.0)], opening_radius=0,
        thresholds=(0.5,), bandwidths=(2.0, 5.0), merge_factors=(1.0,), min_sizes=(1, 10), max_components=(0.0,),
    )
    assert len(rows) == 4
    assert best["f1"] == 1.0 and best["min_size"] == 10
    scores = {(r["bandwidth"], r["min_size"]): r["f1"] for r in rows}
    assert scores[(5.0, 1)] < 1.0  # the speck is a false positive


def test_tune_command_stores_the_winner_in_the_card(tmp_path, rng):
    volume = shrec_folder(tmp_path / "val", rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    out = tmp_path / "tuned.pt"
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"),
                                      "-o", str(out), "--tile", "24", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    tuned = read_model_card(out)["postprocess"]
    assert tuned["f1"] == 1.0 and tuned["tuned_on"] == [str(tmp_path / "val")]
    assert "bandwidth_factor" in tuned  # by default the bandwidth follows the measured particle size
    fixed = tmp_path / "fixed.pt"
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"), "-o", str(fixed),
                                      "--tile", "24", "--device", "cpu", "--bandwidth", "4", "--bandwidth", "6"])
    assert result.exit_code == 0, result.output
    assert read_model_card(fixed)["postprocess"]["bandwidth"] in (4.0, 6.0)
    assert "postprocess" not in read_model_card(model)  # -o leaves the input alone


def test_tune_refuses_a_folder_without_ground_truth(tmp_path, rng):
    volume = shrec_folder(tmp_path / "val", rng)
    (tmp_path / "val" / "occupancy_mask.mrc").unlink()
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val")])
    assert result.exit_code == 2
    assert "occupancy_mask.mrc" in result.output


@pytest.mark.parametrize("listed", ["", "vesicle"])
def test_tune_refuses_a_folder_without_particles_before_segmenting(tmp_path, rng, monkeypatch, listed):
    # Empty, or context only: every setting would score 0 and the grid's first point would be "best".
    import vpdetect.localize.pipeline as pipeline

    volume = shrec_folder(tmp_path / "val", rng)
    _, occupancy, _ = annotated_scene(rng)
    if listed:  # ball 1 listed as a vesicle, the others not at all
        truth = ParticleTable.from_arrays(np.array(CENTRES[:1])[:, ::-1], voxel_size=10.0, tomo_size=SHAPE[::-1],
                                          class_name=[listed])
        write_particles(tmp_path / "val" / "particle_locations.txt", truth, fmt="shrec")
        write_mrc(tmp_path / "val" / "occupancy_mask.mrc", np.where(occupancy == 1, 1, 0).astype(np.int16))
    else:
        (tmp_path / "val" / "particle_locations.txt").write_text("")
        write_mrc(tmp_path / "val" / "occupancy_mask.mrc", np.zeros_like(occupancy))
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    monkeypatch.setattr(pipeline, "segment_volume", lambda *a, **k: pytest.fail("segmented"))
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"), "-o", str(tmp_path / "t.pt")])
    assert result.exit_code == 2, result.output
    assert "lists no particle to tune on" in result.output
    assert not (tmp_path / "t.pt").exists()


def test_adaptive_search_stores_factors_and_localize_uses_them(rng):
    from vpdetect.localize.pipeline import LocalizeOptions

    _, occupancy, truth = annotated_scene(rng)
    prob = (occupancy > 0).astype(np.float32)
    calls = []
    best, rows = tune_postprocessing([AnnotatedMap(prob, occupancy, truth, 10.0)], opening_radius=0,
                                     thresholds=(0.5,), merge_factors=(1.0,), min_sizes=(5,),
                                     bandwidth_factors=(1.0, 2.0), max_components=(0.0,),
                                     progress=lambda *a: calls.append(a))
    assert len(rows) == 2 and best["f1"] == 1.0
    assert calls == [(1, 2), (2, 2)]
    assert {"bandwidth_factor", "merge_factor", "bandwidths"} <= set(best) and "bandwidth" not in best
    card = {"postprocess": best}
    options = LocalizeOptions().with_model_defaults(card)
    assert options.adaptive() and options.bandwidth_factor == best["bandwidth_factor"]
    # A size given by the user wins over the card's measured bandwidth.
    assert not LocalizeOptions(bandwidth=4.0).with_model_defaults(card).adaptive()
    assert not LocalizeOptions(particle_diameter=80.0).with_model_defaults(card).adaptive()
    # Cards tuned with a fixed bandwidth keep working.
    fixed = LocalizeOptions().with_model_defaults({"postprocess": {"bandwidth": 7.0, "merge_radius": 8.0}})
    assert not fixed.adaptive() and fixed.bandwidth == 7.0 and fixed.merge_radius == 8.0


def test_tune_refuses_a_nonpositive_bandwidth_before_segmenting(tmp_path, rng):
    volume = shrec_folder(tmp_path / "val", rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"), "--bandwidth", "0"])
    assert result.exit_code == 2
    assert "--bandwidth must be positive" in result.output and "segmenting" not in result.output
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"), "--min-score", "1"])
    assert result.exit_code == 2
    assert "--min-score must lie in [0, 1), got 1" in result.output and "segmenting" not in result.output


def test_search_finds_the_min_score_that_drops_weak_clusters_and_localize_uses_it(rng):
    """A weakly segmented blob away from the particles (structure the network is unsure of) is a
    false positive; the grid's min score removes it, the card stores it and `localize` applies it."""
    from vpdetect.localize.pipeline import DEFAULT_MIN_SCORE, LocalizeOptions

    _, occupancy, truth = annotated_scene(rng)
    prob = np.where(occupancy > 0, 0.95, 0.0).astype(np.float32)
    z, y, x = np.indices(SHAPE)
    far = np.min([np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) for c in CENTRES], axis=0)
    spot = np.unravel_index(np.argmax(far), SHAPE)  # the point farthest from every particle
    assert far[spot] > RADIUS + 6
    prob[(z - spot[0]) ** 2 + (y - spot[1]) ** 2 + (x - spot[2]) ** 2 <= 9] = 0.6
    best, rows = tune_postprocessing([AnnotatedMap(prob, occupancy, truth, 10.0)], opening_radius=0,
                                     thresholds=(0.5,), bandwidths=(5.0,), merge_factors=(1.0,), min_sizes=(5,),
                                     max_components=(0.0,), min_scores=(0.0, 0.8))
    scores = {r["min_score"]: r["f1"] for r in rows}
    assert scores[0.8] == 1.0 and scores[0.0] < 1.0
    assert best["min_score"] == 0.8
    assert LocalizeOptions().with_model_defaults({"postprocess": best}).min_score == 0.8
    assert LocalizeOptions(min_score=0.0).with_model_defaults({"postprocess": best}).min_score == 0.0
    # A card tuned before the option existed keeps every cluster.
    assert LocalizeOptions().with_model_defaults({"postprocess": {"threshold": 0.5}}).min_score == DEFAULT_MIN_SCORE == 0.0


def test_search_finds_the_largest_component_that_drops_a_membrane_and_localize_uses_it(rng):
    """A sheet segmented as foreground (a membrane) costs precision; the grid's largest-component
    limit removes it, the card stores the limit and `localize` applies it by default."""
    from vpdetect.localize.pipeline import DEFAULT_MAX_COMPONENT, LocalizeOptions

    _, occupancy, truth = annotated_scene(rng)
    prob = (occupancy > 0).astype(np.float32)
    free = np.ones(SHAPE, bool)
    z, y, x = np.indices(SHAPE)
    for c in CENTRES:  # the sheet stays clear of the particles
        free &= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 > (RADIUS + 3) ** 2
    sheet = np.zeros(SHAPE, bool)
    sheet[:, :, 1:4] = True
    prob[sheet & free] = 1.0
    best, rows = tune_postprocessing([AnnotatedMap(prob, occupancy, truth, 10.0)], opening_radius=0,
                                     thresholds=(0.5,), bandwidths=(5.0,), merge_factors=(1.0,), min_sizes=(5,),
                                     max_components=(0.0, 3.0))
    scores = {r["max_component"]: r["f1"] for r in rows}
    assert scores[3.0] == 1.0 and scores[0.0] < 1.0
    assert best["max_component"] == 3.0
    assert LocalizeOptions().with_model_defaults({"postprocess": best}).max_component == 3.0
    assert LocalizeOptions(max_component=0.0).with_model_defaults({"postprocess": best}).max_component == 0.0
    # A card tuned before the limit existed keeps every component.
    assert LocalizeOptions().with_model_defaults({"postprocess": {"threshold": 0.5}}).max_component == 0.0
    assert DEFAULT_MAX_COMPONENT == 0.0


def test_search_finds_that_faint_particles_need_sparing_and_localize_uses_it(rng):
    """Half the particles are marked by thin rods (a faint map at low SNR) that the opening erases;
    the grid's spare_small keeps them, the card stores it and `localize` applies it by default."""
    from vpdetect.localize.pipeline import DEFAULT_SPARE_SMALL, LocalizeOptions

    _, occupancy, truth = annotated_scene(rng)
    prob = np.zeros(SHAPE, np.float32)
    z, y, x = np.indices(SHAPE)
    for k, c in enumerate(CENTRES):
        if k % 2:  # a 2 x 2 x 5 rod through the centre: nothing of it survives a ball of radius 1
            c = np.round(c).astype(int)
            prob[c[0] - 2:c[0] + 3, c[1]:c[1] + 2, c[2]:c[2] + 2] = 0.9
        else:
            prob[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= RADIUS ** 2] = 0.9
    best, rows = tune_postprocessing([AnnotatedMap(prob, occupancy, truth, 10.0)], opening_radius=1,
                                     thresholds=(0.5,), bandwidths=(5.0,), merge_factors=(1.0,), min_sizes=(5,),
                                     max_components=(0.0,), spare_smalls=(0.0, 1.5))
    scores = {r["spare_small"]: r["f1"] for r in rows}
    assert scores[1.5] == 1.0 and scores[0.0] < 0.8
    assert best["spare_small"] == 1.5
    assert LocalizeOptions().with_model_defaults({"postprocess": best}).spare_small == 1.5
    assert LocalizeOptions(spare_small=0.0).with_model_defaults({"postprocess": best}).spare_small == 0.0
    # A card tuned before the option existed opens every component.
    assert LocalizeOptions().with_model_defaults({"postprocess": {"threshold": 0.5}}).spare_small == 0.0
    assert DEFAULT_SPARE_SMALL == 0.0


def test_tune_command_searches_the_grid_it_is_given(tmp_path, rng):
    volume = shrec_folder(tmp_path / "val", rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    out = tmp_path / "tuned.pt"
    grid = ["--threshold", "0.5", "--bandwidth-factor", "2", "--merge-factor", "1", "--min-size", "5",
            "--max-component", "0", "--max-component", "4", "--min-score", "0", "--min-score", "0.3"]
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"), "-o", str(out),
                                      "--tile", "24", "--device", "cpu", *grid, "--grid-csv", str(tmp_path / "g.csv")])
    assert result.exit_code == 0, result.output
    tuned = read_model_card(out)["postprocess"]
    assert tuned["grid_points"] == 4 and tuned["threshold"] == 0.5 and tuned["bandwidth_factor"] == 2.0
    assert tuned["min_score"] in (0.0, 0.3) and "min score" in result.output
    assert tuned["max_component"] in (0.0, 4.0) and "largest component" in result.output
    # every grid point, best first, with each tomogram's F1
    import pandas as pd

    table = pd.read_csv(tmp_path / "g.csv")
    assert len(table) == 4 and sorted(table["max_component"]) == [0.0, 0.0, 4.0, 4.0]
    assert sorted(table["min_score"]) == [0.0, 0.0, 0.3, 0.3]
    assert table["f1"].iloc[0] == pytest.approx(tuned["f1"], abs=1e-4)
    assert table[f"f1 {tmp_path / 'val'}"].iloc[0] == pytest.approx(tuned["f1"], abs=1e-4)
    # A shipped (float16) model stays float16 when tuned.
    import torch

    from vpdetect.nn.checkpoint import bundle_model

    bundle_model(model, tmp_path / "shipped.pt")
    result = CliRunner().invoke(app, ["tune", str(tmp_path / "shipped.pt"), "--data", str(tmp_path / "val"),
                                      "--tile", "24", "--device", "cpu", *grid])
    assert result.exit_code == 0, result.output
    payload = torch.load(tmp_path / "shipped.pt", weights_only=False)
    assert payload["card"]["weights_storage"] == "float16" and "postprocess" in payload["card"]
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    for bad, message in ((["--threshold", "1.5"], "--threshold must lie below 1"),
                         (["--max-component", "-1"], "--max-component must be 0 or positive"),
                         (["--spare-small", "-1"], "--spare-small must be 0 or positive"),
                         (["--min-size", "0"], "--min-size must be positive"),
                         (["--grid-csv", str(tmp_path / "missing" / "g.csv")], "output directory does not exist")):
        result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"), *bad])
        assert result.exit_code == 2 and message in result.output, result.output


def tuned_card(model, folder, flag, grid):
    """The card `tune MODEL --data FOLDER/val FLAG GRID` writes to FOLDER/FLAG.pt."""
    out = folder / f"{flag}.pt"
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(folder / "val"), "-o", str(out), flag, *grid])
    assert result.exit_code == 0, result.output
    return read_model_card(out)


def test_tune_with_spectrum_matching_records_the_choice(tmp_path, rng):
    from vpdetect.nn.checkpoint import load_model, save_model
    from vpdetect.spectrum import reference_profile

    volume = shrec_folder(tmp_path / "val", rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    grid = ["--threshold", "0.5", "--bandwidth-factor", "2", "--merge-factor", "1", "--min-size", "5",
            "--max-component", "0", "--tile", "24", "--device", "cpu"]
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"), "--match-spectrum", *grid])
    assert result.exit_code == 2 and "records no reference spectrum" in result.output
    net, card = load_model(model)
    save_model(model, net, {**card, "spectrum_reference": reference_profile([volume])})
    for flag, expected in (("--match-spectrum", True), ("--no-match-spectrum", False)):
        tuned = tuned_card(model, tmp_path, flag, grid)
        assert tuned["match_spectrum"] is expected and tuned["postprocess"]["f1"] == 1.0
    plain = tmp_path / "plain.pt"
    assert CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val"), "-o", str(plain),
                                    *grid]).exit_code == 0
    assert "match_spectrum" not in read_model_card(plain)  # not given: the card is left as it was


@pytest.mark.parametrize("on, off, key, info", [
    ("--erase-membranes", "--keep-membranes", "erase_membranes", "membranes: erased before the network by default"),
    ("--remove-gold-streaks", "--keep-gold-streaks", "remove_gold_streaks", "gold beads' streaks: subtracted"),
    ("--drop-gold", "--keep-gold", "drop_gold", "picks on gold beads: dropped by default"),
])
def test_tune_with_an_input_cleaning_step_records_the_choice(tmp_path, rng, on, off, key, info):
    volume = shrec_folder(tmp_path / "val", rng)
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    grid = ["--threshold", "0.5", "--bandwidth-factor", "2", "--merge-factor", "1", "--min-size", "5",
            "--max-component", "0", "--tile", "24", "--device", "cpu"]
    for flag, expected in ((on, True), (off, False)):
        tuned = tuned_card(model, tmp_path, flag, grid)
        # No sheet and no bead in these balls: the same picks either way.
        assert tuned[key] is expected and tuned["postprocess"]["f1"] == 1.0
    result = CliRunner().invoke(app, ["info", str(tmp_path / f"{on}.pt")])
    assert result.exit_code == 0 and info in result.output

