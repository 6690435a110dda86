"""The batch flow shared by `localize`, `classify` and `pick` (issue 9).

A command builds a *task* `task(input_path, output_path, device) -> dict` that
processes one input and writes its output atomically (returning extra
provenance, e.g. particle counts), then hands everything else to
`run_command_batch`, which strings together one module per concern:

- `cli.inputs`: paths and globs expanded and sorted, and the `--shard i/n` part
  (defaulting from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT);
- `cli.outputs`: `-o OUT` for one input, else `--output-dir/<tomogram name><suffix>`,
  folders checked before any work; complete outputs (output and sidecar) are
  skipped unless `--overwrite`, so a rerun after a kill resumes;
- `cli.pool`: failures isolated per input (what a failed attempt wrote is
  removed), `--devices 0,1` as one spawned worker process per GPU;
- `cli.provenance`: the `<output>.json` sidecar (version, command, parameters,
  models, input, device, sha256s);
- `cli.logs`: `--verbose/--quiet/--log-file` on rich's console; `cli.options`:
  the Typer option factories; `cli.model_cache`: model choice and loading;
  `vpdetect.devices`: `--device`/`--devices` parsing.

The names the commands and tests import from here are re-exported below.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import typer

# Re-exported: the commands import their set-up from this one place.
from vpdetect.cli.inputs import GLOB_CHARACTERS, expand_inputs, parse_shard, select_shard  # noqa: F401
from vpdetect.cli.logs import LogSettings, progress_bar, setup_logging  # noqa: F401
from vpdetect.cli.model_cache import load_stage_model, resolve_model_path  # noqa: F401
from vpdetect.cli.options import (  # noqa: F401
    device_option,
    devices_option,
    log_file_option,
    output_dir_option,
    overwrite_option,
    quiet_option,
    shard_option,
    verbose_option,
)
from vpdetect.cli.outputs import FORMAT_SUFFIX, is_complete, plan_outputs, sidecar_path  # noqa: F401
from vpdetect.cli.pool import Outcome, Task, run_batch  # noqa: F401
from vpdetect.cli.provenance import file_sha256, provenance_record, write_sidecar  # noqa: F401
from vpdetect.devices import parse_devices, resolve_device  # noqa: F401

log = logging.getLogger("vpdetect")


def start_run(
    *, verbose: bool, quiet: bool, log_file: Path | None, device: str, devices: str | None
) -> tuple[LogSettings, str]:
    """Set up logging and choose the device: `device` resolved, or 'cuda' when --devices
    hands each worker its own GPU. A CPU-only machine given --devices says so here."""
    settings = LogSettings(verbose=verbose, quiet=quiet, log_file=str(log_file) if log_file else None)
    setup_logging(settings)
    if parse_devices(devices) is not None:
        return settings, "cuda"
    return settings, resolve_device(device)


def format_name(output_format: str | None) -> str | None:
    """The --format value, checked and lower-cased (None stays None)."""
    from vpdetect.io.particles import check_format

    return check_format(output_format)


def report(outcomes: Sequence[Outcome], command: str, summary: bool | None = None) -> int:
    """Log a one-line summary of a batch; the exit code: 0, 2 if inputs failed, 1 if anything failed
    unexpectedly."""
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
    # A batch ends with a summary; a lone input's own line already says what happened to it.
    if summary if summary is not None else len(outcomes) > 1:
        line = f"{command}: {done} done, {skipped} skipped, {len(failed)} failed of {len(outcomes)}"
        if failed:
            line += " (failed: " + ", ".join(Path(o.input).name for o in failed[:5])
            line += ", ...)" if len(failed) > 5 else ")"
        log.log(logging.WARNING if failed else logging.INFO, line)
    if not failed:
        return 0
    return 2 if all(o.user_error for o in failed) else 1


def run_command_batch(
    command: str,
    inputs: Sequence[str | os.PathLike],
    task: Task,
    *,
    output: Path | None,
    output_dir: Path | None,
    suffix: str,
    parameters: dict,
    models: dict[str, str | os.PathLike | None],
    device: str = "cpu",
    devices: str | None = None,
    shard: str | None = None,
    overwrite: bool = False,
    log_settings: LogSettings | None = None,
    naming: Callable[[Path], str] | None = None,
    beside_inputs: bool = False,
) -> None:
    """The whole batch flow of a command; raises typer.Exit with a non-zero code if any input failed.

    `device` must already be resolved (see `start_run`); `devices` is the
    raw --devices text; `naming` and `beside_inputs` go to `plan_outputs`.
    """
    paths = expand_inputs(inputs)
    index, count = parse_shard(shard)
    chosen = select_shard(paths, index, count)
    if count > 1:
        log.info("shard %d/%d: %d of %d input(s)", index, count, len(chosen), len(paths))
    if not chosen:
        log.warning("shard %d/%d has no inputs (%d in all): nothing to do", index, count, len(paths))
        return
    gpus = parse_devices(devices)
    outputs = plan_outputs(chosen, output, output_dir, suffix, naming=naming, beside_inputs=beside_inputs)
    base = provenance_record(command, parameters, models)
    log.debug("%s parameters: %s", command, json.dumps(base["parameters"], sort_keys=True))
    outcomes = run_batch(
        chosen, outputs, task, device=device, devices=gpus, overwrite=overwrite,
        base_record=base, log_settings=log_settings,
    )
    code = report(outcomes, command, summary=len(paths) > 1)
    if code:
        raise typer.Exit(code)
