"""The `vpdetect` command line: a thin layer over the compute modules.

Each command lives in its own module and registers itself on `app`. Heavy
libraries (torch, scipy, matplotlib) are imported inside the commands so that
`vpdetect --help` answers at once.
"""

from __future__ import annotations

from vpdetect.cli.app import app, main  # noqa: F401

# Importing a command module registers its command(s) on `app`.
from vpdetect.cli import info  # noqa: E402,F401  isort: skip
from vpdetect.cli import convert, evaluate  # noqa: E402,F401  isort: skip
from vpdetect.cli import classify  # noqa: E402,F401  isort: skip
from vpdetect.cli import simulate  # noqa: E402,F401  isort: skip
from vpdetect.cli import localize  # noqa: E402,F401  isort: skip
from vpdetect.cli import pick  # noqa: E402,F401  isort: skip
from vpdetect.cli import train  # noqa: E402,F401  isort: skip
from vpdetect.cli import tune  # noqa: E402,F401  isort: skip
from vpdetect.cli import train_verifier  # noqa: E402,F401  isort: skip
from vpdetect.cli import view  # noqa: E402,F401  isort: skip
