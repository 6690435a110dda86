"""`vpdetect view`: a QC picture of picks on their tomogram, or a gallery of class averages."""

from __future__ import annotations

from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.errors import VPDetectError

LAYOUTS = ("ortho", "montage")


@app.command()
@user_errors
def view(
    table_path: Path = typer.Argument(..., metavar="TABLE", help="Picks (.star, .csv or SHREC .txt)."),
    tomogram: Path = typer.Option(
        None, "--tomogram", "-t",
        help="Tomogram (MRC) the picks belong to; default: found from the table as `classify` does.",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
    layout: str = typer.Option(
        "ortho", "--layout", help="ortho: xy, xz and yz planes through --centre; montage: xy slices through z.",
    ),
    centre: tuple[float, float, float] = typer.Option(
        None, "--centre", help="X Y Z (voxels) where the orthogonal planes cross; default: the tomogram's centre.",
    ),
    slab: float = typer.Option(
        5.0, "--slab", min=0.0, help="ortho: draw picks within this many voxels of each plane (about a particle radius).",
    ),
    slices: int = typer.Option(12, "--slices", min=1, help="montage: number of xy slices."),
    columns: int = typer.Option(4, "--columns", min=1, help="montage: slices per row."),
    thickness: int = typer.Option(
        5, "--thickness", min=1, help="Slices averaged into each panel (noisy tomograms show more).",
    ),
    averages: bool = typer.Option(
        False, "--averages",
        help="Draw a gallery of per-class average subtomograms (central slices) instead of slices.",
    ),
    box: int = typer.Option(32, "--box", min=3, help="--averages: box edge in voxels."),
    tomo_name: str = typer.Option(
        None, "--tomo-name", help="Use only this tomogram's rows of a table naming several.",
    ),
    input_format: str = typer.Option(
        None, "--format", help="Format of TABLE (relion4, relion5, csv, shrec); default: detected.",
    ),
    pixel_size: float = typer.Option(
        None, "--pixel-size", help="Voxel size in Angstrom, overriding the tomogram header and the table.",
    ),
) -> None:
    """Draw the picks by class on orthogonal slices or a z montage (with a legend), or class averages."""
    from vpdetect.cli.classify import resolve_tomogram
    from vpdetect.evaluate.plots import figure_png
    from vpdetect.io.atomic import atomic_path, check_output_dir
    from vpdetect.io.mrc import read_mrc_header, read_tomogram
    from vpdetect.io.particles import read_particles

    layout = layout.lower()
    if layout not in LAYOUTS:
        raise VPDetectError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if output.suffix.lower() != ".png":
        raise VPDetectError(f"view writes PNG; name the output .png, got {output.name}")
    check_output_dir(output.parent)
    tomo_size = None
    if tomogram is not None:
        z, y, x = read_mrc_header(tomogram)["shape"]
        tomo_size = (x, y, z)
    table = read_particles(table_path, fmt=input_format, voxel_size=pixel_size, tomo_size=tomo_size)
    table = _one_tomogram(table, tomo_name, tomogram)
    if tomogram is None:
        data = table.data
        name = str(data["tomo_name"].iloc[0]) if "tomo_name" in data.columns and len(data) else None
        recorded = str(data["tomo_path"].iloc[0]) if "tomo_path" in data.columns and len(data) else None
        tomogram = resolve_tomogram(name, recorded or None, table_path, None)
    tomo = read_tomogram(tomogram, voxel_size=pixel_size)

    label = f"{table_path.name} on {tomogram.name}"
    if averages:
        from vpdetect.evaluate.averages import averages_figure, class_averages

        figure = averages_figure(
            class_averages(tomo.data, table, box),
            title=f"class averages, {box}^3 boxes, no alignment: {label}",
        )
    elif layout == "ortho":
        from vpdetect.evaluate.overlay import orthoslices_figure

        figure = orthoslices_figure(
            tomo.data, table, centre_xyz=centre, slab=slab, thickness=thickness,
            title=f"{label}: {len(table)} picks, circles within {slab:g} voxels of each plane",
        )
    else:
        from vpdetect.evaluate.overlay import montage_figure

        figure = montage_figure(
            tomo.data, table, n_slices=slices, columns=columns, thickness=thickness,
            title=f"{label}: {len(table)} picks, each on its nearest slice",
        )
    png = figure_png(figure)
    with atomic_path(output) as tmp:
        tmp.write_bytes(png)
    console.print(f"{'class averages' if averages else layout + ' view'} written to {output}")


def _one_tomogram(table, tomo_name: str | None, tomogram: Path | None):
    """The rows of one tomogram: `--tomo-name`, else the one matching --tomogram's name, else all
    rows of a single-tomogram table."""
    from dataclasses import replace

    from vpdetect.io.mrc import tomogram_name

    data = table.data
    if "tomo_name" not in data.columns:
        if tomo_name is not None:
            raise VPDetectError("--tomo-name given but the table names no tomograms")
        return table
    names = data["tomo_name"].astype(str)
    wanted = tomo_name
    if wanted is None and names.nunique() > 1:
        if tomogram is None:
            raise VPDetectError(
                f"the table names {names.nunique()} tomograms; choose one with --tomo-name or --tomogram"
            )
        wanted = tomogram_name(tomogram)
    if wanted is None:
        return table
    rows = names == wanted
    if not rows.any():
        raise VPDetectError(f"no rows of tomogram {wanted!r} in the table (it names {', '.join(sorted(set(names)))})")
    return replace(table, data=data[rows].reset_index(drop=True))
