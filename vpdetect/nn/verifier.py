"""The pick verifier: a small 3D CNN that scores one localizer pick from a box around it.

The localizer's MSDNet labels voxels; some of its false picks are objects that only look like
particles voxel by voxel (a textured carbon film's grains, the thick edge of an ice gradient).
The verifier sees the whole box around a pick, two channels of it: the tomogram as the
localizer sees it (normalised, cleaned) and the localizer's map. It is trained on the
localizer's own picks on simulated tomograms, labelled true or false by the SHREC hit rule
(`vpdetect train-verifier`), in the spirit of the two-stage pickers of the seed papers, whose
second stage classifies whole subtomograms. It lives inside the localizer's model file (the
`verifier` submodule and the card's `verifier` entry), because it reads that network's map.
"""

from __future__ import annotations

import torch
from torch import nn

VERIFIER_ARCH_KEYS = ("in_channels", "width", "box_size")
VERIFIER_NAME = "pick-verifier"
# The channels a verifier reads, in order.
VERIFIER_CHANNELS = ("input", "map")


def check_box_size(box_size: int) -> None:
    """Two 2x poolings need a box edge that is a positive multiple of 4."""
    if box_size < 4 or box_size % 4:
        raise ValueError(f"verifier box size must be a multiple of 4, got {box_size}")


def _conv(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(n_in, n_out, 3, padding=1, bias=False), nn.BatchNorm3d(n_out),
                         nn.ReLU(inplace=True))


class PickVerifier(nn.Module):
    """Two 3x3x3 convolutions at widths w, 2w (each then 2x max pooling), one at 4w, global average
    pooling, dropout and one logit: P(the box's centre is a particle) = sigmoid(output)."""

    def __init__(self, in_channels: int = 2, width: int = 16, box_size: int = 24):
        super().__init__()
        check_box_size(box_size)
        self.in_channels, self.width, self.box_size = int(in_channels), int(width), int(box_size)
        w = self.width
        self.features = nn.Sequential(
            _conv(in_channels, w), _conv(w, w), nn.MaxPool3d(2),
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool3d(2),
            _conv(2 * w, 4 * w), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(4 * w, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [n] of boxes [n, C, B, B, B]."""
        return self.head(self.features(x))[:, 0]

    def arch(self) -> dict:
        return {"name": VERIFIER_NAME, "in_channels": self.in_channels, "width": self.width,
                "box_size": self.box_size}


def check_verifier_arch(arch) -> None:
    """Raise ValueError unless `arch` describes a pick verifier that can be built."""
    if not isinstance(arch, dict) or arch.get("name") != VERIFIER_NAME or any(
        not isinstance(arch.get(k), int) or isinstance(arch.get(k), bool) or arch[k] < 1 for k in VERIFIER_ARCH_KEYS
    ):
        raise ValueError(f"model card has an incomplete pick-verifier architecture {arch!r}")
    check_box_size(arch["box_size"])


def build_verifier(arch: dict) -> PickVerifier:
    """The (untrained) verifier a card's `verifier.arch` describes."""
    check_verifier_arch(arch)
    return PickVerifier(**{k: arch[k] for k in VERIFIER_ARCH_KEYS})
