"""`vpdetect simulate`: SHREC-like tomograms with full ground truth."""

from __future__ import annotations

from pathlib import Path

import typer

from vpdetect.cli.app import app, console, user_errors
from vpdetect.errors import VPDetectError

OUTPUT_FILES = (
    "reconstruction.mrc",
    "grandmodel.mrc",
    "class_mask.mrc",
    "occupancy_mask.mrc",
    "particle_locations.txt",
    "simulation.json",
)


@app.command()
@user_errors
def simulate(
    out_dir: Path = typer.Argument(..., help="Folder to write model_0 ... model_{N-1} into (created if missing)."),
    n_tomograms: int = typer.Option(1, "--n-tomograms", "-n", help="Number of tomograms to simulate."),
    preset: str = typer.Option(
        "shrec21", "--preset",
        help="shrec21: SHREC'21-like 512^3, 200-voxel slab, crowded, SNR 0.5; easy: small, clean, quick; "
        "generalist: 192x192x96, every tomogram draws SNR, defocus, tilts, filter, contrast, crowding, "
        "context and procedural shapes (options given here fix the drawn value); generalist-context: the "
        "same with 12-25 gold beads in every tomogram and a textured carbon edge in about every second one.",
    ),
    shape: tuple[int, int, int] = typer.Option(
        None, "--shape", help="Volume size in voxels, X Y Z (default: the preset's)."
    ),
    slab_thickness: int = typer.Option(
        None, "--slab-thickness", help="Thickness (z, voxels) of the ice slab holding the particles (default: the preset's, at most z)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed; model_i uses the seed sequence (seed, i)."),
    snr: float = typer.Option(
        None, "--snr", help="Tomogram SNR = var(signal)/var(noise) (SHREC'21 definition; default: preset's)."
    ),
    n_particles: int = typer.Option(
        None, "--n-particles", help="Proteins per tomogram (default: drawn from the preset's crowding)."
    ),
    classes: str = typer.Option(
        None, "--classes", help="Comma-separated protein classes to use (default: all 12 syn-* classes; an unknown name lists them)."
    ),
    vesicles: bool = typer.Option(True, "--vesicles/--no-vesicles", help="Add lipid vesicles."),
    fiducials: bool = typer.Option(True, "--fiducials/--no-fiducials", help="Add gold fiducials."),
    membrane_proteins: float = typer.Option(
        None, "--membrane-proteins",
        help="Share (0-1) of the proteins placed on the vesicles' outer surface, touching the membrane "
             "(default 0; the generalist preset draws it per tomogram).",
    ),
    tilt_range: tuple[float, float] = typer.Option(
        None, "--tilt-range", help="First and last tilt angle in degrees (default -60 60)."
    ),
    tilt_step: float = typer.Option(None, "--tilt-step", help="Tilt increment in degrees (default 2)."),
    defocus: tuple[float, float] = typer.Option(
        None, "--defocus", help="Range (micrometres, underfocus) the defocus is drawn from per tomogram."
    ),
    contrast: str = typer.Option(
        None, "--contrast", help="dark (dense particles dark, as reconstructed) or bright (contrast-inverted)."
    ),
    recon_filter: str = typer.Option(
        None, "--recon-filter", help="Weighted back-projection filter: ramp, shepp-logan, cosine or hann (default ramp)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing model folders' files."),
) -> None:
    """Simulate crowded cryo-ET tomograms with ground truth, in the SHREC layout.

    Each model_i folder holds reconstruction.mrc, grandmodel.mrc, class_mask.mrc,
    occupancy_mask.mrc, particle_locations.txt (CLASS x y z phi theta psi; ZXZ
    degrees) and simulation.json. Voxel size 10 A; the tilt axis is y.
    """
    import time

    from vpdetect.simulate.pipeline import preset_params, simulate_tomogram

    if n_tomograms < 1:
        raise VPDetectError(f"--n-tomograms must be at least 1, got {n_tomograms}")
    if seed < 0:
        raise VPDetectError(f"--seed must be non-negative, got {seed}")
    overrides: dict = {"vesicles": vesicles, "fiducials": fiducials}
    if shape is not None:
        overrides["shape_xyz"] = tuple(int(v) for v in shape)
    if slab_thickness is not None:
        overrides["slab_thickness"] = slab_thickness
    elif shape is not None and not preset.startswith("generalist"):
        # keep the preset's slab unless it no longer fits the requested depth
        from vpdetect.simulate.pipeline import PRESETS

        preset_slab = PRESETS.get(preset, {}).get("slab_thickness", shape[2])
        overrides["slab_thickness"] = min(preset_slab, int(shape[2]))
    if snr is not None:
        overrides["snr"] = snr
    if n_particles is not None:
        overrides["n_proteins"] = n_particles
    if classes is not None:
        overrides["classes"] = tuple(name.strip() for name in classes.split(",") if name.strip())
    if tilt_range is not None:
        overrides["tilt_min"], overrides["tilt_max"] = tilt_range
    if tilt_step is not None:
        overrides["tilt_step"] = tilt_step
    if defocus is not None:
        overrides["defocus_range_um"] = tuple(defocus)
    if contrast is not None:
        overrides["contrast"] = contrast
    if recon_filter is not None:
        overrides["recon_filter"] = recon_filter
    if membrane_proteins is not None:
        overrides["membrane_protein_share"] = membrane_proteins
    params = preset_params(preset, **overrides)
    params.validate()

    folders = [out_dir / f"model_{i}" for i in range(n_tomograms)]
    if not overwrite:
        for folder in folders:
            existing = [name for name in OUTPUT_FILES if (folder / name).exists()]
            if existing:
                raise VPDetectError(f"{folder / existing[0]} exists; use --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise VPDetectError(f"output path is not a folder: {out_dir}")

    x, y, z = params.shape_xyz
    console.print(
        f"simulating {n_tomograms} tomogram(s) of {x} x {y} x {z} voxels (slab {params.slab_thickness}), "
        f"preset {params.preset}, seed {seed}"
    )
    for index, folder in enumerate(folders):
        start = time.perf_counter()
        with console.status(f"model_{index}: starting") as status:
            result = simulate_tomogram(
                params, seed=[seed, index],
                progress=lambda message, i=index: status.update(f"model_{i}: {message}"),
            )
            status.update(f"model_{index}: writing {folder}")
            folder.mkdir(parents=True, exist_ok=True)
            _write_result(folder, result, params.voxel_size_nm * 10.0)
        snr_text = result.metadata["snr_measured"]
        snr_text = "noise-free" if snr_text is None else f"SNR {snr_text:.3f}"
        console.print(
            f"model_{index}: {len(result.particles.data)} particles, {snr_text}, "
            f"defocus {result.metadata['microscope']['defocus_um']:.2f} um, "
            f"{time.perf_counter() - start:.1f} s -> {folder}"
        )


def _write_result(folder: Path, result, voxel_size_angstrom: float) -> None:
    import json

    from vpdetect.io.atomic import write_text_atomic
    from vpdetect.io.mrc import write_mrc

    write_mrc(folder / "reconstruction.mrc", result.reconstruction, voxel_size_angstrom)
    write_mrc(folder / "grandmodel.mrc", result.grandmodel, voxel_size_angstrom)
    write_mrc(folder / "class_mask.mrc", result.class_mask, voxel_size_angstrom)
    write_mrc(folder / "occupancy_mask.mrc", result.occupancy, voxel_size_angstrom)
    _write_locations(folder / "particle_locations.txt", result.particles)
    write_text_atomic(
        folder / "simulation.json", json.dumps(result.metadata, indent=2, allow_nan=False) + "\n"
    )



def _write_locations(path: Path, particles) -> None:
    """SHREC particle_locations.txt: CLASS x y z phi theta psi (integer voxels, ZXZ degrees)."""
    from vpdetect.io.particles import ParticleTable, write_particles

    columns = ["class_name", "class_number", "x", "y", "z", "phi", "theta", "psi"]
    table = ParticleTable(data=particles.data[columns].copy(), voxel_size=particles.voxel_size,
                          tomo_size=particles.tomo_size)
    write_particles(path, table, fmt="shrec")
