"""`vpdetect info`: what is in a tomogram or a model file."""

from __future__ import annotations

from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors

MODEL_SUFFIXES = (".pt", ".pth", ".ckpt")


@app.command()
@user_errors
def info(
    file: Path = typer.Argument(..., help="A tomogram (MRC/REC) or a vpdetect model file (.pt)."),
    pixel_size: float = typer.Option(
        None, "--pixel-size", help="Voxel size in Angstrom, overriding the MRC header."
    ),
) -> None:
    """Print shape, voxel size, dtype and value statistics of a tomogram, or a model's card."""
    from rich.table import Table

    if file.suffix.lower() in MODEL_SUFFIXES:
        from vpdetect.nn.checkpoint import format_model_card, read_model_card

        console.print(format_model_card(read_model_card(file)))
        return

    import numpy as np

    from vpdetect.io.mrc import read_mrc_header, read_tomogram
    from vpdetect.preprocess import volume_stats

    header = read_mrc_header(file)
    tomo = read_tomogram(file, voxel_size=pixel_size, mmap=True)
    data = tomo.data
    finite = True
    try:
        mean, std = volume_stats(data)
    except Exception:  # noqa: BLE001 - NaNs are reported, not fatal, in info
        finite = False
        mean = std = float("nan")
    table = Table(title=str(file), show_header=False)
    x, y, z = tomo.shape_xyz
    table.add_row("shape (x, y, z)", f"{x} x {y} x {z}")
    table.add_row("array shape [z, y, x]", str(tuple(data.shape)))
    table.add_row("MRC mode", str(header["mode"]))
    table.add_row("stored dtype", str(np.dtype(data.dtype)))
    if tomo.voxel_size is None:
        table.add_row("voxel size", "unknown (header 0 or 1 A; use --pixel-size)")
    else:
        source = "option" if pixel_size is not None else "header"
        table.add_row("voxel size", f"{tomo.voxel_size:.3f} A ({source})")
    table.add_row("min / max", f"{float(np.nanmin(data)):.4g} / {float(np.nanmax(data)):.4g}")
    table.add_row("mean / std", f"{mean:.4g} / {std:.4g}")
    if not finite:
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        table.add_row("non-finite voxels", f"[red]{n_bad}[/]")
    console.print(table)
