"""Batch machinery shared by `localize`, `classify` and `pick` (issue 9).

A command builds a *task* `task(input_path, output_path, device) -> dict` that
processes one input and writes its output atomically (returning extra
provenance, e.g. particle counts), then hands everything else to
`run_command_batch`:

- inputs: paths and globs, expanded and sorted (`expand_inputs`);
- clusters: `--shard i/n` keeps the i-th of n round-robin parts of that list,
  defaulting from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (`parse_shard`);
- outputs: `-o OUT` for one input, else `--output-dir/<tomogram name><suffix>`
  (`plan_outputs`; folders are checked before any work); an output is
  *complete* when it and its provenance sidecar `<output>.json` exist
  (`is_complete`), and complete outputs are skipped unless `--overwrite`, so a
  rerun after a kill resumes (clearing the kill's temporary files);
- failures: one input failing is logged and the rest continue; an output the
  failed attempt wrote is removed; a summary ends a batch and the exit code is
  non-zero if anything failed (`report`); warnings are logged per input;
- GPUs: `--devices 0,1` runs one spawned worker process per GPU, each taking a
  round-robin share of the inputs (`run_batch`); the task must then be
  picklable (a module-level function or a functools.partial of one);
- provenance: the sidecar holds the vpdetect version, the command, all
  parameters, model paths and sha256, the input's path and sha256 (streamed),
  the device and the task's extras (`provenance_record`);
- logs: `--verbose/--quiet` and `--log-file` (`setup_logging`, `start_run`).

Typer option factories (`shard_option()`, ...) keep the options identical
across commands; `start_run`, `format_name`, `resolve_model_path`,
`load_stage_model` and `progress_bar` are the set-up the three commands share.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import platform
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import typer

from vpdetect import __version__
from vpdetect.cli.app import console
from vpdetect.devices import resolve_device  # noqa: F401  re-exported for the commands
from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import check_output_dir, stale_temp_files, write_text_atomic
from vpdetect.io.mrc import tomogram_name

log = logging.getLogger("vpdetect")

GLOB_CHARACTERS = set("*?[")
FORMAT_SUFFIX = {"relion4": ".star", "relion5": ".star", "csv": ".csv", "shrec": ".txt"}

Task = Callable[[Path, Path, str], "dict | None"]


# --------------------------------------------------------------------------- options


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


# --------------------------------------------------------------------------- logging


class _ConsoleHandler(logging.Handler):
    """Log records as one line each on the shared rich console (stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.ERROR:
                message = f"[bold red]error:[/] {message}"
            elif record.levelno >= logging.WARNING:
                message = f"[yellow]warning:[/] {message}"
            console.print(message, soft_wrap=True, highlight=False, markup=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@dataclass(frozen=True)
class LogSettings:
    verbose: bool = False
    quiet: bool = False
    log_file: str | None = None


def setup_logging(settings: LogSettings) -> None:
    """Route the `vpdetect` logger to the console (and a file); replaces earlier handlers."""
    logger = logging.getLogger("vpdetect")
    for handler in list(logger.handlers):
        if getattr(handler, "_vpdetect", False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    screen = _ConsoleHandler()
    screen.setLevel(logging.WARNING if settings.quiet else logging.DEBUG if settings.verbose else logging.INFO)
    screen._vpdetect = True  # type: ignore[attr-defined]
    logger.addHandler(screen)
    if settings.log_file:
        path = Path(settings.log_file)
        if not path.parent.resolve().is_dir():
            raise VPDetectError(f"log file folder does not exist: {path.parent}")
        to_file = logging.FileHandler(path, mode="a", encoding="utf-8")
        to_file.setLevel(logging.DEBUG)
        to_file.setFormatter(
            logging.Formatter("%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s")
        )
        to_file._vpdetect = True  # type: ignore[attr-defined]
        logger.addHandler(to_file)


def progress_bar(show: bool = True):
    """A transient progress bar on the console; off when not asked for or when stderr is not a
    terminal (batch logs and pipes get the log lines, not a bar's leftovers)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not (show and console.is_terminal),
    )


# --------------------------------------------------------------------------- inputs and outputs


def expand_inputs(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Paths and globs -> sorted, de-duplicated paths. A glob that matches nothing is an error;
    a plain path that does not exist is kept (its task reports it, the others run)."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        text = str(pattern)
        if GLOB_CHARACTERS & set(text) and not Path(text).exists():
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            matches = [m for m in matches if Path(m).is_file()]
            if not matches:
                raise VPDetectError(f"no files match {text}")
            for match in matches:
                found.setdefault(os.path.normpath(match), Path(match))
        else:
            found.setdefault(os.path.normpath(text), Path(text))
    if not found:
        raise VPDetectError("no input files given")
    return [found[key] for key in sorted(found)]


def parse_shard(spec: str | None, environ: dict | None = None) -> tuple[int, int]:
    """(index, count) from 'I/N' (0-based) or the Slurm array variables; (0, 1) when neither."""
    environ = os.environ if environ is None else environ
    if spec is None:
        task_id = environ.get("SLURM_ARRAY_TASK_ID")
        task_count = environ.get("SLURM_ARRAY_TASK_COUNT")
        if task_id is None or task_count is None:
            return 0, 1
        try:
            index = int(task_id) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
            count = int(task_count)
        except ValueError:
            raise VPDetectError(
                f"cannot read the Slurm array variables (TASK_ID={task_id!r}, TASK_COUNT={task_count!r})"
            ) from None
        source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    else:
        try:
            index_text, count_text = spec.split("/")
            index, count = int(index_text), int(count_text)
        except ValueError:
            raise VPDetectError(f"--shard takes I/N, e.g. 0/4, got {spec!r}") from None
        source = "--shard"
    if count < 1 or not 0 <= index < count:
        raise VPDetectError(f"{source}: shard {index} of {count} does not exist (need 0 <= I < N)")
    return index, count


def select_shard(items: Sequence, index: int, count: int) -> list:
    """The index-th of `count` round-robin parts: every item lands in exactly one part."""
    return list(items[index::count])


def sidecar_path(output: Path) -> Path:
    """Where an output's provenance record lives: `<output>.json`."""
    return output.with_name(output.name + ".json")


def is_complete(output: Path) -> bool:
    """An output counts as done when it and its sidecar both exist (outputs are written atomically)."""
    return output.is_file() and sidecar_path(output).is_file()


def plan_outputs(
    inputs: Sequence[Path],
    output: Path | None,
    output_dir: Path | None,
    suffix: str,
    *,
    naming: Callable[[Path], str] | None = None,
    beside_inputs: bool = False,
) -> list[Path]:
    """One output path per input: `output` for a single input, else `<folder>/<name>`.

    The name is `naming(input)`, by default the tomogram's name plus `suffix`;
    the folder is `output_dir`, else each input's own folder (`beside_inputs`)
    or the current one. No output may overwrite an input or another output.
    """
    if output is not None:
        if len(inputs) != 1:
            raise VPDetectError(f"-o/--output names one file but {len(inputs)} inputs were given; use --output-dir")
        if output_dir is not None:
            raise VPDetectError("give either -o/--output or --output-dir, not both")
        outputs = [Path(output)]
    else:
        if output_dir is not None:
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
            except OSError:
                check_output_dir(output_dir)  # says why in one line
                raise
        name_of = naming or (lambda path: f"{tomogram_name(path)}{suffix}")
        outputs = [
            (output_dir if output_dir is not None else path.parent if beside_inputs else Path(".")) / name_of(path)
            for path in inputs
        ]
    for folder in dict.fromkeys(out.parent for out in outputs):
        check_output_dir(folder)  # before any work, not after the first tomogram
    seen: dict[Path, Path] = {}
    sources = {os.path.abspath(path) for path in inputs}
    for path, out in zip(inputs, outputs, strict=True):
        if os.path.abspath(out) in sources:
            raise VPDetectError(f"output {out} would overwrite an input; choose another output name or folder")
        if out in seen:
            raise VPDetectError(f"{seen[out]} and {path} would both write {out}; rename one tomogram")
        seen[out] = path
    return outputs


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def provenance_record(command: str, parameters: dict, models: dict[str, str | os.PathLike | None]) -> dict:
    """The part of a sidecar shared by every input of a run (version, command, parameters, models)."""
    model_info = {}
    for stage, path in models.items():
        if path is None:
            continue
        model_info[stage] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
    return {
        "vpdetect_version": __version__,
        "command": command,
        "parameters": _plain(parameters),
        "models": model_info,
        "host": platform.node(),
    }


def _plain(value):
    """JSON-friendly copy: paths and tuples become strings and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def write_sidecar(output: Path, record: dict) -> None:
    write_text_atomic(sidecar_path(output), json.dumps(_plain(record), indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- devices


def parse_devices(spec: str | None) -> list[str] | None:
    """'0,1' -> ['cuda:0', 'cuda:1']; None -> None. CPU-only machines get a clear error."""
    if spec is None:
        return None
    import torch

    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise VPDetectError(f"--devices takes GPU numbers like 0,1; got {spec!r}") from None
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise VPDetectError(f"--devices takes distinct GPU numbers like 0,1; got {spec!r}")
    if not torch.cuda.is_available():
        raise VPDetectError(
            f"--devices {spec} asks for GPUs, but no CUDA device is available on this machine "
            "(CPU-only); drop --devices to run on the CPU"
        )
    available = torch.cuda.device_count()
    missing = [i for i in indices if i >= available]
    if missing:
        raise VPDetectError(f"--devices {spec}: GPU {missing[0]} does not exist ({available} visible)")
    return [f"cuda:{i}" for i in indices]


# --------------------------------------------------------------------------- command set-up


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


def resolve_model_path(model: Path | None, stage: str) -> Path:
    """The model to use: the given file, else the bundled default for `stage`."""
    if model is not None:
        if not Path(model).is_file():
            raise VPDetectError(f"model file not found: {model}")
        return Path(model)
    try:
        from vpdetect.models import default_model_path

        path = Path(default_model_path(stage))
    except (ImportError, VPDetectError, FileNotFoundError) as exc:
        raise VPDetectError(f"no {stage} model: the bundled default is missing ({exc}); pass --model") from None
    if not path.is_file():
        raise VPDetectError(f"no {stage} model: the bundled default {path.name} is missing; pass --model")
    return path


def load_stage_model(model_path: str | os.PathLike, stage: str, device: str):
    """(model, card) of a localizer or classifier checked for its stage, loaded once per
    process, device and file version (a model retrained in place is read again)."""
    path = Path(model_path)
    try:
        stat = path.stat()
    except OSError:
        raise VPDetectError(f"model file not found: {path}") from None
    return _load_stage_model(str(path.resolve()), stat.st_mtime_ns, stat.st_size, stage, device)


@functools.lru_cache(maxsize=4)
def _load_stage_model(path: str, mtime_ns: int, size: int, stage: str, device: str):
    from vpdetect.nn.checkpoint import check_inference_card, load_model

    model, card = load_model(path, stage=stage, device=device)
    check_inference_card(card, stage)
    if stage == "classifier":
        from vpdetect.classify.pipeline import classifier_classes

        classifier_classes(card)  # refuses a card without particle classes
    return model.eval(), card


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """What happened to one input."""

    input: str
    output: str
    status: str  # "done", "skipped" or "failed"
    message: str = ""
    seconds: float = 0.0
    user_error: bool = True  # False: an unexpected exception (a bug), not bad input


def _file_state(path: Path) -> tuple[int, int, int] | None:
    """What identifies one version of a file (inode, mtime, size); None when absent."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _discard_new_output(output: Path, before: tuple[int, int, int] | None) -> None:
    """After a failure, remove an output this run wrote (and its now stale sidecar).

    Outputs are written atomically, so what exists is whole; but a table whose
    sidecar could not be written, or a previous result replaced before a later
    step failed, must not pass for a finished one.
    """
    if _file_state(output) not in (None, before):
        for path in (output, sidecar_path(output)):
            with contextlib.suppress(OSError):
                path.unlink()


def _run_one(task: Task, source: Path, output: Path, device: str, base_record: dict) -> Outcome:
    start = time.perf_counter()
    # A job killed while writing leaves hidden temporary files; the redo clears them
    # (shards never share an output, so no other process is writing these).
    for debris in stale_temp_files(output) + stale_temp_files(sidecar_path(output)):
        log.debug("removing %s, left by an interrupted run", debris)
        debris.unlink(missing_ok=True)
    before = _file_state(output)
    log.debug("%s -> %s on %s", source, output, device)
    # Warnings of one input (coordinates outside the volume, a voxel-size mismatch)
    # go to the log with the input's name, so --quiet, --log-file and workers see them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if not source.is_file():
                raise VPDetectError(
                    f"file not found: {source}" if not source.exists() else f"not a file: {source}"
                )
            extras = task(source, output, device) or {}
            record = dict(base_record)
            record.update(
                {
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "device": device,
                    "input": {"path": str(source.resolve()), "sha256": file_sha256(source),
                              "bytes": source.stat().st_size},
                    "output": str(output.resolve()),
                    "result": extras,
                }
            )
            write_sidecar(output, record)
            message = None
        except VPDetectError as exc:
            message, user_error = str(exc), True
        except OSError as exc:
            message, user_error = f"I/O error: {exc.strerror or exc}: {exc.filename or output}", True
        except Exception as exc:  # noqa: BLE001 - one bad input must not sink the batch
            log.debug("traceback for %s:\n%s", source, traceback.format_exc())
            message, user_error = f"internal error: {type(exc).__name__}: {exc}", False
    for warning in caught:
        log.warning("%s: %s", source.name, warning.message)
    if message is None:
        return Outcome(str(source), str(output), "done", seconds=time.perf_counter() - start)
    _discard_new_output(output, before)
    # Name the input once: many messages already start with its path.
    log.error("%s", message if str(source) in message else f"{source.name}: {message}")
    return Outcome(str(source), str(output), "failed", message, time.perf_counter() - start, user_error)


def _worker(task: Task, jobs: list[tuple[str, str]], device: str, base_record: dict,
            settings: LogSettings) -> list[dict]:
    """One GPU's share of the inputs, in a spawned process."""
    setup_logging(settings)
    log.info("worker on %s: %d input(s)", device, len(jobs))
    return [asdict(_run_one(task, Path(s), Path(o), device, base_record)) for s, o in jobs]


def run_batch(
    inputs: Sequence[Path],
    outputs: Sequence[Path],
    task: Task,
    *,
    device: str = "cpu",
    devices: Sequence[str] | None = None,
    overwrite: bool = False,
    base_record: dict | None = None,
    log_settings: LogSettings | None = None,
) -> list[Outcome]:
    """Run `task` over inputs, skipping complete outputs, isolating failures, writing sidecars.

    With several `devices` each gets a spawned worker process and a round-robin
    share of the pending inputs; otherwise everything runs here on `device`.
    Outcomes come back in input order.
    """
    base_record = base_record or {}
    outcomes: dict[str, Outcome] = {}
    pending: list[tuple[Path, Path]] = []
    for source, output in zip(inputs, outputs, strict=True):
        if not overwrite and is_complete(output):
            log.info("%s: %s exists, skipped (use --overwrite to redo)", source.name, output)
            outcomes[str(source)] = Outcome(str(source), str(output), "skipped", "output exists")
        else:
            pending.append((source, output))
    if devices and len(devices) > 1 and len(pending) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        shares = [pending[i :: len(devices)] for i in range(len(devices))]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(devices), mp_context=context) as pool:
            futures = [
                pool.submit(_worker, task, [(str(s), str(o)) for s, o in share], dev, base_record,
                            log_settings or LogSettings())
                for share, dev in zip(shares, devices, strict=True)
                if share
            ]
            for future in futures:
                for result in future.result():
                    outcomes[result["input"]] = Outcome(**result)
    else:
        chosen = devices[0] if devices else device
        for source, output in pending:
            outcomes[str(source)] = _run_one(task, source, output, chosen, base_record)
    return [outcomes[str(source)] for source in inputs]


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
