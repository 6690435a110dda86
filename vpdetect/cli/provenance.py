"""The provenance sidecar `<output>.json`: vpdetect version, command, parameters, models and
input with their sha256 (streamed), device and the task's own extras."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from vpdetect import __version__
from vpdetect.cli.outputs import sidecar_path
from vpdetect.io.atomic import write_text_atomic


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed (constant memory); of a folder (an OME-Zarr tomogram),
    over its files' relative paths and contents in sorted order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
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
