"""Atomic file writing: write to a temporary name beside the target, then rename.

A crash or an error half-way never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vpdetect.errors import VPDetectError


def check_output_dir(directory: str | os.PathLike) -> None:
    """Refuse, in one line, a folder that outputs cannot be written into."""
    directory = Path(directory)
    if directory.is_dir():
        if not os.access(directory, os.W_OK):
            raise VPDetectError(f"output directory is not writable: {directory}")
        return
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise VPDetectError(f"output directory {directory} cannot exist: {existing} is a file")
    raise VPDetectError(f"output directory does not exist: {directory}")


def new_file_mode() -> int:
    """The permissions `open()` gives a new file under the current umask (0644 under 022)."""
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto `path` on success.

    The temporary name keeps the target's suffix so that libraries choosing a
    format by extension (matplotlib, starfile) still work.
    """
    target = Path(path)
    directory = target.parent
    check_output_dir(directory)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=directory
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); a result gets what any new file would.
        if tmp.is_file():
            os.chmod(tmp, new_file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _temp_name_pattern(target: Path) -> re.Pattern:
    # mkstemp's random part is 8 characters of [a-z0-9_].
    return re.compile(rf"\.{re.escape(target.stem)}\.[a-z0-9_]{{8}}\.tmp{re.escape(target.suffix)}")


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files an interrupted `atomic_path(path)` left beside `path` (a killed job's debris)."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    pattern = _temp_name_pattern(target)
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
