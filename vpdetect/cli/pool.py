"""Running a task over the inputs: skip complete outputs, isolate each input's failure (removing
what it wrote), write the sidecar, and with `--devices` spread the inputs over one spawned worker
process per GPU (the task must then be picklable: a module-level function or a partial of one)."""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from vpdetect.cli.logs import LogSettings, setup_logging
from vpdetect.cli.outputs import is_complete, sidecar_path
from vpdetect.cli.provenance import file_sha256, write_sidecar
from vpdetect.devices import bind_device
from vpdetect.errors import VPDetectError
from vpdetect.io.atomic import stale_temp_files

log = logging.getLogger("vpdetect")

Task = Callable[[Path, Path, str], "dict | None"]


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
            # OME-Zarr tomograms are folders.
            if not (source.is_file() or (source.is_dir() and source.suffix.lower() == ".zarr")):
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
    bind_device(device)  # else every worker's CUDA context and cuDNN workspace sit on GPU 0 too
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
        bind_device(chosen)
        for source, output in pending:
            outcomes[str(source)] = _run_one(task, source, output, chosen, base_record)
    return [outcomes[str(source)] for source in inputs]
