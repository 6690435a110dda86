import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vpdetect.cli  # noqa: F401  registers the commands
from vpdetect.cli.app import app
from vpdetect.io.mrc import read_tomogram, write_mrc
from vpdetect.io.particles import read_particles
from vpdetect.nn.msdnet import MSDNet

SHAPE = (36, 40, 44)  # [z, y, x]
CENTRES = [(10.0, 12.0, 12.0), (11.0, 27.0, 30.0), (25.0, 14.0, 31.0), (26.0, 28.0, 13.0)]  # [z, y, x]
RADIUS = 4.0


def scene(rng, centres=CENTRES, shape=SHAPE):
    """Bright balls (1.0) on weak noise: the tomogram and the true centres [z, y, x]."""
    z, y, x = np.indices(shape)
    volume = rng.normal(0.0, 0.1, shape).astype(np.float32)
    for c in centres:
        volume[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= RADIUS**2] = 1.0
    return volume


def card(stage="localizer", crop_size=16):
    return {
        "format": "vpdetect-model",
        "stage": stage,
        "arch": {"in_channels": 1, "n_classes": 2, "width": 1, "depth": 2, "max_dilation": 2},
        "class_names": ["background", "particle"],
        "normalisation": "zscore",
        "voxel_size": 10.0,
        "crop_size": crop_size,
        "provenance": {"note": "hand-set test weights"},
        "metrics": {},
    }


def intensity_localizer(path, volume, stage="localizer", crop_size=16):
    """A tiny MSDNet whose foreground probability is a steep sigmoid of the normalised intensity,
    centred half-way between background (0) and particles (1): it segments the balls."""
    from vpdetect.nn.checkpoint import save_model

    torch.manual_seed(0)
    net = MSDNet(in_channels=1, n_classes=2, width=1, depth=2, max_dilation=2)
    mean, std = float(volume.mean()), float(volume.std())
    gain = 10.0 * std  # logit difference 20 * (raw - 0.5)
    with torch.no_grad():
        for weight in net.layer_weights:
            weight.zero_()
        net.final.weight.zero_()
        net.final.weight[1, 0] = gain
        net.final.bias.copy_(torch.tensor([0.0, gain * (mean - 0.5) / std]))
    save_model(path, net, card(stage, crop_size))
    return path


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def data(tmp_path, rng):
    volume = scene(rng)
    write_mrc(tmp_path / "TS_01.mrc", volume, voxel_size=10.0)
    model = intensity_localizer(tmp_path / "localizer.pt", volume)
    return tmp_path, volume, model


def found_zyx(table):
    return table.data[["z", "y", "x"]].to_numpy()


def assert_centres(table, centres, tolerance=0.5):
    got = found_zyx(table)
    assert len(got) == len(centres), got
    for c in centres:
        assert np.min(np.linalg.norm(got - np.asarray(c), axis=1)) < tolerance


def test_localize_one_tomogram_to_relion4_star_with_map_and_sidecar(data):
    folder, volume, model = data
    out = folder / "picks.star"
    result = run("localize", folder / "TS_01.mrc", "--model", model, "-o", out,
                 "--save-map", folder / "map.mrc", "--tile", 24, "--device", "cpu", "--spare-small", 1)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "_rlnTomoName" in text and "_rlnAutopickFigureOfMerit" in text and "_rlnCoordinateX" in text
    table = read_particles(out)
    assert_centres(table, CENTRES)
    assert set(table.data["tomo_name"]) == {"TS_01"}
    assert table.data["tomo_path"].iloc[0] == str((folder / "TS_01.mrc").resolve())
    assert (table.data["score"] > 0.9).all()
    # The map: tomogram-sized, high inside the balls.
    prob = read_tomogram(folder / "map.mrc").data
    assert prob.shape == SHAPE
    assert prob[10, 12, 12] > 0.99 and prob[0, 0, 0] < 0.01
    record = json.loads((folder / "picks.star.json").read_text())
    assert record["command"] == "localize"
    assert record["parameters"]["tile"] == 24 and record["result"]["postprocess"]["threshold"] == 0.5
    assert record["result"]["postprocess"]["spare_small"] == 1.0
    assert len(record["input"]["sha256"]) == 64 and len(record["models"]["localizer"]["sha256"]) == 64
    assert record["result"]["n_particles"] == 4
    # A timing line names every phase.
    for phase in ("load", "network", "stitch", "cluster", "write"):
        assert phase in result.output


@pytest.mark.parametrize("fmt,suffix", [("csv", ".csv"), ("relion5", ".star"), ("shrec", ".txt")])
def test_other_formats_land_in_output_dir(data, fmt, suffix):
    folder, _, model = data
    result = run("localize", folder / "TS_01.mrc", "-m", model, "--format", fmt,
                 "--output-dir", folder / "out", "--bandwidth", 4, "--quiet")
    assert result.exit_code == 0, result.output
    out = folder / "out" / f"TS_01{suffix}"
    table = read_particles(out, voxel_size=10.0, tomo_size=SHAPE[::-1])
    assert_centres(table, CENTRES)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_batch_with_glob_failure_summary_resume_and_shards(tmp_path, rng):
    volume = scene(rng)
    for name in ("TS_01", "TS_02", "TS_03"):
        write_mrc(tmp_path / f"{name}.mrc", volume, voxel_size=10.0)
    bad = volume.copy()
    bad[3, 3, 3] = np.nan
    write_mrc(tmp_path / "TS_00.mrc", bad, voxel_size=10.0)
    model = intensity_localizer(tmp_path / "localizer.pt", volume)
    out = tmp_path / "out"
    result = run("localize", tmp_path / "TS_*.mrc", "-m", model, "-d", out, "--tile", 32)
    assert result.exit_code == 2
    assert "TS_00.mrc: tomogram contains NaN" in result.output
    assert "3 done, 0 skipped, 1 failed of 4" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "TS_01.star", "TS_01.star.json", "TS_02.star", "TS_02.star.json", "TS_03.star", "TS_03.star.json",
    ]
    # A rerun resumes: complete outputs are skipped.
    (out / "TS_02.star.json").unlink()  # as if killed between table and sidecar
    again = run("localize", tmp_path / "TS_0[123].mrc", "-m", model, "-d", out, "--tile", 32)
    assert again.exit_code == 0, again.output
    assert "1 done, 2 skipped, 0 failed of 3" in again.output
    # Shards 0/2 and 1/2 (or the Slurm variables) together do every input once.
    shard_out = tmp_path / "shards"
    first = run("localize", tmp_path / "TS_0[123].mrc", "-m", model, "-d", shard_out, "--shard", "0/2")
    second = CliRunner(env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}).invoke(
        app, ["localize", str(tmp_path / "TS_0[123].mrc"), "-m", str(model), "-d", str(shard_out)]
    )
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "2 done" in first.output and "1 done" in second.output
    assert sorted(p.name for p in shard_out.glob("*.star")) == ["TS_01.star", "TS_02.star", "TS_03.star"]


def test_mask_and_z_range_restrict_the_search(data):
    folder, _, model = data
    mask = np.zeros(SHAPE, np.int8)
    mask[:, :, :22] = 1  # the x < 22 half holds centres 0 and 3
    write_mrc(folder / "roi.mrc", mask)
    result = run("localize", folder / "TS_01.mrc", "-m", model, "-o", folder / "roi.csv", "--mask", folder / "roi.mrc")
    assert result.exit_code == 0, result.output
    assert_centres(read_particles(folder / "roi.csv"), [CENTRES[0], CENTRES[3]])
    result = run("localize", folder / "TS_01.mrc", "-m", model, "-o", folder / "z.csv", "--z-range", 18, 35)
    assert result.exit_code == 0, result.output
    assert_centres(read_particles(folder / "z.csv"), CENTRES[2:])
    wrong = run("localize", folder / "TS_01.mrc", "-m", model, "-o", folder / "w.csv", "--mask", folder / "map_missing.mrc")
    assert wrong.exit_code == 2 and not (folder / "w.csv").exists()


def test_particle_diameter_sets_the_bandwidth(data):
    folder, _, model = data
    result = run("localize", folder / "TS_01.mrc", "-m", model, "-o", folder / "d.star", "--particle-diameter", 80)
    assert result.exit_code == 0, result.output
    record = json.loads((folder / "d.star.json").read_text())
    assert record["result"]["bandwidth_voxels"] == pytest.approx(4.0)  # 80 A / 2 / 10 A per voxel


def test_zero_particles_is_an_empty_table_and_a_warning(tmp_path, rng):
    volume = scene(rng)
    model = intensity_localizer(tmp_path / "localizer.pt", volume)
    write_mrc(tmp_path / "empty.mrc", rng.normal(0, 0.1, SHAPE).astype(np.float32))
    result = run("localize", tmp_path / "empty.mrc", "-m", model, "-o", tmp_path / "e.star")
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "no particles" in result.output
    assert len(read_particles(tmp_path / "e.star")) == 0


def _error_line(result):
    lines = [line for line in result.output.splitlines() if "error" in line]
    assert lines, result.output
    return lines[0]


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
@pytest.mark.parametrize(
    "case,expected",
    [
        ("classifier", "localizer"),
        ("missing_model", "model file not found"),
        ("too_small", "needs at least 16"),
        ("constant", "constant value"),
        ("nan", "NaN"),
        ("devices", "CPU-only"),
    ],
)
def test_errors_are_one_line_exit_2_and_leave_no_output(tmp_path, rng, monkeypatch, case, expected):
    volume = scene(rng)
    model = intensity_localizer(tmp_path / "localizer.pt", volume)
    tomo = tmp_path / "t.mrc"
    extra = []
    if case == "classifier":
        model = intensity_localizer(tmp_path / "classifier.pt", volume, stage="classifier")
    elif case == "missing_model":
        model = tmp_path / "nope.pt"
    elif case == "too_small":
        volume = volume[:12]
    elif case == "constant":
        volume = np.full(SHAPE, 3.0, np.float32)
    elif case == "nan":
        volume[5, 5, 5] = np.nan
    elif case == "devices":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        extra = ["--devices", "0,1"]
    write_mrc(tomo, volume)
    out = tmp_path / "out.star"
    result = run("localize", tomo, "-m", model, "-o", out, *extra)
    assert result.exit_code == 2, result.output
    assert expected in _error_line(result)
    assert "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "out.star.json").exists()


def test_missing_default_model_is_a_clear_error(tmp_path, rng, monkeypatch):
    import vpdetect.models

    monkeypatch.setattr(vpdetect.models, "default_model_path", lambda stage: tmp_path / f"{stage}.pt", raising=False)
    write_mrc(tmp_path / "t.mrc", scene(rng))
    result = run("localize", tmp_path / "t.mrc", "-o", tmp_path / "o.star")
    assert result.exit_code == 2
    assert "no localizer model" in _error_line(result) and "--model" in result.output
    assert not (tmp_path / "o.star").exists()


def test_tuned_postprocessing_in_the_card_sets_defaults_and_options_win():
    from vpdetect.localize.pipeline import DEFAULT_MIN_SIZE, LocalizeOptions

    card = {"postprocess": {"threshold": 0.6, "bandwidth": 9.0, "merge_radius": 11.25,
                            "min_size": 20, "opening_radius": 1, "f1": 0.93}}
    tuned = LocalizeOptions().with_model_defaults(card)
    assert (tuned.threshold, tuned.bandwidth, tuned.merge_radius, tuned.min_size) == (0.6, 9.0, 11.25, 20)
    given = LocalizeOptions(threshold=0.3, bandwidth=4.0).with_model_defaults(card)
    # A bandwidth from the command line keeps the merge radius that goes with it (bandwidth/2).
    assert (given.threshold, given.bandwidth, given.merge_radius, given.min_size) == (0.3, 4.0, None, 20)
    plain = LocalizeOptions().with_model_defaults({})
    assert plain.min_size == DEFAULT_MIN_SIZE and plain.bandwidth is None
    # The thin-structure filter: the card's choice unless --drop-thin / --keep-thin says otherwise.
    assert tuned.drop_thin is False and plain.drop_thin is False
    thin_card = {"postprocess": {**card["postprocess"], "drop_thin": True}}
    assert LocalizeOptions().with_model_defaults(thin_card).drop_thin is True
    assert LocalizeOptions(drop_thin=False).with_model_defaults(thin_card).drop_thin is False


def test_contrast_option_and_detection_flip_a_negated_tomogram(tmp_path, rng):
    # The tiny localizer sees bright balls; its card says it expects bright particles.
    volume = scene(rng)
    model = intensity_localizer(tmp_path / "bright.pt", volume)
    from vpdetect.nn.checkpoint import load_model, save_model

    net, model_card = load_model(model)
    save_model(model, net, {**model_card, "contrast": "bright"})
    write_mrc(tmp_path / "dark.mrc", -volume, voxel_size=10.0)
    for contrast in ("dark", "auto"):
        out = tmp_path / f"{contrast}.csv"
        result = run("localize", tmp_path / "dark.mrc", "--model", model, "-o", out, "--contrast", contrast)
        assert result.exit_code == 0, result.output
        assert_centres(read_particles(out), CENTRES)
    wrong = tmp_path / "wrong.csv"
    assert run("localize", tmp_path / "dark.mrc", "--model", model, "-o", wrong, "--contrast", "bright").exit_code == 0
    assert len(read_particles(wrong)) != len(CENTRES)
    bad = run("localize", tmp_path / "dark.mrc", "--model", model, "-o", tmp_path / "x.csv", "--contrast", "grey")
    assert bad.exit_code == 2 and "--contrast" in bad.output and not (tmp_path / "x.csv").exists()


def test_a_tomogram_at_half_the_voxel_size_is_resampled_and_coordinates_map_back(data):
    tmp_path, _, model = data
    # the same scene drawn at 5 A: twice the voxels, centres at 2 c
    rng = np.random.default_rng(3)
    fine = scene(rng, centres=[tuple(2.0 * v for v in c) for c in CENTRES], shape=tuple(2 * n for n in SHAPE))
    z, y, x = np.indices(fine.shape)
    fine[:] = rng.normal(0.0, 0.1, fine.shape)
    for c in CENTRES:
        fine[(z - 2 * c[0]) ** 2 + (y - 2 * c[1]) ** 2 + (x - 2 * c[2]) ** 2 <= (2 * RADIUS) ** 2] = 1.0
    write_mrc(tmp_path / "fine.mrc", fine, voxel_size=5.0)
    out = tmp_path / "fine.csv"
    result = run("localize", tmp_path / "fine.mrc", "--model", model, "-o", out, "--save-map", tmp_path / "m.mrc")
    assert result.exit_code == 0, result.output
    table = read_particles(out)
    assert_centres(table, [tuple(2.0 * v for v in c) for c in CENTRES], tolerance=0.5 * 2)  # 0.5 model voxel
    assert read_tomogram(tmp_path / "m.mrc").data.shape == fine.shape
    kept = tmp_path / "kept.csv"
    assert run("localize", tmp_path / "fine.mrc", "--model", model, "-o", kept, "--no-rescale").exit_code == 0


def test_a_model_with_background_sigma_sees_through_an_intensity_gradient(tmp_path, rng):
    # The tiny localizer thresholds half-way between background and particles of the
    # background-subtracted scene; a ramp across x then moves nothing, while a model that
    # sees the ramp marks its bright side as particle.
    from vpdetect.nn.checkpoint import load_model, save_model
    from vpdetect.preprocess import subtract_background

    volume = scene(rng)
    ramp = np.broadcast_to(np.linspace(-0.5, 0.5, SHAPE[2], dtype=np.float32), SHAPE)
    write_mrc(tmp_path / "ramp.mrc", volume + ramp, voxel_size=10.0)
    flat = intensity_localizer(tmp_path / "flat.pt", np.asarray(subtract_background(volume, 8.0)))
    net, model_card = load_model(flat)
    save_model(flat, net, {**model_card, "background_sigma": 8.0})
    plain = intensity_localizer(tmp_path / "plain.pt", volume)
    for model, expected in ((flat, True), (plain, False)):
        out = tmp_path / f"{model.stem}.csv"
        result = run("localize", tmp_path / "ramp.mrc", "--model", model, "-o", out)
        assert result.exit_code == 0, result.output
        if expected:
            assert_centres(read_particles(out), CENTRES)
        else:
            assert len(read_particles(out)) != len(CENTRES)
    assert "background subtracted" in run("info", flat).output


def test_a_card_with_a_negative_background_sigma_is_refused_in_one_line(data):
    from vpdetect.nn.checkpoint import load_model, save_model

    tmp_path, _, model = data
    net, model_card = load_model(model)
    save_model(tmp_path / "bad.pt", net, {**model_card, "background_sigma": -2})
    out = tmp_path / "bad.csv"
    result = run("localize", tmp_path / "TS_01.mrc", "--model", tmp_path / "bad.pt", "-o", out)
    assert result.exit_code == 2 and "background_sigma must be a non-negative number" in result.output
    assert not out.exists()


def test_match_spectrum_follows_the_card_and_needs_a_reference(data):
    from vpdetect.nn.checkpoint import load_model, save_model
    from vpdetect.spectrum import reference_profile

    tmp_path, volume, model = data
    out = tmp_path / "m.csv"
    result = run("localize", tmp_path / "TS_01.mrc", "--model", model, "-o", out, "--match-spectrum")
    assert result.exit_code == 2 and "records no reference spectrum" in result.output
    assert "Traceback" not in result.output and not out.exists()

    net, model_card = load_model(model)
    matched = tmp_path / "matched.pt"
    save_model(matched, net, {**model_card, "spectrum_reference": reference_profile([volume]),
                              "match_spectrum": True})
    result = run("localize", tmp_path / "TS_01.mrc", "--model", matched, "-o", out, "-v")
    assert result.exit_code == 0, result.output
    assert "amplitude spectrum matched" in result.output
    assert_centres(read_particles(out), CENTRES)  # matched to its own spectrum: the same particles
    assert json.loads((tmp_path / "m.csv.json").read_text())["parameters"]["match_spectrum"] is None
    result = run("localize", tmp_path / "TS_01.mrc", "--model", matched, "-o", out, "-v", "--overwrite",
                 "--no-match-spectrum")
    assert result.exit_code == 0 and "amplitude spectrum matched" not in result.output
    assert "matched by default" in run("info", matched).output

    save_model(tmp_path / "bad.pt", net, {**model_card, "spectrum_reference": [1.0, "x"]})
    result = run("localize", tmp_path / "TS_01.mrc", "--model", tmp_path / "bad.pt", "-o", tmp_path / "b.csv")
    assert result.exit_code == 2 and "spectrum_reference must be a list" in result.output


def test_drop_gold_removes_the_bead_pick_and_records_it(tmp_path, rng):
    volume = scene(rng)
    z, y, x = np.indices(SHAPE)
    volume[(z - 18) ** 2 + (y - 20) ** 2 + (x - 22) ** 2 <= 9] = 20.0  # a gold bead among 4 particles
    write_mrc(tmp_path / "TS_01.mrc", volume, voxel_size=10.0)
    model = intensity_localizer(tmp_path / "localizer.pt", volume)
    kept, dropped = tmp_path / "kept.csv", tmp_path / "dropped.csv"
    result = run("localize", tmp_path / "TS_01.mrc", "--model", model, "-o", kept, "--bandwidth", 4)
    assert result.exit_code == 0, result.output
    assert_centres(read_particles(kept), CENTRES + [(18.0, 20.0, 22.0)])
    result = run("localize", tmp_path / "TS_01.mrc", "--model", model, "-o", dropped, "--bandwidth", 4,
                 "--drop-gold")
    assert result.exit_code == 0, result.output
    assert_centres(read_particles(dropped), CENTRES)
    record = json.loads((tmp_path / "dropped.csv.json").read_text())
    assert record["result"]["postprocess"]["drop_gold"] is True


def test_a_card_that_drops_gold_drops_it_by_default_and_keep_gold_keeps_it(tmp_path, rng):
    from vpdetect import api
    from vpdetect.io.particles import ParticleTable
    from vpdetect.nn.checkpoint import format_model_card, load_model, save_model

    volume = scene(rng)
    z, y, x = np.indices(SHAPE)
    volume[(z - 18) ** 2 + (y - 20) ** 2 + (x - 22) ** 2 <= 9] = 20.0
    net, model_card = load_model(intensity_localizer(tmp_path / "plain.pt", volume))
    save_model(tmp_path / "drops.pt", net, {**model_card, "drop_gold": True})
    assert "picks on gold beads: dropped by default" in format_model_card(load_model(tmp_path / "drops.pt")[1])
    by_card = api.localize(volume, tmp_path / "drops.pt", voxel_size=10.0, bandwidth=4)
    assert_centres(ParticleTable(by_card), CENTRES)
    kept = api.localize(volume, tmp_path / "drops.pt", voxel_size=10.0, bandwidth=4, drop_gold=False)
    assert_centres(ParticleTable(kept), CENTRES + [(18.0, 20.0, 22.0)])
    # On a tomogram resampled to the model's voxel size, the beads are found on the model grid.
    resampled = api.localize(volume, tmp_path / "drops.pt", voxel_size=8.0, bandwidth=4)
    assert len(resampled) == len(CENTRES)
    # At high SNR the particles pass the beads' |z| level too; only the gold, far stronger, goes.
    quiet = np.where(volume == 20.0, 20.0, np.where(volume > 0.5, 1.0, volume * 0.1)).astype(np.float32)
    by_card = api.localize(quiet, tmp_path / "drops.pt", voxel_size=10.0, bandwidth=4)
    assert_centres(ParticleTable(by_card), CENTRES)

