"""Test-time flips: a prediction averaged over axis flips of the input.

Only flips of z, y and x are used: they keep a single-axis tilt's missing wedge
where it is (a wedge about the tilt axis is symmetric under each of them), where
90-degree turns would move it. Both stages use them: the classifier on boxes, the
localizer on tiles (a flipped tile with its symmetric halo gives the map of the
flipped tomogram, so averaging tiles equals averaging whole-volume passes).
"""

from __future__ import annotations

from collections.abc import Callable

from vpdetect.errors import VPDetectError

# The flips in order of use, as (z, y, x) dims of an (N, C, D, H, W) tensor: n flips = the first n.
FLIP_DIMS = ((), (4,), (3,), (3, 4), (2,), (2, 4), (2, 3), (2, 3, 4))


def check_flips(flips) -> int:
    """The number of flips as an int, or a one-line error unless a whole number in 1..8."""
    if isinstance(flips, bool) or not isinstance(flips, int | float) or flips != int(flips) \
            or not 1 <= flips <= len(FLIP_DIMS):
        raise VPDetectError(f"test-time flips must be a whole number from 1 to {len(FLIP_DIMS)}, got {flips!r}")
    return int(flips)


def resolve_flips(given: int | None, card: dict) -> int:
    """The flips to use: those given, else the model card's "test_time_flips", else 1 (checked)."""
    return check_flips(given if given is not None else card.get("test_time_flips", 1))


def flip_averaged(predict: Callable, inputs, flips: int):
    """The mean of `predict(flip(inputs))` flipped back over the first `flips` flips.

    `predict` maps an (N, C, D, H, W) tensor to maps of the same shape, which are flipped
    back, or to one row per sample (N, classes), which is not; the result is float32.
    With flips=1 it is `predict(inputs)` itself."""
    import torch

    total = predict(inputs).float()
    for dims in FLIP_DIMS[1:check_flips(flips)]:
        out = predict(torch.flip(inputs, dims)).float()
        total += torch.flip(out, dims) if out.ndim == inputs.ndim else out
    return total / flips if flips > 1 else total
