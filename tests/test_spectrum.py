import numpy as np
import pytest
from scipy import ndimage

from vpdetect.errors import VPDetectError
from vpdetect.spectrum import (
    SHELLS,
    match_spectrum,
    matching_gain,
    radial_profile,
    reference_profile,
)


def test_white_noise_has_a_flat_profile_and_smoothing_makes_it_fall(rng):
    noise = rng.normal(size=(128, 128, 128))
    flat = radial_profile(noise)
    assert flat.shape == (SHELLS,)
    assert np.sqrt(np.mean(flat**2)) == pytest.approx(1.0)  # unit RMS: units do not matter
    assert np.all(np.abs(flat[4:] - 1.0) < 0.1)  # the lowest shells feel the taper window
    smooth = radial_profile(ndimage.gaussian_filter(noise, 1.5))
    assert np.all(np.diff(smooth[3:20]) < 0)  # a Gaussian's transfer falls with frequency
    assert smooth[0] > 10 * smooth[20]
    assert np.allclose(radial_profile(5.0 * noise + 3.0), flat)  # gain and offset free
    small = radial_profile(rng.normal(size=(16, 16, 16)))  # shells finer than its frequency spacing
    assert np.all(small > 0.5)


def test_matching_gives_the_reference_profile_and_leaves_the_mean(rng):
    noise = rng.normal(size=(48, 56, 64)).astype(np.float32)
    target = reference_profile([ndimage.gaussian_filter(rng.normal(size=(64, 64, 64)), 1.0)])
    source = (ndimage.gaussian_filter(noise, 0.6) + 2.0).astype(np.float32)
    matched = match_spectrum(source, target, max_gain=10.0)
    assert matched.dtype == np.float32 and matched.shape == source.shape
    assert float(matched.mean()) == pytest.approx(float(source.mean()), abs=1e-3)
    got = radial_profile(matched)
    assert np.max(np.abs(got[3:24] / np.asarray(target)[3:24] - 1.0)) < 0.1
    # matching to its own profile changes (almost) nothing
    same = match_spectrum(source, radial_profile(source), max_gain=10.0)
    assert np.abs(same - source).max() < 0.05 * source.std()


def test_gain_is_capped_and_bad_inputs_are_refused(rng):
    profile = np.full(4, 1e-6)
    assert np.all(matching_gain(profile, [1.0, 1.0, 1.0, 1.0], max_gain=3.0) == 3.0)
    assert np.all(matching_gain(profile, [1.0, 1.0, 1.0, 1.0]) == 1.0)  # by default nothing is raised
    with pytest.raises(VPDetectError, match="4 non-negative numbers"):
        matching_gain(np.ones(4), [1.0, -1.0, 1.0, 1.0])
    with pytest.raises(VPDetectError, match="4 non-negative numbers"):
        matching_gain(np.ones(4), [1.0, 1.0])
    with pytest.raises(VPDetectError, match="constant"):
        radial_profile(np.ones((8, 8, 8)))
    with pytest.raises(VPDetectError, match="at least 4 voxels"):
        radial_profile(np.ones((2, 8, 8)))
    with pytest.raises(VPDetectError, match="at least one volume"):
        reference_profile([])


def test_gold_beads_do_not_own_the_profile(rng):
    # A bead at 50x a particle's contrast would dominate the raw spectrum; the profile is
    # measured on the clipped volume, as the robust normalisation clips.
    noise = ndimage.gaussian_filter(rng.normal(size=(64, 64, 64)), 1.0)
    z, y, x = np.indices(noise.shape)
    gold = noise.copy()
    gold[(z - 20) ** 2 + (y - 30) ** 2 + (x - 40) ** 2 <= 9] -= 50 * noise.std()
    # (the clipped bead's sharp edge still adds a little where this smooth noise has almost nothing)
    assert np.max(np.abs(radial_profile(gold)[2:24] / radial_profile(noise)[2:24] - 1.0)) < 0.15
