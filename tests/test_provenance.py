"""Provenance sidecars and logging options of `localize`, `classify` and `pick`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer.main
from test_robustness import kit, run  # noqa: F401  (kit is a fixture)

import vpdetect.cli  # noqa: F401  registers the commands
from vpdetect import __version__
from vpdetect.cli.app import app
from vpdetect.cli.batch import file_sha256

# Options that steer the run rather than the result: where inputs and outputs are,
# which part of a batch, how much is said. Models are recorded under "models".
NOT_PARAMETERS = {"tomograms", "tables", "output", "output_dir", "overwrite", "shard", "devices",
                  "verbose", "quiet", "log_file", "model", "localizer", "classifier"}
# Option name -> where the sidecar keeps it, where the names differ.
RECORDED_AS = {"output_format": "format", "box_batch_size": "classify.batch_size",
               "search_radius": "search_radius", "drop_unknown": "drop_unknown",
               "test_time_flips": "flips", "localizer_flips": "flips"}
# In pick, the top-level options are the localizer's: the classifier's flips are in its group.
RECORDED_IN_PICK = {**RECORDED_AS, "test_time_flips": "classify.flips"}


def command_args(files: dict, command: str, out_dir, *extra):
    if command == "localize":
        return ["localize", files["tomo"], "-m", files["localizer"], "-d", out_dir, *extra]
    if command == "pick":
        return ["pick", files["tomo"], "--localizer", files["localizer"], "--classifier", files["classifier"],
                "-d", out_dir, "--min-size", "2", *extra]
    return ["classify", files["table"], "-t", files["tomo"], "-m", files["classifier"], "-d", out_dir, *extra]


def output_name(command: str) -> str:
    return "coords_classes.csv" if command == "classify" else "tomo.star"


def lookup(record: dict, name: str):
    """A parameter from the sidecar: top level, or inside a stage's group (pick's `classify`)."""
    parameters = record["parameters"]
    if "." in name:
        group, key = name.split(".")
        return parameters[group][key]
    if name in parameters:
        return parameters[name]
    if name == "device":
        return record["device"]
    for group in parameters.values():
        if isinstance(group, dict) and name in group:
            return group[name]
    raise KeyError(name)


@pytest.mark.parametrize("command", ["localize", "classify", "pick"])
def test_sidecar_records_version_models_parameters_and_input(kit, command):  # noqa: F811
    out = kit["out"]
    result = run(*command_args(kit, command, out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / (output_name(command) + ".json")).read_text())
    assert record["vpdetect_version"] == __version__ and record["command"] == command
    stages = {"localize": ["localizer"], "classify": ["classifier"], "pick": ["localizer", "classifier"]}[command]
    assert sorted(record["models"]) == sorted(stages)
    for stage in stages:
        assert record["models"][stage]["sha256"] == file_sha256(kit[stage])
    source = kit["table"] if command == "classify" else kit["tomo"]
    assert record["input"] == {"path": str(source.resolve()), "sha256": file_sha256(source),
                               "bytes": source.stat().st_size}
    if command == "classify":  # the tomogram is an input too
        assert record["result"]["tomograms"] == [{"path": str(kit["tomo"].resolve()),
                                                  "sha256": file_sha256(kit["tomo"])}]
    assert record["output"] == str((out / output_name(command)).resolve())
    # Every option that can change the result is recorded with the value used.
    # Values given on the command line above, or resolved from "auto"/None by the command:
    used = {"device": "cpu", "output_format": None if command == "classify" else "relion4",
            "tomogram": str(kit["tomo"])}
    if command == "pick":
        used["min_size"] = 2
    click_command = typer.main.get_command(app).commands[command]
    checked = 0
    for param in click_command.params:
        if param.name in NOT_PARAMETERS:
            continue
        value = lookup(record, RECORDED_AS.get(param.name, param.name))
        expected = used.get(param.name, param.default)
        assert value == (list(expected) if isinstance(expected, tuple) else expected), param.name
        checked += 1
    assert checked == {"localize": 38, "classify": 13, "pick": 41}[command], checked
    assert record["result"]["n_particles"] >= 0


def test_sidecar_records_values_given_on_the_command_line(kit):  # noqa: F811
    out = kit["out"]
    result = run(*command_args(kit, "localize", out, "--threshold", "0.25", "--z-range", "2", "20",
                               "--tile", "16", "--format", "csv"))
    assert result.exit_code == 0, result.output
    parameters = json.loads((out / "tomo.csv.json").read_text())["parameters"]
    assert parameters["threshold"] == 0.25 and parameters["z_range"] == [2, 20]
    assert parameters["tile"] == 16 and parameters["format"] == "csv"


@pytest.mark.parametrize("command", ["localize", "classify", "pick"])
def test_quiet_verbose_and_log_file(kit, command, tmp_path):  # noqa: F811
    log_file = tmp_path / "run.log"
    quiet = run(*command_args(kit, command, kit["out"] / "q", "--quiet", "--log-file", log_file))
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output.strip() == ""  # nothing but warnings and errors on screen
    text = log_file.read_text()
    assert "->" in text and "parameters:" in text  # info and debug lines go to the file
    assert all(line[:4].isdigit() for line in text.splitlines())  # timestamped

    normal = run(*command_args(kit, command, kit["out"] / "n"))
    assert "->" in normal.output and "parameters:" not in normal.output
    verbose = run(*command_args(kit, command, kit["out"] / "v", "--verbose"))
    assert "->" in verbose.output and "parameters:" in verbose.output

    # the log file is appended to, so one file can collect a whole batch's history
    again = run(*command_args(kit, command, kit["out"] / "q", "--quiet", "--log-file", log_file))
    assert again.exit_code == 0 and "skipped" in log_file.read_text()
    assert log_file.read_text().startswith(text)


def test_failures_reach_the_log_file_with_quiet(kit, tmp_path):  # noqa: F811
    log_file = tmp_path / "run.log"
    bad = kit["dir"] / "bad.mrc"
    bad.write_bytes(np.random.default_rng(0).bytes(100))
    result = run("localize", kit["tomo"], bad, "-m", kit["localizer"], "-d", kit["out"], "--quiet",
                 "--log-file", log_file)
    assert result.exit_code == 2
    assert "ERROR" in log_file.read_text() and "bad.mrc" in log_file.read_text()
    assert "1 done, 0 skipped, 1 failed of 2" in result.output  # the summary is a warning: shown
