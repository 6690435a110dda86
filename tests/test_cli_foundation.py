"""The CLI foundation: --help speed and imports, --version, info, convert, evaluate and their errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import vpdetect
import vpdetect.cli  # noqa: F401  registers the commands
from vpdetect.cli import app
from vpdetect.io.mrc import write_mrc
from vpdetect.io.particles import ParticleTable, read_particles, write_particles

HEAVY_MODULES = ("torch", "scipy", "pandas", "matplotlib", "starfile", "sklearn", "skimage")

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def truth_dir(tmp_path) -> Path:
    """A 16 x 12 x 8 (x, y, z) SHREC folder: particle 1 (1s3x) at (3, 3, 3), 2 (5mrc) at (10, 8, 4)."""
    folder = tmp_path / "model_0"
    folder.mkdir()
    occupancy = np.zeros((8, 12, 16), dtype=np.int16)
    occupancy[2:5, 2:5, 2:5] = 1
    occupancy[3:6, 7:10, 9:12] = 2
    write_mrc(folder / "occupancy_mask.mrc", occupancy, voxel_size=10.0)
    write_particles(
        folder / "particle_locations.txt",
        ParticleTable.from_arrays([(3, 3, 3), (10, 8, 4)], class_name=["1s3x", "5mrc"]),
    )
    return folder


@pytest.fixture
def picks(tmp_path) -> Path:
    path = tmp_path / "picks.csv"
    write_particles(
        path,
        ParticleTable.from_arrays(
            [(3.2, 3, 3), (10, 8, 4.4), (14, 1, 1)], class_name=["1S3X", "1s3x", "5mrc"], score=[0.9, 0.8, 0.1]
        ),
    )
    return path


# --------------------------------------------------------------------------- help, version, imports


def test_importing_the_cli_loads_no_heavy_library():
    code = f"import sys, vpdetect.cli; print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_help_loads_no_heavy_library():
    # What keeps `vpdetect --help` instant: answering it imports none of torch, scipy, pandas
    # (checked at exit, after the help was printed; a wall-clock limit would fail on a loaded machine).
    code = (
        "import atexit, sys; "
        f"atexit.register(lambda: print('HEAVY:' + ','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules), "
        "file=sys.stderr)); "
        "from vpdetect.cli import main; sys.argv = ['vpdetect', '--help']; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "evaluate" in done.stdout and "convert" in done.stdout
    assert "HEAVY:\n" in done.stderr or done.stderr.strip().endswith("HEAVY:"), done.stderr


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"vpdetect {vpdetect.__version__}"


def test_info_on_a_tomogram(tmp_path):
    volume = np.arange(8 * 12 * 16, dtype=np.float32).reshape(8, 12, 16)
    write_mrc(tmp_path / "tomo.mrc", volume, voxel_size=13.5)
    result = invoke("info", tmp_path / "tomo.mrc")
    assert result.exit_code == 0, result.output
    assert "16 x 12 x 8" in result.output and "13.500 A" in result.output
    assert "0 / 1535" in result.output  # min / max


@pytest.mark.parametrize("stage", ["localizer", "classifier"])
def test_info_on_the_bundled_models(stage):
    """The bundled cards hold what `train` and `tune` write today (the localizer's bandwidth
    as a multiple of the measured particle radius); `info` must describe them."""
    model = Path(vpdetect.__file__).parent / "models" / f"{stage}.pt"
    result = invoke("info", model)
    assert result.exit_code == 0, result.output
    assert f"vpdetect {stage} model" in result.output
    if stage == "localizer":
        text = " ".join(result.output.split())  # rich wraps long lines
        assert "x the measured particle radius" in text and "x the bandwidth" in text


# --------------------------------------------------------------------------- convert


def test_convert_shrec_to_relion5_with_tomogram(tmp_path):
    write_mrc(tmp_path / "TS_03.mrc", np.zeros((8, 12, 16), dtype=np.float32), voxel_size=10.0)
    source = tmp_path / "particle_locations.txt"
    source.write_text("1s3x 8 6 4 10 20 30\n5mrc 0 0 0 0 0 0\n")
    out = tmp_path / "picks.star"
    result = invoke("convert", source, out, "--to", "relion5", "--tomogram", tmp_path / "TS_03.mrc")
    assert result.exit_code == 0, result.output
    assert "wrote 2 particles" in result.output
    text = out.read_text()
    assert "_rlnCenteredCoordinateXAngst" in text and "TS_03" in text
    back = read_particles(out)
    assert back.voxel_size == 10.0 and back.tomo_size == (16, 12, 8)
    np.testing.assert_allclose(back.coords_xyz(), [[8, 6, 4], [0, 0, 0]], atol=1e-6)
    # The centre voxel (size / 2) is the origin of the centred coordinates.
    import starfile

    particles = starfile.read(out, always_dict=True)["particles"]
    np.testing.assert_allclose(particles.iloc[0][["rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst",
                                                   "rlnCenteredCoordinateZAngst"]].astype(float), [0, 0, 0])


def test_convert_star_to_csv_by_extension_and_tomo_size(tmp_path):
    source = tmp_path / "in.star"
    write_particles(source, ParticleTable.from_arrays([(1, 2, 3)], score=[0.5]), fmt="relion4")
    out = tmp_path / "out.csv"
    assert invoke("convert", source, out).exit_code == 0
    assert out.read_text().splitlines()[0].startswith("x,y,z")
    result = invoke("convert", source, tmp_path / "r5.star", "--to", "relion5",
                    "--tomo-size", 10, 10, 10, "--pixel-size", 2.0)
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(read_particles(tmp_path / "r5.star").coords_xyz(), [[1, 2, 3]])


def test_convert_errors_leave_no_output(tmp_path):
    out = tmp_path / "out.csv"
    assert_one_line_error(invoke("convert", tmp_path / "absent.star", out), "file not found")
    nocoords = tmp_path / "nocoords.star"
    nocoords.write_text("data_particles\n\nloop_\n_rlnTomoName\n_rlnAngleRot\nTS_1 10\n")
    assert_one_line_error(invoke("convert", nocoords, out), "no particle coordinates")
    good = tmp_path / "good.csv"
    good.write_text("x,y,z\n1,2,3\n")
    assert_one_line_error(invoke("convert", good, tmp_path / "r5.star", "--to", "relion5"), "RELION 5")
    assert_one_line_error(
        invoke("convert", good, out, "--tomogram", good, "--tomo-size", 1, 2, 3), "not both"
    )
    assert_one_line_error(invoke("convert", good, tmp_path / "x.star", "--to", "pytom"), "unknown particle format")
    assert_one_line_error(invoke("convert", good, tmp_path / "missing" / "o.csv"), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.csv", "nocoords.star"]


# --------------------------------------------------------------------------- evaluate


def test_evaluate_writes_json_and_plot(tmp_path, truth_dir, picks):
    json_path, png_path = tmp_path / "metrics.json", tmp_path / "confusion.png"
    result = invoke("evaluate", picks, "--truth", truth_dir, "--json", json_path, "--plot", png_path)
    assert result.exit_code == 0, result.output
    assert "Localization" in result.output and "F1" in result.output
    metrics = json.loads(json_path.read_text())
    loc = metrics["localization"]
    # Two particles, both hit once; (14, 1, 1) is background.
    assert {k: loc[k] for k in ("RR", "TP", "FP", "FN", "MH", "RO")} == {
        "RR": 3, "TP": 2, "FP": 1, "FN": 0, "MH": 0, "RO": 0}
    assert set(loc) >= {"RR", "TP", "FP", "FN", "MH", "RO", "AD", "precision", "recall", "miss_rate", "f1"}
    assert loc["AD"] == 0.0  # from the rounded voxels (3, 3, 3) and (10, 8, 4), as the official script
    assert loc["precision"] == pytest.approx(2 / 3) and loc["recall"] == 1.0
    cls = metrics["classification"]
    assert cls["per_class"]["1s3x"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "n_true": 1}
    assert cls["per_class"]["5mrc"]["f1"] == 0.0
    assert cls["confusion"] == {"labels": ["1s3x", "5mrc", "background"],
                                "matrix": [[1, 0, 0], [1, 0, 0], [0, 0, 0]]}
    assert cls["size_groups"]["small"]["f1"] == pytest.approx(2 / 3)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_context_classes_are_not_scored(tmp_path, truth_dir, picks):
    json_path = tmp_path / "metrics.json"
    result = invoke("evaluate", picks, "--truth", truth_dir, "--json", json_path, "--context", "5MRC")
    assert result.exit_code == 0, result.output
    assert "context, not scored: 5MRC" in result.output
    metrics = json.loads(json_path.read_text())
    loc = metrics["localization"]
    # The 5mrc particle is context now: the pick on it (labelled 1s3x) is a false positive, it is not
    # counted, and the background pick labelled 5mrc is dropped.
    assert (loc["RR"], loc["n_particles"], loc["TP"], loc["FP"], loc["FN"]) == (2, 1, 1, 1, 0)
    assert metrics["context_classes"] == ["5MRC"]
    invoke("evaluate", picks, "--truth", truth_dir, "--json", json_path)
    assert json.loads(json_path.read_text())["context_classes"] == ["vesicle"]


def test_evaluate_error_cases_exit_2_without_output(tmp_path, truth_dir, picks):
    json_path = tmp_path / "metrics.json"

    def check(result, *fragments):
        assert_one_line_error(result, *fragments)
        assert not json_path.exists()

    check(invoke("evaluate", tmp_path / "absent.csv", "--truth", truth_dir, "--json", json_path),
          "file not found")
    check(invoke("evaluate", picks, "--truth", tmp_path / "nowhere", "--json", json_path), "truth not found")
    nocoords = tmp_path / "nocoords.star"
    nocoords.write_text("data_particles\n\nloop_\n_rlnTomoName\n_rlnAngleRot\nTS_1 10\n")
    check(invoke("evaluate", nocoords, "--truth", truth_dir, "--json", json_path), "no particle coordinates")

    (truth_dir / "particle_locations.txt").rename(tmp_path / "locations.txt")
    check(invoke("evaluate", picks, "--truth", truth_dir, "--json", json_path), "particle_locations.txt")
    (tmp_path / "locations.txt").rename(truth_dir / "particle_locations.txt")

    # A truth list whose coordinates do not fit the mask.
    (truth_dir / "particle_locations.txt").write_text("1s3x 3 3 3\n5mrc 10 30 4\n")
    check(invoke("evaluate", picks, "--truth", truth_dir, "--json", json_path), "outside the occupancy mask")

    # Predictions made for a tomogram of another size than the mask.
    (truth_dir / "particle_locations.txt").write_text("1s3x 3 3 3\n5mrc 10 8 4\n")
    other = tmp_path / "other.star"
    write_particles(other, ParticleTable.from_arrays([(1, 1, 1)], voxel_size=10.0, tomo_size=(16, 12, 9)),
                    fmt="relion5")
    check(invoke("evaluate", other, "--truth", truth_dir, "--json", json_path), "differs")

    two_tomograms = tmp_path / "two.csv"
    two_tomograms.write_text("x,y,z,tomo_name\n3,3,3,TS_1\n3,3,3,TS_2\n")
    check(invoke("evaluate", two_tomograms, "--truth", truth_dir, "--json", json_path), "match no truth tomogram")

    (truth_dir / "occupancy_mask.mrc").write_bytes(b"not an MRC file at all" * 20)
    check(invoke("evaluate", picks, "--truth", truth_dir, "--json", json_path), "occupancy_mask.mrc")

    (truth_dir / "occupancy_mask.mrc").unlink()
    check(invoke("evaluate", picks, "--truth", truth_dir, "--json", json_path), "no occupancy_mask.mrc")


def test_evaluate_plot_needs_classes(tmp_path, truth_dir):
    plain = tmp_path / "plain.csv"
    plain.write_text("x,y,z\n3,3,3\n")
    png_path, json_path = tmp_path / "c.png", tmp_path / "m.json"
    assert_one_line_error(
        invoke("evaluate", plain, "--truth", truth_dir, "--plot", png_path, "--json", json_path), "class names"
    )
    assert not png_path.exists() and not json_path.exists()
    result = invoke("evaluate", plain, "--truth", truth_dir)
    assert result.exit_code == 0 and "classification not evaluated" in result.output
