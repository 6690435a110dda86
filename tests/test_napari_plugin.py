"""The napari plugin: manifest, reader and writer, and (headless) the viewer and widgets.

The viewer runs on Qt's offscreen platform; its OpenGL context comes from an X
display (Qt's offscreen plugin uses GLX on $DISPLAY), which CI provides with
Xvfb (`.ci/run`). Without napari or a display these tests skip, unless
VPDETECT_GUI_TESTS=required (CI), where skipping would hide a broken plugin.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is imported anywhere

REQUIRED = os.environ.get("VPDETECT_GUI_TESTS") == "required"
ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "vpdetect" / "napari" / "napari.yaml"


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"GUI tests required but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    import napari  # noqa: F401
    import npe2
except ImportError as exc:  # the optional extra is not installed
    _unavailable(f"napari is not installed ({exc}): pip install 'vpdetect[napari]'")

import vpdetect.api as vp  # noqa: E402
from vpdetect.evaluate.overlay import class_colours  # noqa: E402
from vpdetect.napari._reader import get_reader, write_points  # noqa: E402

needs_display = pytest.mark.skipif(
    not os.environ.get("DISPLAY") and not REQUIRED,
    reason="napari's canvas needs OpenGL from an X display (run under xvfb-run, as .ci/run does)",
)


def picks_table(path: Path) -> Path:
    frame = pd.DataFrame({
        "x": [20.0, 90.0, 50.0, 60.0],
        "y": [15.0, 30.0, 60.0, 40.0],
        "z": [10.0, 10.0, 10.0, 18.0],
        "score": [0.9, 0.4, 0.8, 0.95],
        "class_name": ["a", "b", "c", "d"],
        "class_number": [1, 2, 3, 4],
        "vote_fraction": [1.0, 0.6, 0.9, 0.7],
    })
    frame.attrs = {"voxel_size": 10.0, "tomo_size": (120, 80, 20)}
    vp.write_table(path, frame)
    return path


# ---------------------------------------------------------------- no display needed


def test_manifest_is_valid_and_names_real_callables():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "vpdetect"
    for command in manifest.contributions.commands:
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name)), command.python_name
    assert {w.display_name for w in manifest.contributions.widgets} == {"Pick particles", "Filter picks"}
    # pip installs the manifest through this entry point
    text = (ROOT / "pyproject.toml").read_text()
    assert 'vpdetect = "vpdetect.napari:napari.yaml"' in text


def test_reader_gives_points_coloured_by_class_with_scores(tmp_path):
    path = picks_table(tmp_path / "picks.star")
    assert get_reader(str(tmp_path / "image.tif")) is None
    reader = get_reader(str(path))
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "points"
    assert np.array_equal(data, [[10, 15, 20], [10, 30, 90], [10, 60, 50], [18, 40, 60]])  # [z, y, x]
    features = kwargs["features"]
    assert features["score"].tolist() == [0.9, 0.4, 0.8, 0.95]
    assert features["vote_fraction"].tolist() == [1.0, 0.6, 0.9, 0.7]
    colours = class_colours(["a", "b", "c", "d"])
    assert np.allclose(kwargs["border_color"], [colours[n] for n in "abcd"])
    assert kwargs["metadata"]["vpdetect"]["voxel_size"] == 10.0

    # The writer turns the layer back into the same table.
    out = tmp_path / "back.csv"
    assert write_points(str(out), data, {"features": features, "metadata": kwargs["metadata"]}) == [str(out)]
    back = vp.read_table(out)
    original = vp.read_table(path)
    assert np.allclose(back[["x", "y", "z"]], original[["x", "y", "z"]])
    assert back["class_name"].tolist() == list("abcd")


def test_reader_opens_copick_picks_in_voxels_coloured_by_class(tmp_path):
    pytest.importorskip("copick")
    from fnmatch import fnmatch

    from copick.ops.add import add_tomogram
    from test_copick import make_project

    from vpdetect.errors import VPDetectError
    from vpdetect.io.particles import ParticleTable
    from vpdetect.io.particles.copick_picks import write_copick_picks

    root = make_project(tmp_path, ("ribosome", "apoferritin"))
    add_tomogram(root, "TS_01", "denoised", np.zeros((20, 80, 120), np.float32), voxel_spacing=10.0)
    table = ParticleTable.from_arrays(
        [[20, 15, 10], [90, 30, 10], [50.5, 60, 18], [7, 8, 9]], voxel_size=10.0,
        tomo_name=["TS_01", "TS_01", "TS_01", "TS_02"], class_name=["ribosome", "apoferritin", "ribosome", "ribosome"],
        score=[0.9, 0.4, 0.8, 0.7],
    )
    assert write_copick_picks(root, table, "vpdetect", "7") == 3
    picks = tmp_path / "overlay" / "ExperimentRuns" / "TS_01" / "Picks" / "vpdetect_7_ribosome.json"
    readers = npe2.PluginManifest.from_file(MANIFEST).contributions.readers
    assert any(fnmatch(picks.name, pattern) for r in readers for pattern in r.filename_patterns)

    # One picks file: its class, in voxels of the run's 10 A tomogram (copick stores Angstrom).
    [(data, kwargs, kind)] = get_reader(str(picks))(str(picks))
    assert kind == "points" and kwargs["name"] == "vpdetect_7_ribosome"
    np.testing.assert_allclose(data, [[10, 15, 20], [18, 60, 50.5]])  # [z, y, x]
    features = kwargs["features"]
    assert features["class_name"].tolist() == ["ribosome", "ribosome"]
    assert features["tomo_name"].tolist() == ["TS_01", "TS_01"]
    np.testing.assert_allclose(features["score"], [0.9, 0.8])
    assert np.allclose(kwargs["border_color"], [class_colours(["ribosome"])["ribosome"]] * 2)
    meta = kwargs["metadata"]["vpdetect"]
    assert meta["voxel_size"] == 10.0 and meta["tomo_size"] == (120, 80, 20)

    # The project's configuration: a layer per run and session, every class in it coloured apart.
    config = str(tmp_path / "config.json")
    add_tomogram(root, "TS_02", "denoised", np.zeros((20, 80, 120), np.float32), voxel_spacing=10.0)
    layers = get_reader(config)(config)
    assert [k["name"] for _, k, _ in layers] == ["TS_01 vpdetect_7", "TS_02 vpdetect_7"]
    data, kwargs, _ = layers[0]
    order = np.argsort(data[:, 2])
    np.testing.assert_allclose(data[order], [[10, 15, 20], [18, 60, 50.5], [10, 30, 90]])
    names = kwargs["features"]["class_name"].to_numpy()[order].tolist()
    assert names == ["ribosome", "ribosome", "apoferritin"]
    colours = class_colours(names)
    assert colours["ribosome"] != colours["apoferritin"]
    assert np.allclose(np.asarray(kwargs["border_color"])[order], [colours[n] for n in names])

    # Other JSON is left to other plugins; picks whose voxel spacing is unknown say so.
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert get_reader(str(tmp_path / "other.json")) is None
    lost = tmp_path / "lost" / "ExperimentRuns" / "TS_09" / "Picks" / picks.name
    lost.parent.mkdir(parents=True)
    lost.write_bytes(picks.read_bytes())
    with pytest.raises(VPDetectError, match="run 'TS_09' has no tomogram: the picks' voxel spacing is unknown"):
        get_reader(str(lost))(str(lost))


def test_reader_opens_mrc_tomograms_as_images(tmp_path):
    volume = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    vp.write_tomogram(tmp_path / "t.mrc", volume, voxel_size=12.0)
    [(data, kwargs, kind)] = get_reader(str(tmp_path / "t.mrc"))(str(tmp_path / "t.mrc"))
    assert kind == "image" and np.array_equal(data, volume)
    assert kwargs["metadata"]["vpdetect"]["voxel_size"] == pytest.approx(12.0)
    lo, hi = kwargs["contrast_limits"]
    assert volume.min() < lo < hi < volume.max()


# ---------------------------------------------------------------- the viewer, headless


@pytest.fixture(scope="session")
def gl_capabilities():
    """napari reads the GL extensions and texture limits once per process, from whichever
    vispy canvas is current when the first image layer is added. After an earlier test's
    viewer has closed, that can be a canvas whose context is gone (glGetString gives None and
    add_image fails, depending on garbage-collection timing). Reading them here, from a fresh
    canvas of our own, fills napari's caches with valid values for the whole session."""
    from napari._vispy.utils.gl import get_gl_extensions, get_max_texture_sizes
    from vispy.app import Canvas

    canvas = Canvas(show=False)
    try:
        canvas.set_current()
        extensions = get_gl_extensions()
        get_max_texture_sizes()
    finally:
        canvas.close()
    assert extensions, "no OpenGL context: the viewer tests need an X display with GLX"
    return extensions


@pytest.fixture
def viewer(gl_capabilities):
    import napari
    from npe2 import PluginManager

    manager = PluginManager.instance()
    if "vpdetect" not in manager:  # a checkout not installed with pip: register the manifest itself
        manager.register(npe2.PluginManifest.from_file(MANIFEST))
    window = napari.Viewer(show=False)
    yield window
    window.close()


def wait_for(condition, timeout=120.0):
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while not condition():
        QApplication.processEvents()
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the viewer")
        time.sleep(0.02)


def render(window) -> np.ndarray:
    """The canvas as RGBA pixels, drawn off screen by vispy (grabbing the Qt framebuffer,
    as `viewer.screenshot` does, gives black on Qt's offscreen platform)."""
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    return np.asarray(window.window._qt_viewer.canvas._scene_canvas.render())


def colour_centre(pixels: np.ndarray, rgba) -> tuple[float, float] | None:
    """(row, column) centroid of the pixels of one colour, or None if it is absent."""
    target = np.asarray(rgba[:3]) * 255
    near = np.linalg.norm(pixels[..., :3].astype(float) - target, axis=-1) < 40
    if near.sum() < 10:
        return None
    rows, cols = np.nonzero(near)
    return float(rows.mean()), float(cols.mean())


@needs_display
def test_screenshot_shows_each_pick_ringed_on_its_particle(viewer, tmp_path):
    from scipy import ndimage

    # A black tomogram with a bright 3x3 square at each pick of slice z = 10: each class's ring
    # must be centred on its square, and the pick on slice 18 must not show on slice 10.
    volume = np.zeros((20, 80, 120), np.float32)
    for x, y in ((20, 15), (90, 30), (50, 60)):
        volume[10, y - 1 : y + 2, x - 1 : x + 2] = 1.0
    viewer.add_image(volume, contrast_limits=(0, 1), name="tomogram")
    [layer] = viewer.open(str(picks_table(tmp_path / "picks.star")), plugin="vpdetect")
    assert layer.name == "picks" and len(layer.data) == 4
    viewer.dims.current_step = (10, 40, 60)
    viewer.reset_view()
    pixels = render(viewer)

    bright = np.all(pixels[..., :3] > 200, axis=-1)
    labels, n = ndimage.label(bright)
    assert n == 3
    squares = [np.argwhere(labels == k).mean(axis=0) for k in range(1, n + 1)]
    colours = class_colours(list("abcd"))
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: scene
    size = camera.zoom  # screen pixels per voxel
    for name in "abc":
        centre = colour_centre(pixels, colours[name])
        assert centre is not None, f"no ring of class {name}"
        nearest = min(np.linalg.norm(np.asarray(centre) - s) for s in squares)
        assert nearest < size, (name, centre, squares)
    # Rings are on distinct squares, in the table's x/y layout (not transposed).
    a, b = colour_centre(pixels, colours["a"]), colour_centre(pixels, colours["b"])
    assert b[1] - a[1] == pytest.approx(70 * size, rel=0.05)  # x 20 -> 90 runs along columns
    assert b[0] - a[0] == pytest.approx(15 * size, rel=0.05)  # y 15 -> 30 runs down the rows
    assert colour_centre(pixels, colours["d"]) is None  # on slice 18, not 10


@needs_display
def test_pick_widget_picks_in_a_worker_and_saves(viewer, tmp_path, rng):
    from test_api import PARTICLES, classifier_for, two_class_volume
    from test_localize_cli import intensity_localizer

    from vpdetect.napari._widgets import PickWidget
    from vpdetect.nn.checkpoint import save_model

    volume = two_class_volume(rng)
    localizer = intensity_localizer(tmp_path / "loc.pt", volume)
    net, card = classifier_for(volume)
    save_model(tmp_path / "cls.pt", net, card)
    viewer.add_image(volume, name="TS_01")
    widget = PickWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.localizer.value = localizer
    widget.classifier.value = tmp_path / "cls.pt"
    widget.voxel_size.value = 10.0
    widget.output.value = tmp_path / "picks.star"
    assert widget.image.value == "TS_01" and widget.mode.value == "pick"
    widget.run()
    assert widget.worker is not None  # the work runs in a thread: run() returned at once
    wait_for(lambda: widget.worker is None)
    assert widget.result is not None, widget.status.value

    layer = viewer.layers["TS_01 picks"]
    expected = sorted((p[3], p[2], p[1], p[0]) for p in PARTICLES)  # z, y, x, class
    got = sorted(zip(*layer.data.T.round().astype(int), layer.features["class_name"], strict=True))
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    assert [g[3] for g in got] == [e[3] for e in expected]
    assert widget.progress.value == widget.progress.max > 0
    saved = vp.read_table(tmp_path / "picks.star")
    assert len(saved) == len(PARTICLES) and set(saved["tomo_name"]) == {"TS_01"}
    assert "saved" in widget.status.value


def results_without_and_with(widget, control, values=(False, True)):
    """The widget's picks with `control` set to each of `values` (a check box: off, then on)."""
    found = []
    for value in values:
        control.value = value
        widget.run()
        wait_for(lambda: widget.worker is None)
        assert widget.result is not None, widget.status.value
        found.append(widget.result)
    return found


@needs_display
def test_pick_widget_keeps_or_drops_gold_as_asked(viewer, tmp_path, rng):
    from test_localize_cli import CENTRES, SHAPE, intensity_localizer, scene

    from vpdetect.napari._widgets import PickWidget

    volume = scene(rng)
    z, y, x = np.indices(SHAPE)
    volume[(z - 18) ** 2 + (y - 20) ** 2 + (x - 22) ** 2 <= 9] = 20.0  # a gold bead among 4 particles
    viewer.add_image(volume, name="TS_01")
    widget = PickWidget(viewer)
    widget.localizer.value = intensity_localizer(tmp_path / "loc.pt", volume)
    widget.mode.value = "localize"
    widget.voxel_size.value = 10.0
    found = results_without_and_with(widget, widget.gold_picks, values=("keep", "drop", "model's default"))
    # The test localizer's card does not ask for beads to be dropped: its default keeps them.
    assert [len(f) for f in found] == [len(CENTRES) + 1, len(CENTRES), len(CENTRES) + 1]


@needs_display
def test_pick_widget_verifies_picks_or_keeps_them_as_asked(viewer, tmp_path, rng):
    from test_localize_cli import CENTRES, scene
    from test_verifier import verified_localizer

    from vpdetect.napari._widgets import PickWidget

    volume = scene(rng)
    viewer.add_image(volume, name="TS_01")
    widget = PickWidget(viewer)
    widget.localizer.value = verified_localizer(tmp_path, volume, -4.0)  # rejects every pick
    widget.mode.value = "localize"
    widget.voxel_size.value = 10.0
    found = results_without_and_with(widget, widget.verify, ("model's default", "keep all", "verify"))
    assert [len(f) for f in found] == [0, len(CENTRES), 0]


@needs_display
def test_pick_widget_erases_or_keeps_membranes_as_asked(viewer, tmp_path, rng):
    from test_localize_cli import intensity_localizer
    from test_membranes import BALLS, SHEET_X, membrane_scene

    from vpdetect.napari._widgets import PickWidget
    from vpdetect.nn.checkpoint import bundle_model

    volume, _, _ = membrane_scene(rng, noise=0.1)
    viewer.add_image(volume, name="TS_01")
    widget = PickWidget(viewer)
    bundle_model(intensity_localizer(tmp_path / "loc.pt", volume), tmp_path / "bright.pt", {"contrast": "bright"})
    widget.localizer.value = tmp_path / "bright.pt"
    widget.mode.value = "localize"
    widget.voxel_size.value = 10.0
    found = results_without_and_with(widget, widget.membranes, ("keep", "erase", "model's default"))
    assert (found[0]["x"] > SHEET_X[0] - 2).sum() > 3 and len(found[1]) == len(BALLS)
    assert len(found[2]) == len(found[0])  # this model's card does not ask for erasing


@needs_display
def test_pick_widget_reports_errors_in_its_status(viewer, tmp_path):
    from vpdetect.napari._widgets import PickWidget

    widget = PickWidget(viewer)
    widget.run()
    assert widget.status.value.startswith("error: open a tomogram")
    viewer.add_image(np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32), name="tiny")
    widget.mode.value = "localize"
    widget.run()
    wait_for(lambda: widget.worker is None)
    assert widget.result is None and widget.status.value.startswith("error:")
    assert "needs at least" in widget.status.value  # the localizer's own one-line message


@needs_display
def test_filter_widget_hides_picks_and_saves_what_is_shown(viewer, tmp_path):
    from vpdetect.napari._widgets import FilterWidget

    [layer] = viewer.open(str(picks_table(tmp_path / "picks.star")), plugin="vpdetect")
    widget = FilterWidget(viewer)
    assert widget.points.value == "picks" and list(widget.classes.value) == list("abcd")
    widget.min_score.value = 0.5
    assert layer.shown.tolist() == [True, False, True, True]
    widget.min_vote.value = 0.8
    assert layer.shown.tolist() == [True, False, True, False]
    widget.classes.value = ["a", "b", "d"]
    assert layer.shown.tolist() == [True, False, False, False]
    assert widget.status.value == "1 of 4 picks shown"
    widget.output.value = tmp_path / "kept.star"
    widget.save()
    kept = vp.read_table(tmp_path / "kept.star")
    assert kept["class_name"].tolist() == ["a"] and kept.attrs["voxel_size"] == 10.0


@needs_display
def test_pick_widget_passes_the_cleaning_choices_to_the_api(viewer, monkeypatch):
    import pandas as pd

    import vpdetect.api
    from vpdetect.napari._widgets import PickWidget

    calls = []

    def fake_localize(volume, localizer, **options):
        calls.append(options)
        return pd.DataFrame({"x": [1.0], "y": [2.0], "z": [3.0], "score": [0.9]})

    monkeypatch.setattr(vpdetect.api, "localize", fake_localize)
    viewer.add_image(np.zeros((8, 8, 8), dtype=np.float32), name="TS_01")
    widget = PickWidget(viewer)
    widget.mode.value = "localize"
    expected = []
    for membranes, streaks in (("model's default", "model's default"), ("keep", "remove"), ("erase", "keep")):
        widget.membranes.value, widget.gold_streaks.value = membranes, streaks
        widget.run()
        wait_for(lambda: widget.worker is None)
        expected.append({**({} if membranes == "model's default" else {"erase_membranes": membranes == "erase"}),
                         **({} if streaks == "model's default" else {"remove_gold_streaks": streaks == "remove"})})
    got = [{k: v for k, v in c.items() if k in ("erase_membranes", "remove_gold_streaks")} for c in calls]
    assert got == expected
