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


def parse_devices(spec: str | None) -> list[str] | None:
    """'0,1' (the --devices option) -> ['cuda:0', 'cuda:1']; None -> None.
    CPU-only machines get a clear error."""
    if spec is None:
        return None
    import torch

    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise VPDetectError(f"--devices takes GPU numbers like 0,1; got {spec!r}") from None
    if not indices or len(set(indices)) != len(indices) or min(indices) < 0:
        raise VPDetectError(f"--devices takes distinct GPU numbers like 0,1; got {spec!r}")
    if not torch.cuda.is_available():
        raise VPDetectError(
            f"--devices {spec} asks for GPUs, but no CUDA device is available on this machine "
            "(CPU-only); drop --devices to run on the CPU"
        )
    available = torch.cuda.device_count()
    missing = [i for i in indices if i >= available]
    if missing:
        raise VPDetectError(f"--devices {spec}: GPU {missing[0]} does not exist ({available} visible)")
    return [f"cuda:{i}" for i in indices]


def bind_device(device: str) -> None:
    """Make a CUDA `device` this process's current one, so that code allocating on plain
    'cuda' (cuDNN workspaces, the caching allocator, NCCL) lands on it and not on GPU 0."""
    import torch

    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is not None:
        torch.cuda.set_device(chosen)


def available_cpu_memory() -> int | None:
    """The machine's available memory in bytes (MemAvailable), None where it cannot be told."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
