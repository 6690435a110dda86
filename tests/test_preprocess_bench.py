"""The preprocessing benchmark's deconvolution filter and its plumbing on a tiny annotated scene."""

import json

import numpy as np

from benchmarks import bench_preprocess as bench
from tests.test_localize_cli import intensity_localizer
from tests.test_tune import shrec_folder


def test_deconvolution_filter_keeps_contrast_and_follows_the_ctf():
    radius = np.linspace(0.0, 0.5, 201)
    gain = bench.deconvolution_gain(radius, voxel_nm=1.0, defocus_um=3.0)
    assert gain[0] == 0.0  # the mean goes (high-pass)
    assert np.all(gain[2:20] > 0)  # low frequencies keep their sign: dense matter stays dark
    assert gain[2:20].max() > 1.0  # and are boosted where the CTF is weak
    # it changes sign where the CTF does: the first zero of sin(chi + asin(A))
    from vpdetect.simulate.microscope import electron_wavelength_nm

    lam = electron_wavelength_nm(300.0)
    chi = np.pi * lam * 3e3 * radius**2 - 0.5 * np.pi * 2.7e6 * lam**3 * radius**4
    first_zero = radius[np.argmax(chi + np.arcsin(0.07) > np.pi)]
    crossing = radius[np.argmax(gain[1:] < 0) + 1]
    assert abs(crossing - first_zero) <= 0.5 / 200 + 1e-9


def test_benchmark_scores_every_variant(tmp_path, rng):
    from vpdetect.nn.checkpoint import load_model, save_model
    from vpdetect.spectrum import reference_profile

    folder = tmp_path / "val"
    volume = shrec_folder(folder, rng)
    (folder / "simulation.json").write_text(json.dumps({"microscope": {"defocus_um": 3.0, "snr": 1.0}}))
    model = intensity_localizer(tmp_path / "loc.pt", volume)
    net, card = load_model(model)
    post = {"threshold": 0.5, "bandwidth_factor": 2.0, "merge_factor": 1.0, "min_size": 5, "max_component": 0.0}
    save_model(model, net, {**card, "spectrum_reference": reference_profile([volume]), "postprocess": post})
    scores = bench.run(["--model", str(model), "--data", str(folder), "--work-dir", str(tmp_path / "work")])
    assert set(scores) == set(bench.VARIANTS)
    assert scores["none"] == [1.0]
    assert scores["matched (cap 1)"] == [1.0]  # matched to its own spectrum
    assert all(0.0 <= s[0] <= 1.0 for s in scores.values())
