"""`vpdetect classify`: a class for every coordinate of a particle table (stage 2)."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.cli.batch import FORMAT_SUFFIX, device_option, resolve_device
from vpdetect.cli.localize import pixel_size_option, precision_option, resolve_model_path
from vpdetect.errors import VPDetectError

TOMOGRAM_SUFFIXES = (".mrc", ".rec", ".st", ".map", ".ali")
# SHREC model folders hold the tomogram beside particle_locations.txt under this name.
SHREC_TOMOGRAM = "reconstruction.mrc"


def resolve_tomogram(
    name: str | None,
    recorded_path: str | None,
    table_path: Path,
    tomo_dir: Path | None,
) -> Path:
    """Where the tomogram of a table's rows lies.

    Looked up by name in --tomo-dir first (users moving data say so there), then
    at the path localize recorded, then by name next to the table; a table
    without tomogram names sitting in a SHREC folder uses its reconstruction.mrc.
    """
    table_dir = table_path.resolve().parent
    looked: list[str] = []
    if tomo_dir is not None and name is not None:
        found = _find_by_name(name, tomo_dir, looked)
        if found is not None:
            return found
    if recorded_path:
        for candidate in (Path(recorded_path), table_dir / recorded_path):
            looked.append(str(candidate))
            if candidate.is_file():
                return candidate
    if name is not None:
        found = _find_by_name(name, table_dir, looked)
        if found is not None:
            return found
    shrec = table_dir / SHREC_TOMOGRAM
    looked.append(str(shrec))
    if shrec.is_file():
        return shrec
    what = f"tomogram {name!r}" if name is not None else "the tomogram"
    raise VPDetectError(
        f"{what} of {table_path.name} not found (looked for {', '.join(looked[:4])}"
        f"{', ...' if len(looked) > 4 else ''}); give --tomogram or --tomo-dir"
    )


def _find_by_name(name: str, directory: Path, looked: list[str]) -> Path | None:
    candidates = [directory / name, *(directory / f"{name}{s}" for s in TOMOGRAM_SUFFIXES)]
    candidates.append(directory / name / SHREC_TOMOGRAM)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked.append(str(directory / f"{name}.mrc"))
    return None


@functools.lru_cache(maxsize=4)
def load_classifier(model_path: str, device: str):
    """(model, card) of a classifier, loaded once per process and device."""
    from vpdetect.classify.pipeline import classifier_classes
    from vpdetect.nn.checkpoint import load_model

    model, card = load_model(model_path, stage="classifier", device=device)
    classifier_classes(card)  # refuses a card without particle classes
    model.eval()
    return model, card


def class_summary(data) -> str:
    """`small 10, large 4, unknown 2` in order of class number."""
    if len(data) == 0:
        return "no particles"
    counts = data.groupby(["class_number", "class_name"]).size()
    return ", ".join(f"{name} {count}" for (_, name), count in counts.items())


@app.command()
@user_errors
def classify(
    table: Path = typer.Argument(
        ..., help="Particle coordinates (.star, .csv or SHREC .txt), e.g. from `vpdetect localize`."
    ),
    tomogram: Path = typer.Option(
        None, "--tomogram", "-t",
        help="Tomogram to classify in (MRC/REC); default: the one the table names "
        "(rlnTomoName, or the path localize recorded).",
    ),
    tomo_dir: Path = typer.Option(
        None, "--tomo-dir", help="Folder holding the tomograms the table names (NAME.mrc / NAME.rec)."
    ),
    model: Path = typer.Option(
        None, "--model", "-m", help="Classifier model file (.pt); default: the bundled classifier."
    ),
    output: Path = typer.Option(
        None, "--output", "-o",
        help="Output table; default: TABLE's name plus _classes, beside it. Format from the extension.",
    ),
    output_format: str = typer.Option(
        None, "--format", help="Output format: relion4, relion5, csv or shrec; default: from the extension."
    ),
    input_format: str = typer.Option(
        None, "--input-format", help="Format of TABLE (relion4, relion5, csv, shrec); default: detected."
    ),
    search_radius: float = typer.Option(
        3.0, "--search-radius", min=0.0,
        help="Voxels from the box centre to look for the particle when the centre voxel is background.",
    ),
    drop_unknown: bool = typer.Option(
        False, "--drop-unknown", help="Drop particles with no central component instead of class 'unknown'."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Subtomograms per network call."),
    device: str = device_option(),
    precision: str = precision_option(),
    pixel_size: float = pixel_size_option(),
) -> None:
    """Classify each particle: segment a subtomogram around it, keep the central particle, vote."""
    import warnings

    import pandas as pd
    from rich.progress import Progress

    from vpdetect.classify.pipeline import ClassifyOptions, classify_table, tomogram_groups
    from vpdetect.io.mrc import read_mrc_header, read_tomogram
    from vpdetect.io.particles import ParticleTable, read_particles, write_particles
    from vpdetect.localize.tiling import autocast_dtype

    if output_format is not None and output_format.lower() not in FORMAT_SUFFIX:
        raise VPDetectError(
            f"unknown output format {output_format!r}; choose one of {', '.join(FORMAT_SUFFIX)}"
        )
    if output is None:
        suffix = FORMAT_SUFFIX[output_format.lower()] if output_format else table.suffix or ".star"
        output = table.with_name(f"{table.stem}_classes{suffix}")
    if not output.resolve().parent.is_dir():
        raise VPDetectError(f"output directory does not exist: {output.parent}")

    tomo_size = None
    if tomogram is not None:
        z, y, x = read_mrc_header(tomogram)["shape"]
        tomo_size = (x, y, z)
    particles = read_particles(table, fmt=input_format, voxel_size=pixel_size, tomo_size=tomo_size)
    if len(particles) == 0:
        raise VPDetectError(f"{table} holds no particles: nothing to classify")
    groups = tomogram_groups(particles.data)
    if tomogram is not None and len(groups) > 1:
        raise VPDetectError(
            f"{table.name} names {len(groups)} tomograms; --tomogram applies to one (use --tomo-dir)"
        )
    # Find every tomogram before any work, so a missing one fails at once.
    paths = [
        tomogram if tomogram is not None else resolve_tomogram(
            name, _recorded_path(particles.data, rows), table, tomo_dir
        )
        for name, rows in groups
    ]
    resolved_device = resolve_device(device)
    autocast_dtype(resolved_device, precision.lower())  # validates the name
    net, card = load_classifier(str(resolve_model_path(model, "classifier")), resolved_device)
    options = ClassifyOptions(
        batch_size=batch_size, search_radius=search_radius, drop_unknown=drop_unknown,
        precision=precision.lower(),
    )

    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("classifying", total=len(particles))
        for (name, rows), path in zip(groups, paths, strict=True):
            progress.update(task, description=f"classifying {name or path.stem}")
            tomo = read_tomogram(path, voxel_size=pixel_size)
            data = particles.data.iloc[rows].copy()
            data["_row"] = rows  # restores the input order after grouping
            part = ParticleTable(data=data, voxel_size=particles.voxel_size, tomo_size=particles.tomo_size)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = classify_table(
                    tomo, part, net, card, options,
                    progress=lambda n: progress.advance(task, n),
                )
            for warning in caught:  # e.g. rows outside the tomogram: said once, on one line
                console.print(f"[yellow]warning:[/] {warning.message}", soft_wrap=True, highlight=False)
            results.append(result)

    merged = pd.concat([r.data for r in results], ignore_index=True)
    merged = merged.sort_values("_row", kind="stable").drop(columns="_row").reset_index(drop=True)
    sizes = {r.tomo_size for r in results}
    out = ParticleTable(
        data=merged,
        voxel_size=pixel_size or particles.voxel_size or results[0].voxel_size,
        tomo_size=sizes.pop() if len(sizes) == 1 else particles.tomo_size,
    )
    written = write_particles(output, out, fmt=output_format)
    n_tomos = len(groups)
    console.print(
        f"classified {len(merged)} particle(s) in {n_tomos} tomogram(s): {class_summary(merged)} "
        f"-> {output} ({written})"
    )


def _recorded_path(data, rows) -> str | None:
    if "tomo_path" not in data.columns:
        return None
    values = data["tomo_path"].iloc[rows].dropna().astype(str)
    return values.iloc[0] if len(values) else None
