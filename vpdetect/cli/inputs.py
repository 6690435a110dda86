"""Which inputs a run processes: paths and globs expanded and sorted, then the shard of a
cluster job (`--shard i/n` or the Slurm array variables) taken round-robin."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from vpdetect.errors import VPDetectError

GLOB_CHARACTERS = set("*?[")


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
