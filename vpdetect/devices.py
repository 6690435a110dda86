"""Which torch device a command runs on: one rule for inference and training."""

from __future__ import annotations

from vpdetect.errors import VPDetectError


def resolve_device(spec: str | None, local_rank: int | None = None) -> str:
    """A concrete device string from `auto`, `cpu`, `cuda` or `cuda:N`, checked against this machine.

    `auto` means CUDA when a GPU is visible, else the CPU. `local_rank` (the
    process's GPU under torchrun) pins `auto` and a bare `cuda` to `cuda:<local_rank>`.
    """
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        spec = "cuda"
    try:
        chosen = torch.device(spec)
    except RuntimeError:
        raise VPDetectError(f"unknown device {spec!r}: use cpu, cuda, cuda:N or auto") from None
    if chosen.type == "cpu":
        return "cpu"
    if chosen.type != "cuda":
        raise VPDetectError(f"unsupported device {spec!r}: use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise VPDetectError(f"device {spec} requested but CUDA is not available on this machine")
    if chosen.index is None and local_rank is not None:
        chosen = torch.device("cuda", local_rank)
    if chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise VPDetectError(f"device {chosen} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    return str(chosen)
