"""Weighted focal loss (VP-Detector eq. 6) and its class weights."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpdetect.errors import VPDetectError
from vpdetect.nn.losses import (
    IGNORE_INDEX,
    alpha_from_counts,
    alpha_from_radii,
    focal_loss,
    parse_alpha,
)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, 3, generator=gen) * 3
    target = torch.randint(0, 4, (2, 5, 6, 3), generator=gen)
    return logits, target


def test_gamma_zero_alpha_one_is_cross_entropy(batch):
    logits, target = batch
    expected = F.cross_entropy(logits, target)
    assert torch.allclose(focal_loss(logits, target), expected, atol=1e-6)
    assert torch.allclose(focal_loss(logits, target, alpha=[1.0] * 4, gamma=0.0), expected, atol=1e-6)


def test_matches_equation_six_written_out(batch):
    logits, target = batch
    alpha = torch.tensor([0.5, 1.0, 2.0, 4.0])
    gamma = 1.5
    p = torch.softmax(logits, dim=1)
    g = F.one_hot(target, 4).permute(0, 4, 1, 2, 3).float()
    n_voxels = target.numel()
    expected = -(alpha.view(1, 4, 1, 1, 1) * (1 - p) ** gamma * g * torch.log(p)).sum() / n_voxels
    assert torch.allclose(focal_loss(logits, target, alpha, gamma), expected, rtol=1e-5)


def test_confident_correct_voxel_contributes_less_as_gamma_grows():
    # One voxel, two classes, p(correct) = 0.9.
    logits = torch.tensor([math.log(0.9), math.log(0.1)]).view(1, 2, 1, 1, 1)
    target = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    losses = [focal_loss(logits, target, gamma=g).item() for g in (0.0, 0.5, 1.0, 2.0, 5.0)]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))
    assert losses[3] == pytest.approx(-math.log(0.9) * 0.1**2, rel=1e-5)
    # A wrong, confident voxel keeps nearly all of its loss.
    wrong = torch.ones(1, 1, 1, 1, dtype=torch.long)
    assert focal_loss(logits, wrong, gamma=2.0).item() == pytest.approx(-math.log(0.1) * 0.9**2, rel=1e-5)


def test_ignored_voxels_take_no_part(batch):
    logits, target = batch
    masked = target.clone()
    masked[0] = IGNORE_INDEX
    expected = focal_loss(logits[1:], target[1:], gamma=2.0)
    assert torch.allclose(focal_loss(logits, masked, gamma=2.0), expected, atol=1e-6)
    per_voxel = focal_loss(logits, masked, gamma=2.0, reduction="none")
    assert per_voxel[0].abs().max() == 0
    logits.requires_grad_(True)
    focal_loss(logits, masked, gamma=2.0).backward()
    assert logits.grad[0].abs().max() == 0


def test_gradient_stays_finite_for_certain_voxels():
    logits = torch.tensor([60.0, -60.0]).view(1, 2, 1, 1, 1).requires_grad_(True)
    target = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    focal_loss(logits, target, gamma=0.5).backward()
    assert torch.isfinite(logits.grad).all()


def test_alpha_from_radii_weighs_small_particles_more():
    alpha = alpha_from_radii([2.0, 4.0, 3.0])
    assert alpha[0] == 1.0
    weights = np.array(alpha[1:])
    assert np.mean(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(8.0)  # (4/2)^3: inverse particle volume
    assert weights[0] > weights[2] > weights[1]
    with pytest.raises(VPDetectError, match="positive"):
        alpha_from_radii([1.0, 0.0])


def test_alpha_from_counts_is_inverse_frequency_and_capped():
    assert alpha_from_counts([1000, 100, 10, 0]) == [1.0, 10.0, 100.0, 1.0]
    assert alpha_from_counts([10**6, 1], max_ratio=50) == [1.0, 50.0]


def test_parse_alpha_modes_and_errors():
    names = ["background", "a", "b"]
    assert parse_alpha("none", names, None, None) is None
    assert parse_alpha("radius", names, {"a": 1.0, "b": 2.0}, None) == alpha_from_radii([1.0, 2.0])
    assert parse_alpha("frequency", names, None, [100, 10, 1]) == [1.0, 10.0, 100.0]
    assert parse_alpha("1,2,3", names, None, None) == [1.0, 2.0, 3.0]
    with pytest.raises(VPDetectError, match="unknown for: b"):
        parse_alpha("radius", names, {"a": 1.0}, None)
    with pytest.raises(VPDetectError, match="3 non-negative weights"):
        parse_alpha("1,2", names, None, None)
    with pytest.raises(VPDetectError, match="none, radius, frequency"):
        parse_alpha("big", names, None, None)
