"""Logging of the batch commands: the `vpdetect` logger on the shared rich console (and a
file), and the progress bar. Spawned `--devices` workers set it up again from `LogSettings`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rich.logging import RichHandler
from rich.text import Text

from vpdetect.cli.app import console
from vpdetect.errors import VPDetectError

_PREFIX = {logging.ERROR: ("error: ", "bold red"), logging.WARNING: ("warning: ", "yellow")}


class ConsoleHandler(RichHandler):
    """rich's handler without time, level or path columns: one record is one unwrapped line,
    warnings and errors prefixed `warning:`/`error:` like the commands' own messages, so a
    batch log stays greppable."""

    def __init__(self) -> None:
        super().__init__(console=console, show_time=False, show_level=False, show_path=False,
                         markup=False, highlighter=None, keywords=[])

    def render_message(self, record: logging.LogRecord, message: str) -> Text:
        level = logging.ERROR if record.levelno >= logging.ERROR else record.levelno
        prefix, style = _PREFIX.get(level, ("", ""))
        return Text.assemble((prefix, style), message)

    def emit(self, record: logging.LogRecord) -> None:
        # Soft-wrapped, not the log-render grid: that folds (and print crops) long lines at the
        # terminal width, and a path cut in two is no use in a log.
        try:
            self.console.print(self.render_message(record, self.format(record)), soft_wrap=True)
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
    screen = ConsoleHandler()
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
