"""Batch machinery shared by `localize`, `classify` and `pick` (issue 9).

A command builds a *task* `task(input_path, output_path, device) -> dict` that
processes one input and writes its output atomically (returning extra
provenance, e.g. particle counts), then hands everything else to
`run_command_batch`:

- inputs: paths and globs, expanded and sorted (`expand_inputs`);
- clusters: `--shard i/n` keeps the i-th of n round-robin parts of that list,
  defaulting from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (`parse_shard`);
- outputs: `-o OUT` for one input, else `--output-dir/<tomogram name><suffix>`
  (`plan_outputs`); an output is *complete* when it and its provenance sidecar
  `<output>.json` exist (`is_complete`), and complete outputs are skipped unless
  `--overwrite`, so a rerun after a kill resumes;
- failures: one input failing is logged and the rest continue; a summary ends
  the run and the exit code is non-zero if anything failed (`report`);
- GPUs: `--devices 0,1` runs one spawned worker process per GPU, each taking a
  round-robin share of the inputs (`run_batch`); the task must then be
  picklable (a module-level function or a functools.partial of one);
- provenance: the sidecar holds the vpdetect version, the command, all
  parameters, model paths and sha256, the input's path and sha256 (streamed),
  the device and the task's extras (`provenance_record`);
- logs: `--verbose/--quiet` and `--log-file` (`setup_logging`).

Typer option factories (`shard_option()`, ...) keep the options identical
across commands.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import platform
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import typer

from vpdetect import __version__
from vpdetect.cli.app import console
from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import write_text_atomic
from vpdetect.io.mrc import tomogram_name

log = logging.getLogger("vpdetect")

GLOB_CHARACTERS = set("*?[")
FORMAT_SUFFIX = {"relion4": ".star", "relion5": ".star", "csv": ".csv", "shrec": ".txt"}

Task = Callable[[Path, Path, str], "dict | None"]


# --------------------------------------------------------------------------- options


def output_dir_option():
    return typer.Option(
        None, "--output-dir", "-d",
        help="Folder for the outputs, one per input named after the tomogram (default: current folder).",
    )


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
    inputs: Sequence[Path], output: Path | None, output_dir: Path | None, suffix: str
) -> list[Path]:
    """One output path per input: `output` for a single input, else `output_dir/<name><suffix>`."""
    if output is not None:
        if len(inputs) != 1:
            raise VPDetectError(f"-o/--output names one file but {len(inputs)} inputs were given; use --output-dir")
        if output_dir is not None:
            raise VPDetectError("give either -o/--output or --output-dir, not both")
        return [output]
    directory = Path(".") if output_dir is None else output_dir
    if directory.exists() and not directory.is_dir():
        raise VPDetectError(f"--output-dir is not a folder: {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    outputs = [directory / f"{tomogram_name(path)}{suffix}" for path in inputs]
    seen: dict[Path, Path] = {}
    for path, out in zip(inputs, outputs, strict=True):
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


def resolve_device(device: str) -> str:
    """`auto` -> 'cuda' when a GPU is visible, else 'cpu'; checks that a CUDA request can be met."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise VPDetectError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise VPDetectError(f"device {device} requested but CUDA is not available on this machine")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise VPDetectError(f"device {device} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    elif chosen.type != "cpu":
        raise VPDetectError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or auto")
    return str(chosen)


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


def _run_one(task: Task, source: Path, output: Path, device: str, base_record: dict) -> Outcome:
    start = time.perf_counter()
    try:
        if not source.is_file():
            raise VPDetectError(f"file not found: {source}" if not source.exists() else f"not a file: {source}")
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
        return Outcome(str(source), str(output), "done", seconds=time.perf_counter() - start)
    except VPDetectError as exc:
        message, user_error = str(exc), True
    except OSError as exc:
        message, user_error = f"I/O error: {exc}", True
    except Exception as exc:  # noqa: BLE001 - one bad input must not sink the batch
        log.debug("traceback for %s:\n%s", source, traceback.format_exc())
        message, user_error = f"internal error: {type(exc).__name__}: {exc}", False
    log.error("%s: %s", source.name, message)
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


def report(outcomes: Sequence[Outcome], command: str) -> int:
    """Log a one-line summary; the exit code: 0, 2 if inputs failed, 1 if anything failed unexpectedly."""
    done = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    failed = [o for o in outcomes if o.status == "failed"]
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
) -> None:
    """The whole batch flow of a command; raises typer.Exit with a non-zero code if any input failed.

    `device` must already be resolved (see `resolve_device`); `devices` is the
    raw --devices text.
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
    outputs = plan_outputs(chosen, output, output_dir, suffix)
    base = provenance_record(command, parameters, models)
    outcomes = run_batch(
        chosen, outputs, task, device=device, devices=gpus, overwrite=overwrite,
        base_record=base, log_settings=log_settings,
    )
    code = report(outcomes, command)
    if code:
        raise typer.Exit(code)
