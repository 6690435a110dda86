"""`make gpu-check` on a machine without CUDA, and its report helpers (no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import NO_CUDA_EXIT, compare_maps, format_table, summary_rows  # noqa: E402


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # no GPU, even on a machine that has one
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == NO_CUDA_EXIT != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device is available"), done.stderr
    assert done.stdout == "" and not out.exists()


def test_make_gpu_check_refuses_too(tmp_path):
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("make is not installed")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}",
                           f"GPU_REPORT={tmp_path / 'r.json'}"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode != 0 and "gpu-check: no CUDA device is available" in done.stderr


def test_map_comparison_by_hand():
    reference = np.array([0.1, 0.49, 0.51, 0.9], np.float16)
    other = np.array([0.1, 0.52, 0.51, 0.8], np.float32)
    result = compare_maps(reference, other, 0.5)
    assert result["decision_flips"] == 0.25  # one voxel of four crosses the threshold
    assert result["max_abs_diff"] == pytest.approx(0.1, abs=1e-3)
    assert result["mean_abs_diff"] == pytest.approx((0.03 + 0.1) / 4, abs=1e-3)
    with pytest.raises(ValueError, match="shapes"):
        compare_maps(reference, other[:3], 0.5)


def test_summary_table_of_a_report():
    report = {"sections": {
        "gpu_tests": {"returncode": 0, "summary": "9 passed in 4.1s", "seconds": 5.0},
        "precision": {"runs": {"fp32": {"f1": 0.91, "network_s": 0.5},
                               "bf16": {"f1": 0.9, "network_s": 0.3, "max_abs_diff": 0.02,
                                        "mean_abs_diff": 0.001, "decision_flips": 0.0004}}, "seconds": 9.0},
        "train": {"error": "RuntimeError: CUDA out of memory", "seconds": 1.0},
    }}
    rows = summary_rows(report)
    assert ("gpu_tests", "pytest -m gpu", "9 passed in 4.1s") in rows
    assert ("precision", "bf16", "F1 0.900, network 0.30 s, max |diff| 2.00e-02, flips 0.040 %") in rows
    assert ("train", "ERROR", "RuntimeError: CUDA out of memory") in rows
    table = format_table(rows)
    assert len(table.splitlines()) == len(rows) and json.dumps(report)
