"""Bundled default weights: `localizer.pt` and `classifier.pt` beside this file."""

from __future__ import annotations

from pathlib import Path

from vpdetect.errors import VPDetectError

MODELS_DIR = Path(__file__).resolve().parent
STAGE_FILES = {"localizer": "localizer.pt", "classifier": "classifier.pt"}


def default_model_path(stage: str) -> Path:
    """Path of the bundled model for `stage`; VPDetectError if it is not installed."""
    if stage not in STAGE_FILES:
        raise VPDetectError(f"unknown stage {stage!r} (expected localizer or classifier)")
    path = MODELS_DIR / STAGE_FILES[stage]
    if not path.is_file():
        raise VPDetectError(
            f"bundled {stage} model is missing ({path}); pass a model file with --model "
            f"or train one with `vpdetect train {stage}`"
        )
    return path
