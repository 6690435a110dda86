"""Network arithmetic: the one place that turns a `--precision` name into dtypes and flags.

Names: `fp32` (float32, strict: no TF32), `tf32` (float32 storage, TF32 tensor-core
convolutions), `bf16` and `fp16` (autocast), and `auto`. The CPU always computes in
float32, whatever the name.

`auto` on a GPU is TF32 where the GPU has TF32 tensor cores (compute capability 8.0+:
A100, RTX 30xx, H100, ...) and strict fp32 before that. Not bf16: the bundled localizer's
threshold and cluster sizes were tuned on float32 maps, and bf16 keeps 8 bits of mantissa;
`make gpu-check` measures how far each precision's maps and F1 move (README, GPU).

Native bfloat16 also needs compute capability 8.0+. `torch.cuda.is_bf16_supported()`
counts emulation (V100, T4, RTX 20xx say yes and run it slowly), and it asks the current
device, not the model's; here the capability of the model's own device decides.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from vpdetect.errors import VPDetectError

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Ampere: TF32 tensor cores and native bfloat16.
AMPERE = (8, 0)


@dataclass(frozen=True)
class Arithmetic:
    """A resolved precision: its name, the autocast dtype (None = float32) and TF32 on/off."""

    name: str
    autocast: torch.dtype | None = None
    tf32: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network's feature maps are computed in."""
        return self.autocast or torch.float32


FLOAT32 = Arithmetic("fp32")


def check_precision(name: str | None) -> str:
    """The precision name, lower-cased and checked (one-line error otherwise)."""
    text = str(name or "auto").strip().lower()
    if text not in PRECISIONS:
        raise VPDetectError(f"unknown precision {name!r}: use {', '.join(PRECISIONS)}")
    return text


def device_capability(device: str | torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device (its index, not the current one);
    None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def native_bf16(capability: tuple[int, int] | None) -> bool:
    """Whether a GPU of this compute capability computes bfloat16 in hardware."""
    return capability is not None and tuple(capability) >= AMPERE


def resolve_precision(
    name: str | None, device: str | torch.device, capability: tuple[int, int] | None = None
) -> Arithmetic:
    """What `name` means on `device` (a GPU's `capability` is looked up when not given)."""
    name = check_precision(name)
    device = torch.device(device)
    if device.type != "cuda":
        return FLOAT32
    if capability is None:
        capability = device_capability(device)
    ampere = native_bf16(capability)
    if name == "auto":
        return Arithmetic("tf32", tf32=True) if ampere else FLOAT32
    if name == "tf32":
        # Before Ampere there are no TF32 units: the same as fp32.
        return Arithmetic("tf32", tf32=True) if ampere else FLOAT32
    if name == "fp32":
        return FLOAT32
    if name == "bf16" and not ampere:
        warnings.warn(
            f"this GPU (compute capability {capability[0]}.{capability[1]}) has no native bfloat16: "
            "it is emulated and slow; fp16 or fp32 run faster here",
            stacklevel=2,
        )
    return Arithmetic(name, autocast=AUTOCAST_DTYPES[name], tf32=True)


def training_autocast_dtype(device: str | torch.device, capability: tuple[int, int] | None = None):
    """The mixed-precision dtype of `--amp` training: bfloat16 where native, else float16
    (with loss scaling); None on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if capability is None:
        capability = device_capability(device)
    return torch.bfloat16 if native_bf16(capability) else torch.float16


@contextlib.contextmanager
def inference_arithmetic(arithmetic: Arithmetic, device: str | torch.device):
    """Run the network in `arithmetic` on `device`, for the duration of the block only.

    On CUDA: cuDNN autotuning on (tiles repeat one shape), TF32 as the precision says,
    and an autocast of its own (replacing any the caller has open), all restored after;
    a cuDNN `deterministic` setting made by the caller is kept. Elsewhere: nothing.
    """
    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    deterministic = torch.backends.cudnn.deterministic
    with torch.backends.cudnn.flags(
        enabled=True, benchmark=not deterministic, deterministic=deterministic,
        allow_tf32=arithmetic.tf32,
    ), torch.autocast("cuda", dtype=arithmetic.autocast or torch.float32,
                      enabled=arithmetic.autocast is not None):
        yield
