"""Typer option factories shared by `localize`, `classify`, `pick` (and `train`, `tune`),
so the same option reads the same in every command."""

from __future__ import annotations

import typer


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
