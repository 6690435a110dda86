"""Membranes erased before the localizer: the sheet detector, the eraser and the pipeline option."""

import numpy as np
import pytest

from tests.test_localize_cli import card, intensity_localizer
from vpdetect.localize.membranes import (
    MIN_SHEET_NM3,
    drop_remnants,
    erase_membranes,
    membrane_mask,
    sheetness,
    symmetric_eigenvalues,
)

SHAPE = (48, 72, 72)  # [z, y, x]
BALLS = [(12.0, 14.0, 14.0), (14.0, 50.0, 20.0), (32.0, 20.0, 40.0), (34.0, 54.0, 36.0)]  # [z, y, x]
SHEET_X = (58, 61)  # a bilayer-like dense plane across the whole volume, 3 voxels thick


def membrane_scene(rng, noise=0.3, sheet=True):
    """Dense (bright) balls of radius 4 and a dense plane on noise: (volume, ball mask, sheet mask)."""
    z, y, x = np.indices(SHAPE)
    volume = rng.normal(0.0, noise, SHAPE).astype(np.float32)
    balls = np.zeros(SHAPE, dtype=bool)
    for c in BALLS:
        balls |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 16
    plane = (x >= SHEET_X[0]) & (x < SHEET_X[1]) if sheet else np.zeros(SHAPE, dtype=bool)
    volume[balls | plane] += 1.0
    return volume, balls, plane


def test_closed_form_eigenvalues_match_numpy(rng):
    a = rng.normal(size=(500, 3, 3))
    a = a + a.transpose(0, 2, 1)
    a[:5] = np.eye(3) * rng.normal(size=(5, 1, 1))  # multiples of the identity: a triple root
    a[5:10] = np.diag([1.0, 1.0, -2.0])  # a double root
    got = np.stack(symmetric_eigenvalues(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]), 1)
    np.testing.assert_allclose(got, np.linalg.eigvalsh(a), atol=1e-9)


def test_sheetness_is_high_on_a_sheet_and_low_on_balls_and_rods():
    z, y, x = np.indices((40, 40, 40))
    sheet = (np.abs(x - 20) <= 1).astype(np.float32)
    ball = ((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 9).astype(np.float32)
    rod = (((y - 20) ** 2 + (x - 20) ** 2) <= 2).astype(np.float32)
    on_sheet = sheetness(sheet, 1.5)[20, 20, 20]
    assert on_sheet > 0.2
    assert sheetness(ball, 1.5)[20, 20, 20] < 0.1 * on_sheet
    assert sheetness(rod, 1.5)[20, 20, 20] < 0.1 * on_sheet


def test_sheetness_in_chunks_equals_one_pass(rng):
    volume = rng.normal(size=(23, 20, 18)).astype(np.float32)
    np.testing.assert_allclose(sheetness(volume, 1.5, chunk=4), sheetness(volume, 1.5, chunk=100), atol=1e-5)


def test_membrane_mask_finds_the_sheet_and_spares_the_particles(rng):
    volume, balls, plane = membrane_scene(rng)
    mask = membrane_mask(volume, voxel_nm=1.0)
    assert mask[plane].mean() > 0.9
    assert not mask[balls].any()
    assert mask[~plane].mean() < 0.05  # the sheet's flanks (one voxel grown) and nothing else
    # A patch smaller than MIN_SHEET_NM3 is no membrane.
    patch = np.zeros(SHAPE, dtype=np.float32)
    patch[10:30, 10:30, 40:43] = 1.0
    assert patch.sum() < MIN_SHEET_NM3
    assert not membrane_mask(patch + rng.normal(0, 0.3, SHAPE).astype(np.float32), voxel_nm=1.0).any()
    # Without a sheet nothing is erased.
    volume, _, _ = membrane_scene(rng, sheet=False)
    assert not membrane_mask(volume, voxel_nm=1.0).any()


def test_erase_replaces_only_the_sheet_in_either_contrast_and_is_deterministic(rng):
    volume, balls, plane = membrane_scene(rng)
    erased, mask = erase_membranes(volume, 0.0, 0.3, dense_sign=1.0, voxel_nm=1.0)
    again, _ = erase_membranes(volume, 0.0, 0.3, dense_sign=1.0, voxel_nm=1.0)
    np.testing.assert_array_equal(erased, again)
    changed = erased != volume
    np.testing.assert_array_equal(mask, changed)
    assert not changed[balls].any() and changed[plane].mean() > 0.9
    assert abs(float(erased[plane].mean())) < 0.1  # background now, not the sheet's 1.0
    # Dark contrast (a standard reconstruction) with the normalisation's negated scale: the mirror image.
    dark, _ = erase_membranes(-volume, 0.0, -0.3, dense_sign=-1.0, voxel_nm=1.0)
    np.testing.assert_array_equal(dark, -erased)


def test_localize_erases_membranes_when_asked_or_when_the_card_says(tmp_path, rng):
    from vpdetect import api
    from vpdetect.nn.checkpoint import bundle_model

    volume, _, _ = membrane_scene(rng, noise=0.1)
    model = intensity_localizer(tmp_path / "localizer.pt", volume)
    kept = api.localize(volume, model, voxel_size=10.0, bandwidth=4, contrast="bright")
    erased = api.localize(volume, model, voxel_size=10.0, bandwidth=4, contrast="bright", erase_membranes=True)
    # Without erasing, mean-shift cuts the plane into a row of false picks.
    assert (kept["x"] > SHEET_X[0] - 2).sum() > 3
    got = erased[["z", "y", "x"]].to_numpy()
    assert len(got) == len(BALLS)
    assert all(np.min(np.linalg.norm(got - np.asarray(c), axis=1)) < 1.0 for c in BALLS)
    bundle_model(model, tmp_path / "erasing.pt", {"erase_membranes": True})
    by_card = api.localize(volume, tmp_path / "erasing.pt", voxel_size=10.0, bandwidth=4, contrast="bright")
    np.testing.assert_allclose(by_card[["z", "y", "x"]].to_numpy(), got)
    off = api.localize(volume, tmp_path / "erasing.pt", voxel_size=10.0, bandwidth=4, contrast="bright",
                       erase_membranes=False)
    assert len(off) == len(kept)


@pytest.mark.parametrize("flag", ["erase_membranes", "remove_gold_streaks", "drop_gold"])
def test_a_card_with_a_non_boolean_cleaning_flag_is_refused(flag):
    from vpdetect.errors import VPDetectError
    from vpdetect.nn.checkpoint import check_inference_card

    check_inference_card({**card(), flag: True}, "localizer")
    with pytest.raises(VPDetectError, match=f"{flag} must be true or false"):
        check_inference_card({**card(), flag: "yes"}, "localizer")


def test_drop_remnants_removes_thin_pieces_beside_the_erased_region_only():
    z, y, x = np.indices((30, 40, 40))
    erased = (x >= 18) & (x < 21)  # an erased plane
    prob = np.zeros(erased.shape, dtype=np.float32)
    ball = (z - 15) ** 2 + (y - 10) ** 2 + (x - 25) ** 2 <= 9  # a particle 2 voxels from it
    piece = (x == 22) & (y >= 25) & (y < 35) & (z >= 5) & (z < 15)  # a one-voxel-thin leftover beside it
    far = (x == 35) & (y >= 25) & (y < 35) & (z >= 5) & (z < 15)  # the same shape far away
    prob[ball | piece | far] = 0.9
    assert drop_remnants(prob, erased, 0.5) == 1
    assert (prob[piece] == 0).all() and (prob[ball] == 0.9).all() and (prob[far] == 0.9).all()
    assert drop_remnants(prob, np.zeros_like(erased), 0.5) == 0


def test_drop_remnants_removes_weak_blobs_near_the_erased_region_only():
    z, y, x = np.indices((30, 40, 60))
    erased = (x >= 10) & (x < 13)  # an erased plane

    def ball(cx, cy):
        return (z - 15) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= 9

    prob = np.zeros(erased.shape, dtype=np.float32)
    weak_near, strong_near, weak_far = ball(21, 10), ball(21, 30), ball(45, 20)  # 8, 8 and 32 voxels away
    prob[weak_near | weak_far] = 0.6
    prob[strong_near] = 0.9
    assert drop_remnants(prob, erased, 0.5) == 1
    assert (prob[weak_near] == 0).all()
    assert (prob[strong_near] == 0.9).all() and (prob[weak_far] == 0.6).all()


def test_cleaning_steps_are_timed_as_their_own_phases_and_the_bundled_localizer_cleans(tmp_path, rng):
    from vpdetect.io.mrc import Tomogram
    from vpdetect.localize.pipeline import LocalizeOptions, format_timings, localize_volume
    from vpdetect.models import default_model_path
    from vpdetect.nn.checkpoint import load_model

    volume, _, _ = membrane_scene(rng, noise=0.1)
    model, card = load_model(intensity_localizer(tmp_path / "localizer.pt", volume))
    tomo = Tomogram(data=volume, voxel_size=10.0)
    for erase in (False, True):
        options = LocalizeOptions(bandwidth=4, contrast="bright", erase_membranes=erase,
                                  remove_gold_streaks=erase).with_model_defaults(card)
        _, timings = localize_volume(tomo, model, card, options)
        assert ("membranes" in timings) == erase and ("gold" in timings) == erase
    assert format_timings(timings).startswith("load ") and ", gold " in format_timings(timings)
    assert ", membranes " in format_timings(timings)
    bundled = load_model(default_model_path("localizer"))[1]
    assert bundled["erase_membranes"] is True and bundled["remove_gold_streaks"] is True
