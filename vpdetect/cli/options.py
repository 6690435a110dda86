"""Typer option factories shared by `localize`, `classify`, `pick` (and `train`, `tune`),
so the same option reads the same in every command, and parsers of option values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import typer

from vpdetect.errors import VPDetectError


def output_dir_option(
    help: str = "Folder for the outputs, one per input named after the tomogram (default: current folder).",
):
    return typer.Option(None, "--output-dir", "-d", help=help)


def overwrite_option():
    return typer.Option(
        False, "--overwrite",
        help="Redo inputs whose output and .json sidecar already exist (default: skip them, so reruns resume).",
    )


def shard_option():
    return typer.Option(
        None, "--shard",
        help="Process only part I of N (0-based, 'I/N') of the sorted inputs; "
        "default from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT.",
    )


def devices_option():
    return typer.Option(
        None, "--devices",
        help="GPUs to use, e.g. '0,1': one worker process per GPU, each taking a share of the inputs.",
    )


def device_option():
    return typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (CUDA when available).")


def verbose_option():
    return typer.Option(False, "--verbose", "-v", help="Log debugging detail.")


def quiet_option():
    return typer.Option(False, "--quiet", "-q", help="Only warnings and errors; no progress bars.")


def log_file_option():
    return typer.Option(None, "--log-file", help="Also append a timestamped log to this file.")


def parse_class_values(specs: Sequence[str], option: str, allow_zero: bool = False) -> tuple[float | None, dict[str, float]]:
    """Values of a repeatable `NAME=VALUE` option (a bare VALUE for every class) -> (default, {name: value}).

    Values must be positive (or zero too with `allow_zero`)."""
    default: float | None = None
    per_class: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or (sep and not name.strip()):
            raise VPDetectError(f"{option} expects NAME=VALUE or VALUE, got {spec!r}")
        if number < 0 or (number == 0 and not allow_zero):
            raise VPDetectError(f"{option} values must be {'>= 0' if allow_zero else 'positive'}, got {spec!r}")
        if sep:
            per_class[name.strip()] = number
        else:
            default = number
    return default, per_class
