"""The pipeline benchmark's timing helper takes every classifier `pick` can use."""

import pytest
from test_train import _one_thread  # noqa: F401  (autouse: one torch thread)

from benchmarks.bench_pipeline import _predict_seconds_per_voxel
from vpdetect.nn.classifiers import build_box_classifier
from vpdetect.nn.msdnet import MSDNet


@pytest.mark.parametrize("engine", [True, False])
def test_seconds_per_voxel_for_an_msdnet_and_a_box_classifier(engine):
    msdnet = MSDNet(in_channels=1, n_classes=2, width=1, depth=3, max_dilation=2).eval()
    assert _predict_seconds_per_voxel(msdnet, (1, 12, 12, 12), engine=engine) > 0
    # A whole-box classifier has no engine: vpdetect's path is its own predict (this failed).
    boxes = build_box_classifier("dsrf3d-v2", n_classes=3, box_size=12, width_divisor=8).eval()
    assert _predict_seconds_per_voxel(boxes, (2, 12, 12, 12), engine=engine) > 0
