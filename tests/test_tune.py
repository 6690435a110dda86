"""Post-processing search (`vpdetect tune`) on a hand-made annotated scene."""

import numpy as np
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
        thresholds=(0.5,), bandwidths=(2.0, 5.0), merge_factors=(1.0,), min_sizes=(1, 10),
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
    assert "postprocess" not in read_model_card(model)  # -o leaves the input alone


def test_tune_refuses_a_folder_without_ground_truth(tmp_path, rng):
    volume = shrec_folder(tmp_path / "val", rng)
    (tmp_path / "val" / "occupancy_mask.mrc").unlink()
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    result = CliRunner().invoke(app, ["tune", str(model), "--data", str(tmp_path / "val")])
    assert result.exit_code == 2
    assert "occupancy_mask.mrc" in result.output
