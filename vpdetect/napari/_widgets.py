"""napari dock widgets: pick particles on an image layer, filter picks and save them.

The network runs in a worker thread (napari's `create_worker`) so the viewer
stays responsive; progress comes back through a Qt signal, which Qt delivers
in the main thread, to a progress bar. Every computation goes through
`vpdetect.api`, so the widgets do what `vpdetect pick` / `localize` do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    Select,
)
from qtpy.QtCore import QObject, Signal

from vpdetect.errors import VPDetectError
from vpdetect.napari._reader import METADATA_KEY, frame_from_points, points_layer_data

MODES = ("pick", "localize")
# The model card says whether membranes are erased (the bundled localizer: yes) and gold streaks
# removed; the other choices override it.
MEMBRANE_CHOICES = ("model's default", "erase", "keep")
STREAK_CHOICES = ("model's default", "remove", "keep")
VERIFY_CHOICES = ("model's default", "verify", "keep all")
GOLD_CHOICES = ("model's default", "drop", "keep")
TABLE_FILTER = "*.star *.csv *.txt"


class _Relay(QObject):
    """Carries progress from the worker thread to the widget (queued into the main thread)."""

    progressed = Signal(str, int, int)


def _layers_of(viewer, kind: str) -> list[str]:
    import napari.layers

    cls = getattr(napari.layers, kind)
    return [layer.name for layer in viewer.layers if isinstance(layer, cls)]


def _path_or_none(edit: FileEdit) -> Path | None:
    text = str(edit.value) if edit.value is not None else ""
    return Path(text) if text not in ("", ".") else None


def _layer_voxel_size(layer) -> float | None:
    meta = (layer.metadata or {}).get(METADATA_KEY, {})
    return meta.get("voxel_size")


class PickWidget(Container):
    """Run `localize` or `pick` on an image layer; the picks become a points layer (and a file)."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=lambda _: _layers_of(self.viewer, "Image"))
        self.mode = ComboBox(label="mode", choices=MODES, value="pick")
        self.localizer = FileEdit(label="localizer", mode="r", filter="*.pt", value="",
                                  tooltip="Localizer model (.pt); empty: the bundled one.")
        self.classifier = FileEdit(label="classifier", mode="r", filter="*.pt", value="",
                                   tooltip="Classifier model (.pt); empty: the bundled one.")
        self.threshold = FloatSpinBox(label="threshold", min=0.0, max=1.0, step=0.05, value=0.0,
                                      tooltip="Foreground probability; 0: the model's tuned value.")
        self.gold_picks = ComboBox(label="gold picks", choices=GOLD_CHOICES, value=GOLD_CHOICES[0],
                                   tooltip="drop: drop picks on gold beads (localize/pick --drop-gold); "
                                   "keep: --keep-gold.")
        self.membranes = ComboBox(label="membranes", choices=MEMBRANE_CHOICES, value=MEMBRANE_CHOICES[0],
                                  tooltip="erase: replace membranes by background before the network "
                                  "(localize/pick --erase-membranes); keep: --keep-membranes.")
        self.gold_streaks = ComboBox(label="gold streaks", choices=STREAK_CHOICES, value=STREAK_CHOICES[0],
                                     tooltip="remove: subtract the streaks of gold beads before the network "
                                     "(localize/pick --remove-gold-streaks); keep: --keep-gold-streaks.")
        self.verify = ComboBox(label="pick verifier", choices=VERIFY_CHOICES, value=VERIFY_CHOICES[0],
                               tooltip="verify: drop picks the localizer's pick verifier scores low "
                               "(localize/pick --verify); keep all: --no-verify.")
        self.voxel_size = FloatSpinBox(label="voxel size (A)", min=0.0, max=1e4, value=0.0,
                                       tooltip="0: from the tomogram's header, if it has one.")
        self.output = FileEdit(label="save to", mode="w", filter=TABLE_FILTER, value="",
                               tooltip="Table to write the picks to (.star, .csv, .txt); empty: do not save.")
        self.run_button = PushButton(text="Run")
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(value="")
        self.extend([self.image, self.mode, self.localizer, self.classifier, self.threshold,
                     self.gold_picks, self.membranes, self.gold_streaks, self.verify, self.voxel_size, self.output, self.run_button, self.progress, self.status])
        self.mode.changed.connect(lambda value: setattr(self.classifier, "enabled", value == "pick"))
        self.run_button.clicked.connect(self.run)
        self.viewer.layers.events.inserted.connect(lambda _: self.image.reset_choices())
        self.viewer.layers.events.removed.connect(lambda _: self.image.reset_choices())
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self.worker = None
        self.result = None  # the last picks (DataFrame)

    def run(self) -> None:
        """Start picking in a worker thread (returns at once)."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            return
        if not self.image.value:
            self.status.value = "error: open a tomogram (image layer) first"
            return
        layer = self.viewer.layers[self.image.value]
        volume = np.asarray(layer.data)
        voxel_size = self.voxel_size.value or _layer_voxel_size(layer)
        mode = self.mode.value
        options = {}
        if self.threshold.value > 0:
            options["threshold"] = float(self.threshold.value)
        if self.gold_picks.value != GOLD_CHOICES[0]:
            options["drop_gold"] = self.gold_picks.value == "drop"
        if self.membranes.value != MEMBRANE_CHOICES[0]:
            options["erase_membranes"] = self.membranes.value == "erase"
        if self.gold_streaks.value != STREAK_CHOICES[0]:
            options["remove_gold_streaks"] = self.gold_streaks.value == "remove"
        if self.verify.value != VERIFY_CHOICES[0]:
            options["verify"] = self.verify.value == "verify"
        localizer = _path_or_none(self.localizer)
        classifier = _path_or_none(self.classifier)
        emit = self._relay.progressed.emit
        name = layer.name

        def work():
            import vpdetect.api as vp

            if mode == "pick":
                frame = vp.pick(volume, localizer, classifier, voxel_size=voxel_size, progress=emit, **options)
            else:
                frame = vp.localize(volume, localizer, voxel_size=voxel_size, progress=emit, **options)
            frame["tomo_name"] = name  # the layer's name, for rlnTomoName in STAR files
            return frame

        self.result = None
        self.run_button.enabled = False
        self.progress.value = 0
        self.status.value = f"{mode}: running on {layer.name}"
        # Our own `errored` handler: a bad input is a status line, not an exception re-raised in Qt.
        self.worker = create_worker(work, _start_thread=True, _connect={
            "returned": lambda frame: self._on_done(frame, name),
            "errored": self._on_error,
            "finished": self._on_finished,
        })

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        self.progress.label = stage
        self.progress.max = max(int(total), 1)
        self.progress.value = min(int(done), self.progress.max)

    def _on_done(self, frame, image_name: str) -> None:
        self.result = frame
        data, kwargs, _ = points_layer_data(frame, name=f"{image_name} picks")
        self.viewer.add_points(data, **kwargs)
        message = f"{len(frame)} picks"
        output = _path_or_none(self.output)
        if output is not None:
            try:
                from vpdetect.api import write_table

                write_table(output, frame)
                message += f", saved to {output}"
            except VPDetectError as exc:
                message += f"; not saved: {exc}"
        self.status.value = message

    def _on_error(self, exc: Exception) -> None:
        self.status.value = f"error: {exc}"

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.enabled = True


class FilterWidget(Container):
    """Show only picks above a score / vote fraction and of chosen classes; save what is shown."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.points = ComboBox(label="picks", choices=lambda _: _layers_of(self.viewer, "Points"))
        self.min_score = FloatSpinBox(label="min score", min=0.0, max=1.0, step=0.05, value=0.0)
        self.min_vote = FloatSpinBox(label="min vote fraction", min=0.0, max=1.0, step=0.05, value=0.0)
        self.classes = Select(label="classes", choices=[])
        self.output = FileEdit(label="save to", mode="w", filter=TABLE_FILTER, value="")
        self.save_button = PushButton(text="Save shown picks")
        self.status = Label(value="")
        self.extend([self.points, self.min_score, self.min_vote, self.classes, self.output,
                     self.save_button, self.status])
        self.points.changed.connect(self._on_layer)
        for control in (self.min_score, self.min_vote, self.classes):
            control.changed.connect(self.apply)
        self.save_button.clicked.connect(self.save)
        self.viewer.layers.events.inserted.connect(lambda _: self.points.reset_choices())
        self.viewer.layers.events.removed.connect(lambda _: self.points.reset_choices())
        self._on_layer()

    def _layer(self):
        return self.viewer.layers[self.points.value] if self.points.value else None

    def _on_layer(self, *_):
        layer = self._layer()
        names = []
        if layer is not None and "class_name" in layer.features.columns:
            names = sorted(layer.features["class_name"].astype(str).unique())
        self.classes.choices = names
        self.classes.value = names  # all classes selected
        self.apply()

    def keep(self) -> np.ndarray | None:
        """Boolean mask of the picks that pass the filters (None without a layer)."""
        layer = self._layer()
        if layer is None:
            return None
        features = layer.features
        keep = np.ones(len(layer.data), dtype=bool)
        if "score" in features.columns:
            keep &= features["score"].to_numpy(dtype=float) >= self.min_score.value
        if "vote_fraction" in features.columns:
            keep &= features["vote_fraction"].to_numpy(dtype=float) >= self.min_vote.value
        if "class_name" in features.columns:
            keep &= features["class_name"].astype(str).isin(list(self.classes.value)).to_numpy()
        return keep

    def apply(self, *_) -> None:
        keep = self.keep()
        if keep is None:
            self.status.value = "open a table of picks (points layer)"
            return
        layer = self._layer()
        layer.shown = keep
        self.status.value = f"{int(keep.sum())} of {len(keep)} picks shown"

    def save(self, *_) -> None:
        """Write the shown picks to the chosen file."""
        from vpdetect.api import write_table

        layer = self._layer()
        output = _path_or_none(self.output)
        if layer is None or output is None:
            self.status.value = "error: choose a points layer and a file to save to"
            return
        frame = frame_from_points(layer.data, layer.features, layer.metadata, rows=self.keep())
        try:
            written = write_table(output, frame)
        except VPDetectError as exc:
            self.status.value = f"error: {exc}"
            return
        self.status.value = f"saved {len(frame)} picks to {output} ({written})"
