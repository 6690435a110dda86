"""The Typer application, shared console and the error boundary of every command."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from vpdetect import __version__
from vpdetect.errors import VPDetectError

# Status and tables go to stderr so that stdout stays clean for pipelines.
console = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="vpdetect",
    help="Find and identify macromolecules in cryo-electron tomograms (VP-Detector, 3D MSDNet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vpdetect {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Find and identify macromolecules in cryo-electron tomograms."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
    return typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn VPDetectError (and common OS errors) into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except VPDetectError as exc:
            raise fail(str(exc)) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            raise fail(f"{exc.strerror or exc}: {exc.filename}") from None
        except OSError as exc:
            raise fail(f"I/O error: {exc}") from None
        except MemoryError as exc:
            # numpy names the array it could not allocate; the fix is a smaller job, not a bug report.
            raise fail(f"out of memory: {str(exc) or 'an allocation failed'} (try a smaller volume, tile or batch)") from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True, highlight=False)


def main() -> None:
    """Console-script entry point. Unexpected errors are one line unless VPDETECT_DEBUG=1."""
    warnings.showwarning = _show_warning
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the last boundary before a traceback
        if os.environ.get("VPDETECT_DEBUG"):
            raise
        console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
            "(set VPDETECT_DEBUG=1 for a traceback)",
            soft_wrap=True,
        )
        sys.exit(1)
