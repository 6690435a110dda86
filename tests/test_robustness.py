"""The robustness matrix: bad input of every kind, fed through the real CLI.

Each case must end in one line `error: ...` naming the problem, exit code 2,
no traceback, no output file and no temporary file left behind. Models are
tiny random-weight MSDNets; tomograms are 24^3 noise.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vpdetect.cli  # noqa: F401  registers the commands
from vpdetect.cli.app import app
from vpdetect.io.mrc import write_mrc
from vpdetect.nn.checkpoint import save_model
from vpdetect.nn.msdnet import MSDNet

SHAPE = (24, 24, 24)
CROP = 8  # the localizer refuses tomograms thinner than its training crop
TRAIN_ARGS = (
    "--radius", "2", "--radius-unit", "voxel", "--epochs", "1", "--steps-per-epoch", "1",
    "--crop-size", "8", "--depth", "2", "--width", "1", "--batch-size", "1", "--val-crops", "1",
    "--device", "cpu",
)


def tiny_model(path: Path, stage: str, n_classes: int) -> Path:
    torch.manual_seed(0)
    net = MSDNet(in_channels=1, n_classes=n_classes, width=1, depth=2, max_dilation=2)
    names = ["background", *(f"class{i}" for i in range(1, n_classes))]
    save_model(path, net, {"stage": stage, "class_names": names, "crop_size": CROP, "voxel_size": 10.0})
    return path


@pytest.fixture
def kit(tmp_path):
    """Models, a good tomogram, a table of two particles in it and a SHREC truth folder."""
    rng = np.random.default_rng(7)
    volume = rng.normal(size=SHAPE).astype(np.float32)
    write_mrc(tmp_path / "tomo.mrc", volume, voxel_size=10.0)
    (tmp_path / "coords.csv").write_text("x,y,z,class_name\n10,10,10,a\n5,6,7,a\n")
    truth = tmp_path / "truth"
    truth.mkdir()
    occupancy = np.zeros(SHAPE, np.int16)
    occupancy[9:12, 9:12, 9:12] = 1
    write_mrc(truth / "occupancy_mask.mrc", occupancy)
    (truth / "particle_locations.txt").write_text("a 10 10 10 0 0 0\n")
    out = tmp_path / "out"
    out.mkdir()
    return {
        "dir": tmp_path, "out": out, "tomo": tmp_path / "tomo.mrc", "table": tmp_path / "coords.csv",
        "truth": truth, "volume": volume,
        "localizer": tiny_model(tmp_path / "localizer.pt", "localizer", 2),
        "classifier": tiny_model(tmp_path / "classifier.pt", "classifier", 3),
    }


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def leftovers(folder: Path) -> list[str]:
    """Files anywhere below `folder` (outputs, sidecars, temporary files)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_clean_failure(result, expected: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback escaped
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.output
    assert errors[0].startswith("error: ") and expected.lower() in errors[0].lower(), result.output
    assert leftovers(out) == [], leftovers(out)


# --------------------------------------------------------------------------- bad tomograms


def write_bad_tomogram(path: Path, kind: str, volume: np.ndarray) -> None:
    if kind == "truncated":
        write_mrc(path, volume)
        data = path.read_bytes()
        path.write_bytes(data[: 1024 + (len(data) - 1024) // 2])
    elif kind == "complex mode 4":
        with mrcfile.new(path, overwrite=True) as handle:
            handle.set_data((volume + 1j * volume).astype(np.complex64))
    elif kind == "nan":
        bad = volume.copy()
        bad[3, 4, 5] = np.nan
        write_mrc(path, bad)
    elif kind == "inf":
        bad = volume.copy()
        bad[3, 4, 5] = -np.inf
        write_mrc(path, bad)
    elif kind == "all zero":
        write_mrc(path, np.zeros_like(volume))
    elif kind == "2d image":
        with mrcfile.new(path, overwrite=True) as handle:
            handle.set_data(volume[0])
    elif kind == "not mrc":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        raise AssertionError(kind)


BAD_TOMOGRAMS = {
    "truncated": "is truncated",
    "complex mode 4": "unsupported MRC mode 4",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "all zero": "constant value",
    "2d image": "expected a 3D volume",
    "not mrc": "not an MRC file",
}


def command_on_tomogram(command: str, kit, tomo: Path) -> list:
    out = kit["out"]
    if command == "localize":
        return ["localize", tomo, "-m", kit["localizer"], "-o", out / "t.star", "--device", "cpu"]
    if command == "pick":
        return ["pick", tomo, "--localizer", kit["localizer"], "--classifier", kit["classifier"],
                "--output-dir", out, "--device", "cpu"]
    if command == "classify":
        return ["classify", kit["table"], "-t", tomo, "-m", kit["classifier"], "-d", out, "--device", "cpu"]
    if command == "train":
        return ["train", "localizer", "--tomogram", tomo, "--table", kit["table"], "--out", out / "m.pt",
                *TRAIN_ARGS]
    raise AssertionError(command)


@pytest.mark.filterwarnings("ignore:Data array contains", "ignore:invalid value encountered")
@pytest.mark.parametrize("kind", sorted(BAD_TOMOGRAMS))
@pytest.mark.parametrize("command", ["localize", "pick", "classify", "train"])
def test_bad_tomograms(kit, command, kind):
    tomo = kit["dir"] / "bad.mrc"
    write_bad_tomogram(tomo, kind, kit["volume"])
    result = run(*command_on_tomogram(command, kit, tomo))
    assert_clean_failure(result, BAD_TOMOGRAMS[kind], kit["out"])


# train's option range already refuses negative sizes in its usage message.
@pytest.mark.parametrize("command,pixel_size", [
    *[(command, size) for command in ("localize", "pick", "classify") for size in ("0", "-3", "nan")],
    ("train", "0"),
])
def test_a_voxel_size_that_is_not_positive_is_refused(kit, command, pixel_size):
    # Not taken as "no voxel size": a zero or negative size would resample the tomogram to nothing.
    result = run(*command_on_tomogram(command, kit, kit["tomo"]), "--pixel-size", pixel_size)
    assert_clean_failure(result, "must be a positive number", kit["out"])


@pytest.mark.parametrize("kind", ["truncated", "complex mode 4", "2d image", "not mrc"])
def test_bad_occupancy_mask_for_evaluate(kit, kind):
    write_bad_tomogram(kit["truth"] / "occupancy_mask.mrc", kind, kit["volume"])
    result = run("evaluate", kit["table"], "--truth", kit["truth"], "--json", kit["out"] / "m.json")
    assert_clean_failure(result, BAD_TOMOGRAMS[kind], kit["out"])


def test_convert_with_a_tomogram_that_is_not_mrc(kit):
    # convert reads only the header (size, voxel size): a file without one is refused.
    write_bad_tomogram(kit["dir"] / "bad.mrc", "not mrc", kit["volume"])
    result = run("convert", kit["table"], kit["out"] / "r5.star", "--to", "relion5",
                 "--tomogram", kit["dir"] / "bad.mrc")
    assert_clean_failure(result, "not an MRC file", kit["out"])


@pytest.mark.parametrize("command", ["localize", "pick"])
def test_volume_smaller_than_the_network_needs(kit, command):
    write_mrc(kit["dir"] / "small.mrc", kit["volume"][:5, :12, :12])
    result = run(*command_on_tomogram(command, kit, kit["dir"] / "small.mrc"))
    assert_clean_failure(result, f"needs at least {CROP} along each axis", kit["out"])


def test_volume_smaller_than_one_tile_still_works(kit):
    # 24^3 is far below the default 128^3 tile: one clipped tile covers it.
    result = run("localize", kit["tomo"], "-m", kit["localizer"], "-o", kit["out"] / "t.csv", "--tile", "64")
    assert result.exit_code == 0, result.output
    assert leftovers(kit["out"]) == ["t.csv", "t.csv.json"]


# --------------------------------------------------------------------------- bad tables


@pytest.mark.parametrize("command", ["classify", "convert", "evaluate", "train"])
@pytest.mark.parametrize(
    "name,text,expected",
    [
        ("nocoords.star", "data_particles\n\nloop_\n_rlnTomoName #1\n_rlnAngleRot #2\nTS 1\n",
         "no particle coordinates"),
        ("nan.csv", "x,y,z\n1,2,3\nnan,2,3\n", "row 2 is not a number"),
        ("binary.txt", "\x00\xff\xfe garbage", "not a UTF-8 text file"),
        # A data block the parser cannot split (escapes written literally by a shell's echo).
        ("oneline.star", "data_\\nloop_\\n_rlnCoordinateX\\n", "malformed STAR syntax"),
    ],
)
def test_bad_tables(kit, command, name, text, expected):
    table = kit["dir"] / name
    table.write_bytes(text.encode("latin-1"))
    out = kit["out"]
    args = {
        "classify": ["classify", table, "-t", kit["tomo"], "-m", kit["classifier"], "-d", out],
        "convert": ["convert", table, out / "converted.csv"],
        "evaluate": ["evaluate", table, "--truth", kit["truth"], "--json", out / "m.json"],
        "train": ["train", "localizer", "--tomogram", kit["tomo"], "--table", table, "--out", out / "m.pt",
                  *TRAIN_ARGS],
    }[command]
    assert_clean_failure(run(*args), expected, out)


def test_coordinates_outside_the_volume_are_skipped_and_counted(kit):
    from vpdetect.io.particles import read_particles

    table = kit["dir"] / "mixed.csv"
    table.write_text("x,y,z\n10,10,10\n30,1,1\n5,6,7\n-2,3,3\n")
    result = run("classify", table, "-t", kit["tomo"], "-m", kit["classifier"], "-d", kit["out"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "2 of 4 coordinates lie outside" in warning[0] and "skipped" in warning[0]
    classified = read_particles(kit["out"] / "mixed_classes.csv")
    assert classified.coords_xyz().tolist() == [[10, 10, 10], [5, 6, 7]]
    # the count also lands in the provenance record
    import json

    record = json.loads((kit["out"] / "mixed_classes.csv.json").read_text())
    assert record["result"]["n_particles"] == 2 and record["result"]["n_skipped"] == 2

    table.write_text("x,y,z\n30,1,1\n-2,3,3\n")
    (kit["out"] / "mixed_classes.csv").unlink()
    (kit["out"] / "mixed_classes.csv.json").unlink()
    everything_outside = run("classify", table, "-t", kit["tomo"], "-m", kit["classifier"], "-d", kit["out"])
    assert_clean_failure(everything_outside, "all 2 coordinates lie outside", kit["out"])


# --------------------------------------------------------------------------- bad models


def corrupt_model(kit, how: str, stage: str) -> Path:
    path = kit["dir"] / f"bad_{stage}.pt"
    if how == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(4000))
    elif how == "truncated":
        data = kit[stage].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "wrong stage":
        other = "classifier" if stage == "localizer" else "localizer"
        path.write_bytes(kit[other].read_bytes())
    return path


MODEL_ERRORS = {"random bytes": "not a vpdetect model file", "truncated": "not a vpdetect model file",
                "wrong stage": "model is needed here"}


@pytest.mark.parametrize(
    "command,stage,how",
    [
        (command, stage, how)
        for command, stage in [("localize", "localizer"), ("classify", "classifier"), ("pick", "localizer"),
                               ("pick", "classifier"), ("info", "localizer")]
        for how in sorted(MODEL_ERRORS)
        if not (command == "info" and how == "wrong stage")  # info shows a model of either stage
    ],
)
def test_bad_models(kit, command, stage, how):
    model = corrupt_model(kit, how, stage)
    out = kit["out"]
    args = {
        "localize": ["localize", kit["tomo"], "-m", model, "-d", out],
        "classify": ["classify", kit["table"], "-t", kit["tomo"], "-m", model, "-d", out],
        "pick": ["pick", kit["tomo"], "--localizer", model if stage == "localizer" else kit["localizer"],
                 "--classifier", model if stage == "classifier" else kit["classifier"], "-d", out],
        "info": ["info", model],
    }[command]
    result = run(*args)
    assert_clean_failure(result, MODEL_ERRORS[how], out)
    assert str(model) in result.output  # the message names the file


@pytest.mark.parametrize("how", sorted(MODEL_ERRORS))
def test_train_resume_from_a_bad_checkpoint(kit, how):
    out = kit["out"] / "m.pt"
    # `--resume` reads MODEL.last.pt: make it a localizer (for "wrong stage": train a classifier).
    (kit["out"] / "m.last.pt").write_bytes(corrupt_model(kit, how, "localizer").read_bytes()
                                           if how != "wrong stage" else kit["localizer"].read_bytes())
    stage = "classifier" if how == "wrong stage" else "localizer"
    result = run("train", stage, "--tomogram", kit["tomo"], "--table", kit["table"], "--out", out,
                 "--resume", *TRAIN_ARGS)
    assert result.exit_code == 2, result.output
    expected = "is a localizer model, but a classifier model is needed" if how == "wrong stage" else (
        "not a vpdetect model file")
    assert expected in result.output and "Traceback" not in result.output
    assert leftovers(kit["out"]) == ["m.last.pt"]  # nothing new was written


# --------------------------------------------------------------------------- unwritable outputs


def output_commands(kit, where: Path, directory: bool) -> dict[str, list]:
    target = (["-d", where] if directory else ["-o", where / "x.star"])
    return {
        "localize": ["localize", kit["tomo"], "-m", kit["localizer"], *target],
        "pick": ["pick", kit["tomo"], "--localizer", kit["localizer"], "--classifier", kit["classifier"],
                 *target],
        "classify": ["classify", kit["table"], "-t", kit["tomo"], "-m", kit["classifier"], *target],
        "convert": ["convert", kit["table"], where / "x.star"],
        "evaluate": ["evaluate", kit["table"], "--truth", kit["truth"], "--json", where / "m.json"],
        "train": ["train", "localizer", "--tomogram", kit["tomo"], "--table", kit["table"],
                  "--out", where / "m.pt", *TRAIN_ARGS],
    }


@pytest.mark.parametrize("directory", [False, True], ids=["file", "folder"])
@pytest.mark.parametrize("command", ["localize", "pick", "classify", "convert", "evaluate", "train"])
def test_output_folder_that_cannot_exist(kit, command, directory):
    # A path below a regular file cannot be created, even by root (chmod would not stop root).
    blocker = kit["out"] / "blocker"
    blocker.write_text("a file, not a folder")
    args = output_commands(kit, blocker / "sub", directory)[command]
    result = run(*args)
    assert_clean_failure_except(result, "blocker is a file", kit["out"], keep=["blocker"])


def assert_clean_failure_except(result, expected: str, out: Path, keep: list[str]) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], result.output
    assert leftovers(out) == keep


@pytest.mark.parametrize("command", ["localize", "convert", "train"])
def test_folder_without_write_permission(kit, monkeypatch, command):
    # Root may write anywhere, so the permission answer is simulated; the real case is below.
    import vpdetect.io.atomic

    locked = kit["out"] / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        vpdetect.io.atomic.os, "access",
        lambda path, mode, **kw: False if Path(path) == locked and mode & os.W_OK else real_access(path, mode, **kw),
    )
    args = output_commands(kit, locked, directory=command == "localize")[command]
    assert_clean_failure_except(run(*args), "not writable", kit["out"], keep=[])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(kit):
    locked = kit["out"] / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run("localize", kit["tomo"], "-m", kit["localizer"], "-d", locked)
        assert result.exit_code == 2 and "not writable" in result.output
        assert leftovers(locked) == []
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------- a write error half-way


def half_then_fail(write, path_argument: int = 1):
    """A stand-in for a writer: writes the file, cuts it to half its size, then fails like a full disk."""

    def failing(*args, **kwargs):
        write(*args, **kwargs)
        path = Path(args[path_argument])
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return failing


@pytest.mark.parametrize(
    "command,writer",
    [("localize", "star"), ("localize", "map"), ("pick", "star"), ("pick", "csv"), ("classify", "star"),
     ("classify", "csv"), ("convert", "star"), ("convert", "csv"), ("evaluate", "json"), ("train", "model")],
)
def test_write_error_half_way_leaves_nothing(kit, monkeypatch, command, writer):
    import pandas as pd
    import starfile

    if writer == "star":
        monkeypatch.setattr(starfile, "write", half_then_fail(starfile.write))
    elif writer == "csv":
        monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail(pd.DataFrame.to_csv))
    elif writer == "map":
        monkeypatch.setattr(mrcfile, "new", _mrc_new_failing_half_way(mrcfile.new))
    elif writer == "json":
        monkeypatch.setattr(Path, "write_text", half_then_fail(Path.write_text, path_argument=0))
    elif writer == "model":
        monkeypatch.setattr(torch, "save", half_then_fail(torch.save))
    out = kit["out"]
    suffix = ".csv" if writer == "csv" else ".star"
    args = {
        "localize": ["localize", kit["tomo"], "-m", kit["localizer"], "-o", out / "t.star",
                     *(["--save-map", out / "map.mrc"] if writer == "map" else [])],
        "pick": ["pick", kit["tomo"], "--localizer", kit["localizer"], "--classifier", kit["classifier"],
                 "-o", out / f"t{suffix}"],
        "classify": ["classify", kit["table"], "-t", kit["tomo"], "-m", kit["classifier"], "-o", out / f"t{suffix}"],
        "convert": ["convert", kit["table"], out / f"t{suffix}"],
        "evaluate": ["evaluate", kit["table"], "--truth", kit["truth"], "--json", out / "m.json"],
        "train": ["train", "localizer", "--tomogram", kit["tomo"], "--table", kit["table"],
                  "--out", out / "m.pt", *TRAIN_ARGS],
    }[command]
    assert_clean_failure(run(*args), "No space left on device", out)


def _mrc_new_failing_half_way(new):
    def failing(path, *args, **kwargs):
        handle = new(path, *args, **kwargs)
        handle.close()
        Path(path).write_bytes(b"\0" * 512)  # a header cut short
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    return failing


def test_a_failed_sidecar_removes_its_output(kit, monkeypatch):
    from vpdetect.cli import outputs, pool

    def no_space(output, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(outputs.sidecar_path(output)))

    monkeypatch.setattr(pool, "write_sidecar", no_space)
    result = run("localize", kit["tomo"], "-m", kit["localizer"], "-o", kit["out"] / "t.star")
    # the table was whole, but without its record it is not a finished result
    assert_clean_failure(result, "No space left on device", kit["out"])



@pytest.mark.parametrize("command", ["localize", "pick"])
def test_mask_of_another_shape(kit, command):
    write_mrc(kit["dir"] / "mask.mrc", np.ones((24, 24, 20), np.int8))
    result = run(*command_on_tomogram(command, kit, kit["tomo"]), "--mask", kit["dir"] / "mask.mrc")
    assert_clean_failure(result, "mask mask.mrc is 20x24x24 voxels (x, y, z) but the tomogram is 24x24x24",
                         kit["out"])


@pytest.mark.parametrize("command", ["localize", "pick"])
def test_an_all_zero_mask_is_refused(kit, command):
    write_mrc(kit["dir"] / "mask.mrc", np.zeros((24, 24, 24), np.int8))
    result = run(*command_on_tomogram(command, kit, kit["tomo"]), "--mask", kit["dir"] / "mask.mrc")
    assert_clean_failure(result, "mask mask.mrc selects no voxel", kit["out"])


def test_an_output_of_unknown_format_is_refused_before_the_network_runs(kit, monkeypatch):
    import vpdetect.localize.pipeline as pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("the network ran for an output that cannot be written")

    monkeypatch.setattr(pipeline, "segment_volume", must_not_run)
    result = run("localize", kit["tomo"], "-m", kit["localizer"], "-o", kit["out"] / "picks.xyz")
    assert_clean_failure(result, "cannot tell the output format of picks.xyz", kit["out"])


@pytest.mark.parametrize("message,expected", [
    ("Unable to allocate 36.4 TiB for an array with shape (1000, 100000, 100000)", "Unable to allocate 36.4 TiB"),
    ("", "an allocation failed"),  # torch and plain Python raise it without a message
])
def test_running_out_of_memory_is_one_line(kit, monkeypatch, message, expected):
    import vpdetect.simulate.pipeline as pipeline

    def too_big(*args, **kwargs):
        raise MemoryError(message)

    monkeypatch.setattr(pipeline, "simulate_tomogram", too_big)
    result = run("simulate", kit["out"] / "sim", "--shape", "100000", "100000", "1000")
    assert_clean_failure(result, f"out of memory: {expected}", kit["out"])
