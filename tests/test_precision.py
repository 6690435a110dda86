"""Precision names -> dtypes and flags, decided from a GPU's compute capability (no CUDA needed)."""

import pytest
import torch

from vpdetect.errors import VPDetectError
from vpdetect.nn.precision import (
    check_precision,
    device_capability,
    inference_arithmetic,
    native_bf16,
    resolve_precision,
    training_autocast_dtype,
)

V100, T4, A100, H200 = (7, 0), (7, 5), (8, 0), (9, 0)


@pytest.mark.parametrize(
    "name, capability, expected",
    [
        # auto: as close to the fp32 maps the bundled thresholds were tuned on as is fast
        ("auto", V100, ("fp32", None, False)),
        ("auto", T4, ("fp32", None, False)),
        ("auto", A100, ("tf32", None, True)),
        ("auto", H200, ("tf32", None, True)),
        ("fp32", H200, ("fp32", None, False)),  # strict: no TF32
        ("tf32", T4, ("fp32", None, False)),  # no TF32 units before Ampere
        ("tf32", A100, ("tf32", None, True)),
        ("fp16", T4, ("fp16", torch.float16, True)),
        ("bf16", H200, ("bf16", torch.bfloat16, True)),
        ("BF16", A100, ("bf16", torch.bfloat16, True)),
    ],
)
def test_precision_for_a_compute_capability(name, capability, expected):
    arithmetic = resolve_precision(name, "cuda:0", capability)
    assert (arithmetic.name, arithmetic.autocast, arithmetic.tf32) == expected


def test_bf16_on_a_gpu_without_native_bf16_warns():
    # torch.cuda.is_bf16_supported() says yes on a T4 (emulation); vpdetect says why it is slow.
    with pytest.warns(UserWarning, match="no native bfloat16"):
        assert resolve_precision("bf16", "cuda:1", T4).autocast == torch.bfloat16
    assert not native_bf16(V100) and not native_bf16(T4) and native_bf16(A100) and not native_bf16(None)


@pytest.mark.parametrize("name", ["auto", "fp32", "tf32", "bf16", "fp16"])
def test_the_cpu_is_always_float32(name):
    arithmetic = resolve_precision(name, "cpu")
    assert (arithmetic.name, arithmetic.dtype, arithmetic.tf32) == ("fp32", torch.float32, False)
    assert training_autocast_dtype("cpu") is None


def test_unknown_precision_is_a_one_line_error():
    assert check_precision(None) == "auto" and check_precision(" FP16 ") == "fp16"
    with pytest.raises(VPDetectError, match="unknown precision 'fp8'"):
        check_precision("fp8")
    with pytest.raises(VPDetectError, match="unknown precision"):
        resolve_precision("half", "cpu")


def test_training_amp_dtype_from_capability():
    assert training_autocast_dtype("cuda:0", T4) == torch.float16  # loss scaling on
    assert training_autocast_dtype("cuda:0", A100) == torch.bfloat16


def test_capability_is_asked_of_the_models_gpu_not_the_current_one(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or (7, 5))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert device_capability("cuda:3") == (7, 5) and asked == [3]
    assert device_capability("cpu") is None
    assert resolve_precision("auto", "cuda:2").name == "fp32" and asked[-1] == 2


def test_inference_arithmetic_is_a_no_op_off_cuda():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    with inference_arithmetic(resolve_precision("auto", "cpu"), "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == before


def test_cudnn_flags_hold_for_the_call_only():
    # Set per call and restored (not left switched on by every predict call); autocast
    # off for fp32 (so no CUDA is needed to check the flags).
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    with inference_arithmetic(resolve_precision("fp32", "cuda:0", (9, 0)), "cuda:0"):
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
    with inference_arithmetic(resolve_precision("auto", "cuda:0", (9, 0)), "cuda:0"):
        assert torch.backends.cudnn.allow_tf32
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == before
