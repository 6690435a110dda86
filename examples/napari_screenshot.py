"""A napari screenshot of picks on their tomogram, opened with vpdetect's plugin.

    python examples/napari_screenshot.py TOMO.mrc PICKS.star -o shot.png [--z Z]

Runs headless (Qt's offscreen platform; OpenGL needs an X display such as Xvfb's).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tomogram", type=Path)
    parser.add_argument("picks", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--z", type=int, default=None, help="Slice to show (default: the middle).")
    parser.add_argument("--slab", type=int, default=9, help="Slices shown at once (the image is their mean).")
    args = parser.parse_args()

    import napari
    import npe2
    import numpy as np
    from matplotlib.image import imsave
    from qtpy.QtWidgets import QApplication

    manager = npe2.PluginManager.instance()
    if "vpdetect" not in manager:  # a checkout not installed with pip
        manager.register(npe2.PluginManifest.from_file(Path(__file__).parents[1] / "vpdetect/napari/napari.yaml"))
    viewer = napari.Viewer(show=False)
    [image] = viewer.open(str(args.tomogram), plugin="vpdetect")
    [points] = viewer.open(str(args.picks), plugin="vpdetect")
    z = image.data.shape[0] // 2 if args.z is None else args.z
    step = list(viewer.dims.current_step)
    step[0] = z
    viewer.dims.current_step = tuple(step)
    # A slab of slices: the picks within it show, on the mean of its slices (less noisy).
    thickness = list(viewer.dims.thickness)
    thickness[0] = args.slab
    viewer.dims.thickness = tuple(thickness)
    image.projection_mode = "mean"
    for _ in range(10):
        QApplication.processEvents()
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    viewer.reset_view()
    # The off-screen render frames the view a little off napari's own: zoom out, crop the border.
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom = camera.zoom * 0.6
    for _ in range(10):
        QApplication.processEvents()
    # vispy draws the canvas off screen (Qt's framebuffer grab is black on the offscreen platform).
    pixels = canvas.render()
    drawn = np.argwhere(pixels[..., :3].max(axis=-1) > 0)
    (r0, c0), (r1, c1) = drawn.min(axis=0), drawn.max(axis=0) + 1
    pixels = pixels[r0:r1, c0:c1]
    imsave(args.output, pixels)
    print(f"{len(points.data)} picks, slice z = {z}: {args.output}")
    viewer.close()


if __name__ == "__main__":
    main()
