"""Options that place particles where RELION 5 and Warp read them, shared by localize,
pick, classify, convert and train: --tomograms-star and --coords-pixel-size."""

from __future__ import annotations

import typer


def tomograms_star_option():
    return typer.Option(
        None, "--tomograms-star",
        help="RELION 5 tomograms.star: each tomogram's bin-1 size, tilt-series pixel size and binning "
        "(coordinates then land where RELION reads them). Without it tomograms count as unbinned.",
    )


def coords_pixel_size_option():
    return typer.Option(
        None, "--coords-pixel-size",
        help="Write RELION 4 style coordinates at this pixel size (Angstrom) with rlnMicrographName "
        "NAME.tomostar: what Warp's ts_export_particles reads with --coords_angpix.",
    )


def load_tomograms(path):
    """The TomogramSet of a --tomograms-star value (None stays None)."""
    if path is None:
        return None
    from vpdetect.io.particles import read_tomograms_star

    return read_tomograms_star(path)


def place_in_project(table, tomo, source, tomograms):
    """Name and place one tomogram's picks as tomograms.star says (unchanged without one)."""
    if tomograms is None:
        return table
    from vpdetect.io.particles import assign_tomogram

    return assign_tomogram(table, tomograms, tomo.name, source, tomo.shape_xyz, tomo.voxel_size)
