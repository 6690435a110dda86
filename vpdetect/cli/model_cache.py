"""Which model a command uses (the given file or the bundled default) and loading it once per
process, device and file version."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from vpdetect.errors import VPDetectError


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
