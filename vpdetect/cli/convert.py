"""`vpdetect convert`: particle tables between RELION 4/5 STAR, CSV and SHREC text."""

from __future__ import annotations

from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.cli.geometry import coords_pixel_size_option, load_tomograms, tomograms_star_option
from vpdetect.errors import VPDetectError

FORMAT_HELP = "relion4, relion5, csv, shrec, dynamo or imod"


def tomogram_geometry(
    tomogram: Path | None,
    tomo_size: tuple[int, int, int] | None,
    pixel_size: float | None,
) -> tuple[tuple[int, int, int] | None, float | None, str | None]:
    """(size x, y, z; voxel size; tomogram name) from --tomogram or --tomo-size/--pixel-size."""
    from vpdetect.io.mrc import read_mrc_header, tomogram_name

    if tomogram is not None and tomo_size is not None:
        raise VPDetectError("give either --tomogram or --tomo-size, not both")
    if pixel_size is not None and not pixel_size > 0:
        raise VPDetectError(f"--pixel-size must be positive, got {pixel_size}")
    if tomogram is None:
        if tomo_size is not None and min(tomo_size) <= 0:
            raise VPDetectError(f"--tomo-size must be positive, got {tomo_size}")
        return tomo_size, pixel_size, None
    header = read_mrc_header(tomogram)
    z, y, x = header["shape"]
    voxel = pixel_size if pixel_size is not None else header["voxel_size"]
    return (x, y, z), voxel, tomogram_name(tomogram)


@app.command()
@user_errors
def convert(
    source: Path = typer.Argument(..., metavar="IN", help="Input particle table (.star, .csv or SHREC .txt)."),
    target: Path = typer.Argument(..., metavar="OUT", help="Output particle table; written atomically."),
    to: str = typer.Option(
        None, "--to", help=f"Output format: {FORMAT_HELP}. Default: from OUT's extension (.star = relion4)."
    ),
    input_format: str = typer.Option(
        None, "--format", help=f"Input format ({FORMAT_HELP}); default: from extension and content."
    ),
    tomogram: Path = typer.Option(
        None, "--tomogram", help="Tomogram the particles belong to: gives its size, voxel size and name."
    ),
    tomo_size: tuple[int, int, int] = typer.Option(
        None, "--tomo-size", help="Tomogram size X Y Z in voxels (RELION 5 centring)."
    ),
    pixel_size: float = typer.Option(
        None, "--pixel-size", help="Voxel size in Angstrom, overriding the file and the MRC header."
    ),
    tomograms_star: Path = tomograms_star_option(),
    coords_pixel_size: float = coords_pixel_size_option(),
) -> None:
    """Convert a particle table between RELION 4/5 STAR, CSV and SHREC particle_locations.txt."""
    from vpdetect.io.particles import read_particles, write_particles

    size, voxel, name = tomogram_geometry(tomogram, tomo_size, pixel_size)
    table = read_particles(
        source, fmt=input_format, voxel_size=voxel, tomo_size=size, tomograms=load_tomograms(tomograms_star)
    )
    if name is not None and "tomo_name" not in table.data.columns:
        table.data["tomo_name"] = name
    written = write_particles(target, table, fmt=to, coords_pixel_size=coords_pixel_size)
    console.print(f"wrote {len(table)} particles to {target} ({written})")
