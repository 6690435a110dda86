"""The straightforward MSDNet evaluation, kept as a correctness and speed baseline.

Every layer concatenates all earlier maps into a fresh tensor and runs one
dilated `conv3d` per output channel over it: the textbook reading of the
paper's dense connectivity. It reads the same weights as `MSDNet` (see the
layout in `vpdetect.nn.msdnet`) and must agree with `MSDNet.forward`; it is
only for tests and the benchmarks, never for production.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vpdetect.nn.msdnet import NEGATIVE_SLOPE, MSDNet


@torch.no_grad()
def concat_forward(model: MSDNet, x: torch.Tensor) -> torch.Tensor:
    """Class logits (N, n_classes, D, H, W), rebuilding the concatenated input every layer."""
    return concat_logits(model, x)


def concat_logits(model: MSDNet, x: torch.Tensor) -> torch.Tensor:
    """`concat_forward` with autograd (the training baseline of `benchmarks/bench_training.py`)."""
    maps = [x.to(torch.float32)]
    for i in range(model.depth):
        source = torch.cat(maps, dim=1)
        weight = model.layer_weights[i]
        bias = model.layer_biases[i]
        for j, dil in enumerate(model.dilations[i]):
            out = F.conv3d(source, weight[j : j + 1], bias[j : j + 1], padding=dil, dilation=dil)
            maps.append(F.leaky_relu(out, NEGATIVE_SLOPE))
    return model.final(torch.cat(maps, dim=1))


@torch.no_grad()
def concat_predict(model: MSDNet, x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities from `concat_forward`, like `MSDNet.predict`."""
    return torch.softmax(concat_forward(model, x), dim=1)
