"""Stage 2: extraction, central-component masking, voting, and the classify pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpdetect.classify.extract import extract_boxes, inside_volume, round_to_voxel
from vpdetect.classify.vote import Vote, central_mask, central_vote, vote_in_mask


def ball(shape, centre_zyx, radius):
    zz, yy, xx = np.indices(shape)
    cz, cy, cx = centre_zyx
    return (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


# ---------------------------------------------------------------- extraction


def test_round_to_voxel_halves_go_up():
    assert round_to_voxel(np.array([0.49, 0.5, 1.5, -0.5, -0.51, 2.0])).tolist() == [0, 1, 2, 0, -1, 2]


def test_inside_volume_uses_rounded_coordinates():
    shape_zyx = (4, 5, 6)  # x size 6, y 5, z 4
    coords = np.array(
        [
            [0, 0, 0],
            [-0.49, 0, 0],  # rounds to 0: inside
            [-0.51, 0, 0],  # rounds to -1: outside
            [5.49, 4.49, 3.49],  # last voxel
            [5.5, 0, 0],  # rounds to 6 = x size: outside
            [0, 0, 3.5],  # z rounds to 4: outside
            [np.nan, 0, 0],
        ]
    )
    assert inside_volume(coords, shape_zyx).tolist() == [True, True, False, True, False, False, False]


def test_extract_box_equals_normalised_window(rng):
    volume = rng.normal(3.0, 2.0, size=(20, 22, 24)).astype(np.float32)
    mean, std = 3.0, 2.0
    coords = np.array([[10.2, 11.0, 9.6], [12, 8, 10]])  # x, y, z
    boxes = extract_boxes(volume, coords, 6, mean, std)
    assert boxes.shape == (2, 6, 6, 6) and boxes.dtype == np.float32
    # centre (x=10, y=11, z=10) sits at index 3 of a 6-box: window [7, 13) on each axis
    expected = (volume[7:13, 8:14, 7:13] - mean) / std
    np.testing.assert_allclose(boxes[0], expected, rtol=1e-6)
    expected_1 = (volume[7:13, 5:11, 9:15] - mean) / std
    np.testing.assert_allclose(boxes[1], expected_1, rtol=1e-6)
    # the box centre is the coordinate's voxel
    assert boxes[0][3, 3, 3] == pytest.approx((volume[10, 11, 10] - mean) / std)


def test_extract_pads_edges_with_the_mean(rng):
    volume = rng.normal(5.0, 1.0, size=(10, 10, 10)).astype(np.float32)
    mean, std = float(volume.mean()), float(volume.std())
    corner = extract_boxes(volume, np.array([[0.0, 0.0, 0.0]]), 5, mean, std)[0]
    # odd box: centre index 2, so two padded planes before the volume on each axis
    assert np.all(corner[:2] == 0) and np.all(corner[:, :2] == 0) and np.all(corner[:, :, :2] == 0)
    np.testing.assert_allclose(corner[2:, 2:, 2:], (volume[:3, :3, :3] - mean) / std, rtol=1e-5)
    far = extract_boxes(volume, np.array([[9.0, 9.0, 9.0]]), 4, mean, std)[0]
    # even box: centre index 2 -> window [7, 11), one padded plane after the volume
    np.testing.assert_allclose(far[:3, :3, :3], (volume[7:, 7:, 7:] - mean) / std, rtol=1e-5)
    assert np.all(far[3] == 0) and np.all(far[:, 3] == 0) and np.all(far[:, :, 3] == 0)
    # a coordinate far outside yields an all-padding box, not an error
    assert np.all(extract_boxes(volume, np.array([[50.0, 50.0, 50.0]]), 4, mean, std) == 0)


def test_extract_reads_memory_maps(tmp_path, rng):
    volume = rng.normal(size=(12, 12, 12)).astype(np.float32)
    path = tmp_path / "v.npy"
    np.save(path, volume)
    mapped = np.load(path, mmap_mode="r")
    coords = np.array([[3.0, 4.0, 5.0]])
    np.testing.assert_array_equal(
        extract_boxes(mapped, coords, 7, 0.0, 1.0), extract_boxes(volume, coords, 7, 0.0, 1.0)
    )


# ---------------------------------------------------------------- masking and voting


def test_vote_follows_central_particle_not_larger_neighbour(rng):
    shape = (24, 24, 24)
    labels = np.zeros(shape, dtype=np.int64)
    neighbour = ball(shape, (12, 12, 22), 9) & ~ball(shape, (12, 12, 12), 5)
    labels[neighbour] = 1  # a big class-1 neighbour filling much of the box
    central = ball(shape, (12, 12, 12), 3)
    labels[central] = 2
    # keep a background gap so the two are separate components
    labels[ball(shape, (12, 12, 12), 5) & ~central] = 0
    # sprinkle mislabelled voxels inside the central particle (30 %)
    noisy = central & (rng.random(shape) < 0.3)
    labels[noisy] = 3
    assert np.count_nonzero(labels == 1) > 5 * np.count_nonzero(central)
    vote = central_vote(labels, 4)
    assert vote.class_index == 2
    n_central = np.count_nonzero(central)
    assert vote.fraction == pytest.approx(np.count_nonzero(central & ~noisy) / n_central)
    assert vote.margin == pytest.approx(
        (np.count_nonzero(central & ~noisy) - np.count_nonzero(noisy)) / n_central
    )


def test_vote_counts_only_the_central_component():
    shape = (16, 16, 16)
    labels = np.zeros(shape, dtype=np.int64)
    labels[ball(shape, (8, 8, 8), 2)] = 1
    labels[ball(shape, (8, 8, 8), 2) & (np.indices(shape)[2] > 8)] = 2  # 1 wins inside
    labels[ball(shape, (8, 8, 14), 1)] = 2  # a separate class-2 blob: not counted
    labels[0:3, 0:3, 0:3] = 2
    mask = central_mask(labels)
    assert mask.sum() == ball(shape, (8, 8, 8), 2).sum()
    vote = central_vote(labels, 3)
    n1 = np.count_nonzero(labels[mask] == 1)
    assert vote == Vote(1, pytest.approx(n1 / mask.sum()), pytest.approx((2 * n1 - mask.sum()) / mask.sum()))
    # counting every foreground voxel in the box would have chosen class 2
    assert np.count_nonzero(labels == 2) > np.count_nonzero(labels == 1)


def test_ties_break_by_probability_then_lowest_index():
    labels = np.zeros((9, 9, 9), dtype=np.int64)
    labels[4, 4, 2:6] = [3, 2, 3, 2]  # one component, two voxels each of classes 2 and 3
    assert central_vote(labels, 4) == Vote(2, 0.5, 0.0)
    # permuting which voxels hold which class does not change the answer
    labels[4, 4, 2:6] = [2, 3, 2, 3]
    assert central_vote(labels, 4) == Vote(2, 0.5, 0.0)
    probs = np.zeros((4, 9, 9, 9))
    probs[3, 4, 4, 2:6] = 0.6
    probs[2, 4, 4, 2:6] = 0.4
    assert central_vote(labels, 4, probs=probs) == Vote(3, 0.5, 0.0)
    # equal probabilities too: back to the lowest index
    probs[2] = probs[3]
    assert central_vote(labels, 4, probs=probs).class_index == 2


def test_background_centre_uses_nearest_component_within_radius():
    shape = (15, 15, 15)
    labels = np.zeros(shape, dtype=np.int64)
    labels[7, 7, 10:12] = 1  # 3 voxels from the centre (7, 7, 7)
    labels[7, 7, 2:4] = 2  # 4 voxels from the centre
    assert central_vote(labels, 3, search_radius=0) == Vote(0, 0.0, 0.0)
    assert central_vote(labels, 3, search_radius=2.9).class_index == 0
    assert central_vote(labels, 3, search_radius=3) == Vote(1, 1.0, 1.0)
    labels[7, 7, 10:12] = 0
    assert central_vote(labels, 3, search_radius=3).class_index == 0
    assert central_vote(labels, 3, search_radius=4.5) == Vote(2, 1.0, 1.0)
    # hollow particle: a shell of class 2 around a background centre
    shell = ball(shape, (7, 7, 7), 4) & ~ball(shape, (7, 7, 7), 2.5)
    shell_labels = np.where(shell, 2, 0)
    assert central_vote(shell_labels, 3, search_radius=3).class_index == 2
    assert central_vote(shell_labels, 3, search_radius=2).class_index == 0


def test_empty_box_and_out_of_range_labels():
    assert central_vote(np.zeros((5, 5, 5), dtype=int), 3, search_radius=2) == Vote(0, 0.0, 0.0)
    labels = np.zeros((5, 5, 5), dtype=int)
    labels[2, 2, 2] = 5
    with pytest.raises(ValueError):
        central_vote(labels, 3)


def _reference_vote(labels, n_classes):
    """Brute force: flood-fill from the centre over face neighbours, then count."""
    from collections import deque

    centre = tuple(s // 2 for s in labels.shape)
    if labels[centre] == 0:
        return 0, 0.0, 0.0
    seen = {centre}
    queue = deque([centre])
    while queue:
        p = queue.popleft()
        for axis in range(3):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                q = tuple(q)
                if all(0 <= q[k] < labels.shape[k] for k in range(3)) and q not in seen and labels[q] > 0:
                    seen.add(q)
                    queue.append(q)
    counts = np.zeros(n_classes, dtype=int)
    for p in seen:
        counts[labels[p]] += 1
    ranked = sorted(range(1, n_classes), key=lambda c: (-counts[c], c))
    total = len(seen)
    return ranked[0], counts[ranked[0]] / total, (counts[ranked[0]] - counts[ranked[1]]) / total


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    size=st.integers(3, 9),
    density=st.floats(0.3, 0.8),
)
def test_vote_matches_flood_fill_reference(seed, size, density):
    gen = np.random.default_rng(seed)
    labels = np.where(gen.random((size, size, size)) < density, gen.integers(1, 4, (size,) * 3), 0)
    vote = central_vote(labels, 4)
    expected = _reference_vote(labels, 4)
    assert vote.class_index == expected[0]
    assert vote.fraction == pytest.approx(expected[1])
    assert vote.margin == pytest.approx(expected[2])


def test_vote_in_mask_single_class_model():
    labels = np.ones((3, 3, 3), dtype=int)
    assert vote_in_mask(labels, labels > 0, 2) == Vote(1, 1.0, 1.0)


# ---------------------------------------------------------------- pipeline with a hand-made classifier


def intensity_classifier(t1: float, t2: float, sharpness: float = 20.0):
    """An MSDNet that labels voxels by normalised intensity: < t1 background, < t2 class 1, else 2.

    Every dense layer is zeroed (their LeakyReLU outputs are 0), so the final
    1x1x1 layer sees only the input x: logits 0, k(x - t1), k(2x - t1 - t2).
    """
    import torch

    from vpdetect.nn.msdnet import MSDNet

    model = MSDNet(in_channels=1, n_classes=3, width=1, depth=2, max_dilation=1)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.final.weight[1, 0] = sharpness
        model.final.weight[2, 0] = 2 * sharpness
        model.final.bias[1] = -sharpness * t1
        model.final.bias[2] = -sharpness * (t1 + t2)
    card = {
        "format": "vpdetect-model",
        "stage": "classifier",
        "arch": model.arch(),
        "class_names": ["background", "small", "large"],
        "normalisation": "zscore",
        "voxel_size": 10.0,
        "crop_size": 16,
        "provenance": {"note": "hand-made for tests"},
        "metrics": {},
    }
    return model.eval(), card


def two_class_scene(rng):
    """A 40^3 tomogram: 'small' balls of density 1, 'large' balls of density 2, weak noise."""
    shape = (40, 40, 40)
    volume = rng.normal(0.0, 0.05, size=shape).astype(np.float32)
    particles = [  # (class, x, y, z, radius, density)
        ("small", 10, 10, 10, 3, 1.0),
        ("large", 28, 12, 20, 5, 2.0),
        ("small", 20, 30, 30, 3, 1.0),
        ("large", 0, 20, 20, 5, 2.0),  # at the very edge
        ("small", 39, 39, 39, 3, 1.0),  # in the far corner
        ("small", 20, 19, 20, 2, 1.0),  # right beside the big one below
        ("large", 20, 19, 30, 6, 2.0),  # one background voxel between them
    ]
    for _, x, y, z, r, density in particles:
        volume[ball(shape, (z, y, x), r)] = density + rng.normal(0, 0.05, np.count_nonzero(ball(shape, (z, y, x), r)))
    return volume, particles


def scene_classifier(volume):
    from vpdetect.preprocess import zscore_params

    mean, std = zscore_params(volume)
    return intensity_classifier((0.5 - mean) / std, (1.5 - mean) / std)


def make_table(rows, **columns):
    import pandas as pd

    from vpdetect.io.particles import ParticleTable

    data = pd.DataFrame(rows, columns=["x", "y", "z"]).astype(float)
    for name, values in columns.items():
        data[name] = values
    return ParticleTable(data=data, voxel_size=10.0, tomo_size=None)


def test_classify_table_assigns_the_central_particles_class(rng):
    from vpdetect.classify.pipeline import ClassifyOptions, classify_table
    from vpdetect.io.mrc import Tomogram

    volume, particles = two_class_scene(rng)
    model, card = scene_classifier(volume)
    tomo = Tomogram(volume, voxel_size=10.0, path=None)
    table = make_table(
        [p[1:4] for p in particles],
        score=np.arange(len(particles), dtype=float),
        class_name=["stale"] * len(particles),  # classes already in the input are replaced
    )
    result = classify_table(tomo, table, model, card, ClassifyOptions(batch_size=3))
    assert result.data["class_name"].tolist() == [p[0] for p in particles]
    assert result.data["class_number"].tolist() == [{"small": 1, "large": 2}[p[0]] for p in particles]
    # input columns are carried through, and clean balls vote almost unanimously
    assert result.data["score"].tolist() == list(range(len(particles)))
    assert (result.data["vote_fraction"] > 0.95).all()
    assert result.tomo_size == (40, 40, 40) and result.voxel_size == 10.0
    # batching does not change the answer
    one_by_one = classify_table(tomo, table, model, card, ClassifyOptions(batch_size=1))
    assert one_by_one.data.equals(result.data)


def test_classify_table_unknown_and_outside_rows(rng):
    from vpdetect.classify.pipeline import ClassifyOptions, classify_table
    from vpdetect.errors import VPDetectError
    from vpdetect.io.mrc import Tomogram

    volume, particles = two_class_scene(rng)
    model, card = scene_classifier(volume)
    tomo = Tomogram(volume, voxel_size=10.0, path=None)
    rows = [(10, 10, 10), (33, 33, 5), (-3, 10, 10), (10, 10, 40.2)]  # particle, empty, 2 outside
    table = make_table(rows)
    with pytest.warns(UserWarning, match="2 of 4 coordinates lie outside"):
        result = classify_table(tomo, table, model, card)
    assert result.data["class_name"].tolist() == ["small", "unknown"]
    assert result.data["class_number"].tolist() == [1, 0]
    assert result.data[["x", "y", "z"]].to_numpy().tolist() == [[10, 10, 10], [33, 33, 5]]
    with pytest.warns(UserWarning):
        dropped = classify_table(tomo, table, model, card, ClassifyOptions(drop_unknown=True))
    assert dropped.data["class_name"].tolist() == ["small"]
    with pytest.raises(VPDetectError, match="all 2 coordinates lie outside"):
        classify_table(tomo, make_table(rows[2:]), model, card)
    with pytest.raises(VPDetectError, match="empty"):
        classify_table(tomo, make_table([]), model, card)


def test_off_centre_coordinate_finds_particle_within_search_radius(rng):
    from vpdetect.classify.pipeline import ClassifyOptions, classify_table
    from vpdetect.io.mrc import Tomogram

    volume, _ = two_class_scene(rng)
    model, card = scene_classifier(volume)
    tomo = Tomogram(volume, voxel_size=10.0, path=None)
    table = make_table([(10, 10, 15)])  # 5 voxels from a radius-3 ball: 2 voxels off its surface
    near = classify_table(tomo, table, model, card, ClassifyOptions(search_radius=2.5))
    assert near.data["class_name"].tolist() == ["small"]
    strict = classify_table(tomo, table, model, card, ClassifyOptions(search_radius=1))
    assert strict.data["class_name"].tolist() == ["unknown"]


# ---------------------------------------------------------------- the `vpdetect classify` command


def write_shrec_scene(folder, rng):
    """The two-class scene in a SHREC model folder; returns the folder and its particles."""
    from vpdetect.io.mrc import write_mrc

    folder.mkdir()
    volume, particles = two_class_scene(rng)
    occupancy = np.zeros(volume.shape, dtype=np.int16)
    class_mask = np.zeros(volume.shape, dtype=np.int16)
    lines = []
    for k, (name, x, y, z, r, _) in enumerate(particles, start=1):
        inside = ball(volume.shape, (z, y, x), r)
        occupancy[inside] = k
        class_mask[inside] = {"small": 1, "large": 2}[name]
        lines.append(f"{name} {x} {y} {z} 0 0 0\n")
    write_mrc(folder / "reconstruction.mrc", volume, voxel_size=10.0)
    write_mrc(folder / "occupancy_mask.mrc", occupancy, voxel_size=10.0)
    write_mrc(folder / "class_mask.mrc", class_mask, voxel_size=10.0)
    (folder / "particle_locations.txt").write_text("".join(lines))
    return volume, particles


def save_scene_model(path, volume, stage="classifier"):
    from vpdetect.nn.checkpoint import save_model

    model, card = scene_classifier(volume)
    card["stage"] = stage  # a "localizer" here is the wrong model for classify
    save_model(path, model, card)
    return path


def run_cli(*args):
    from typer.testing import CliRunner

    import vpdetect.cli  # noqa: F401  registers the commands
    from vpdetect.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_classify_cli_truth_coordinates_then_evaluate(tmp_path, rng):
    from vpdetect.io.particles import read_particles

    volume, particles = write_shrec_scene(tmp_path / "model_0", rng)
    model = save_scene_model(tmp_path / "classifier.pt", volume)
    picks = tmp_path / "picks.star"
    result = run_cli(
        "classify", tmp_path / "model_0" / "particle_locations.txt", "--model", model,
        "-o", picks, "--device", "cpu", "--format", "relion4",
    )
    assert result.exit_code == 0, result.output
    table = read_particles(picks)
    assert table.data["class_name"].tolist() == [p[0] for p in particles]
    assert table.data["class_number"].tolist() == [{"small": 1, "large": 2}[p[0]] for p in particles]
    assert table.data[["x", "y", "z"]].to_numpy().tolist() == [list(p[1:4]) for p in particles]
    assert "small 4, large 3" in result.output

    scored = run_cli("evaluate", picks, "--truth", tmp_path / "model_0", "--json", tmp_path / "m.json")
    assert scored.exit_code == 0, scored.output
    import json

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["localization"]["TP"] == len(particles)
    per_class = metrics["classification"]["per_class"]
    assert {k.lower(): round(v["f1"], 6) for k, v in per_class.items() if k.lower() != "background"} == {
        "small": 1.0, "large": 1.0,
    }


def test_classify_cli_several_tomograms_by_name(tmp_path, rng):
    import pandas as pd

    from vpdetect.io.mrc import write_mrc
    from vpdetect.io.particles import ParticleTable, read_particles, write_particles

    volume, particles = two_class_scene(rng)
    tomos = tmp_path / "tomos"
    tomos.mkdir()
    write_mrc(tomos / "TS_01.mrc", volume, voxel_size=10.0)
    # the second tomogram is the first mirrored in x: same classes at mirrored x
    write_mrc(tomos / "TS_02.rec", volume[:, :, ::-1].copy(), voxel_size=10.0)
    rows = []
    for i, (name, x, y, z, *_) in enumerate(particles):
        tomo, xx = ("TS_01", x) if i % 2 == 0 else ("TS_02", 39 - x)
        rows.append({"x": xx, "y": y, "z": z, "tomo_name": tomo, "expected": name})
    data = pd.DataFrame(rows)
    table_path = tmp_path / "coords.star"
    write_particles(table_path, ParticleTable(data.drop(columns="expected"), voxel_size=10.0))
    model = save_scene_model(tmp_path / "classifier.pt", volume)
    result = run_cli("classify", table_path, "--model", model, "--tomo-dir", tomos, "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = read_particles(tmp_path / "coords_classes.star")
    # input order is kept although rows were classified tomogram by tomogram
    assert out.data["tomo_name"].tolist() == data["tomo_name"].tolist()
    assert out.data["class_name"].tolist() == data["expected"].tolist()
    # without --tomo-dir the tomograms are not beside the table: one clear error
    missing = run_cli("classify", table_path, "--model", model, "-o", tmp_path / "x.star")
    assert missing.exit_code == 2
    assert "tomogram 'TS_01'" in missing.output and "--tomo-dir" in missing.output
    assert not (tmp_path / "x.star").exists()
    # one --tomogram for a table of two tomograms is refused
    both = run_cli("classify", table_path, "--model", model, "-t", tomos / "TS_01.mrc", "--overwrite")
    assert both.exit_code == 2 and "names 2 tomograms" in both.output
    # a redo that fails before writing leaves the earlier, complete result as it was
    assert read_particles(tmp_path / "coords_classes.star").data.equals(out.data)
    assert (tmp_path / "coords_classes.star.json").is_file()


def test_classify_cli_errors_leave_no_output(tmp_path, rng):
    from vpdetect.io.particles import read_particles

    volume, _ = write_shrec_scene(tmp_path / "model_0", rng)
    classifier = save_scene_model(tmp_path / "classifier.pt", volume)
    localizer = save_scene_model(tmp_path / "localizer.pt", volume, stage="localizer")
    coords = tmp_path / "coords.csv"
    out = tmp_path / "out.csv"
    tomo = tmp_path / "model_0" / "reconstruction.mrc"

    coords.write_text("x,y,z\n10,10,10\n")
    wrong = run_cli("classify", coords, "-t", tomo, "--model", localizer, "-o", out)
    assert wrong.exit_code == 2 and "localizer" in wrong.output.lower()
    assert len(wrong.output.strip().splitlines()) == 1 and not out.exists()

    coords.write_text("x,y,z\n")
    empty = run_cli("classify", coords, "-t", tomo, "--model", classifier, "-o", out)
    assert empty.exit_code == 2 and "no particles" in empty.output and not out.exists()

    coords.write_text("x,y,z\n50,1,1\n-1,2,2\n")
    outside = run_cli("classify", coords, "-t", tomo, "--model", classifier, "-o", out)
    assert outside.exit_code == 2 and "all 2 coordinates lie outside" in outside.output
    assert not out.exists()

    coords.write_text("x,y,z\n10,10,10\n50,1,1\n28,12,20\n-1,2,2\n")
    partly = run_cli("classify", coords, "-t", tomo, "--model", classifier, "-o", out, "--device", "cpu")
    assert partly.exit_code == 0, partly.output
    assert "2 of 4 coordinates lie outside" in partly.output
    assert read_particles(out).data["class_name"].tolist() == ["small", "large"]

    lost = run_cli("classify", coords, "--model", classifier, "-o", tmp_path / "lost.csv")
    assert lost.exit_code == 2 and "not found" in lost.output and not (tmp_path / "lost.csv").exists()


def test_classify_table_refuses_other_models(rng):
    from vpdetect.classify.pipeline import classify_table
    from vpdetect.errors import VPDetectError
    from vpdetect.io.mrc import Tomogram

    volume, _ = two_class_scene(rng)
    model, card = scene_classifier(volume)
    tomo = Tomogram(volume, voxel_size=10.0, path=None)
    table = make_table([(10, 10, 10)])
    with pytest.raises(VPDetectError, match="localizer model; classify needs a classifier"):
        classify_table(tomo, table, model, dict(card, stage="localizer"), None)
    with pytest.raises(VPDetectError, match="normalisation"):
        classify_table(tomo, table, model, dict(card, normalisation="minmax"), None)
    with pytest.raises(VPDetectError, match="crop_size"):
        classify_table(tomo, table, model, dict(card, crop_size=None), None)
    # a classifier trained at another voxel size still runs, with a warning
    with pytest.warns(UserWarning, match="voxel size"):
        classify_table(Tomogram(volume, voxel_size=20.0, path=None), table, model, card)


def test_most_confident_first_puts_classified_particles_first_by_confidence():
    from vpdetect.classify.pipeline import most_confident_first

    table = make_table(
        [(1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4), (5, 5, 5)],
        class_name=["a", "non-particle", "b", "a", "b"],
        class_number=[1, 0, 2, 1, 2],
        vote_fraction=[0.6, 0.99, 0.9, 0.6, 0.7],
    )
    ranked = most_confident_first(table).data
    # The non-particle pick goes last however sure the classifier is; equal confidence keeps order.
    assert ranked["x"].tolist() == [3.0, 5.0, 1.0, 4.0, 2.0]
    assert sorted(map(tuple, ranked.values.tolist())) == sorted(map(tuple, table.data.values.tolist()))
    assert most_confident_first(make_table([])).data.empty
