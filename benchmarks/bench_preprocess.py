"""Does Fourier preprocessing help the localizer (issue 12 item 3)? membrain-seg ships
pixel-size matching (vpdetect resamples to the model's voxel size), amplitude-spectrum
matching and deconvolution; this measures the last two on annotated tomograms.

    python -m benchmarks preprocess [--model PATH] [--data FOLDER ...]

Every variant filters each tomogram, then runs the model with its card's post-processing
(`vpdetect tune` with the card's settings as a one-point grid: the same maps and scoring as
`localize` + `evaluate`), and reports SHREC localization F1 per tomogram and their mean:
- none: the tomogram as it is;
- matched (cap 1): `--match-spectrum` as users run it (after the card's background
  subtraction, towards the card's training reference, no frequency raised); matched (cap 10):
  the same with gains up to 10 (the background subtracted, matched and written, then the
  model subtracts it again, which changes nothing but rounding);
- deconvolved: the Wiener-like deconvolution filter of Warp's and IsoNet's preprocessing,
  ctf / (ctf^2 + 1/snr) with snr(f) = 10^(3 strength) exp(-100 f / (pixel_A falloff)) times a
  1 - cos high-pass over the first 2 % of Nyquist (f the fraction of Nyquist), strength and
  falloff 1, with each tomogram's true defocus from its simulation.json (300 kV, Cs 2.7 mm,
  7 % amplitude contrast), applied radially in 3D.

Default data: the 12 tomograms the bundled localizer's post-processing is tuned on, simulated
as `examples/train_default_models.sh` does (shrec21 seed 202; generalist seed 1003 x 8;
shrec21 at SNR 0.05 / 0.1 / 0.25, seed 303) under .bench/preprocess/data. Never the
training tomograms.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks.bench_generalization import _run_cli

WORK_DIR = Path(".bench/preprocess")
SIMULATIONS = (
    ("val", ["--n-tomograms", "1", "--preset", "shrec21", "--shape", "256", "256", "128",
             "--slab-thickness", "100", "--seed", "202"]),
    ("tune_gen", ["--n-tomograms", "8", "--preset", "generalist", "--seed", "1003"]),
    *((f"tune_snr{snr}", ["--n-tomograms", "1", "--preset", "shrec21", "--shape", "192", "192", "96",
                          "--slab-thickness", "72", "--seed", "303", "--snr", snr])
      for snr in ("0.05", "0.1", "0.25")),
)
VARIANTS = ("none", "matched (cap 1)", "matched (cap 10)", "deconvolved")


def deconvolution_gain(radius: np.ndarray, voxel_nm: float, defocus_um: float, strength: float = 1.0,
                       falloff: float = 1.0, highpass_nyquist: float = 0.02, voltage_kv: float = 300.0,
                       cs_mm: float = 2.7, amplitude: float = 0.07) -> np.ndarray:
    """The deconvolution filter at spatial frequencies `radius` (cycles/voxel), positive at low
    frequency so that dense matter keeps its contrast."""
    from vpdetect.simulate.microscope import electron_wavelength_nm

    k2 = (np.asarray(radius, dtype=np.float64) / voxel_nm) ** 2  # 1/nm^2
    wavelength = electron_wavelength_nm(voltage_kv)
    chi = np.pi * wavelength * defocus_um * 1e3 * k2 - 0.5 * np.pi * cs_mm * 1e6 * wavelength**3 * k2**2
    ctf = np.sqrt(1.0 - amplitude**2) * np.sin(chi) + amplitude * np.cos(chi)
    nyquist = np.minimum(np.asarray(radius, dtype=np.float64) / 0.5, 1.0)
    highpass = 1.0 - np.cos(np.pi * np.minimum(nyquist / highpass_nyquist, 1.0))
    snr = 10.0 ** (3.0 * strength) * np.exp(-100.0 * nyquist / (10.0 * voxel_nm * falloff)) * highpass
    return ctf * snr / (ctf * ctf * snr + 1.0)


def deconvolve(volume: np.ndarray, voxel_nm: float, defocus_um: float) -> np.ndarray:
    from scipy import fft

    from vpdetect.spectrum import frequency_radius

    data = np.asarray(volume, dtype=np.float32)
    gain = deconvolution_gain(frequency_radius(data.shape, real_last=True), voxel_nm, defocus_um)
    return fft.irfftn(fft.rfftn(data) * gain.astype(np.float32), s=data.shape).astype(np.float32)


def default_data(root: Path) -> list[Path]:
    """The tuning tomograms (simulated once, kept)."""
    folders = []
    for name, args in SIMULATIONS:
        out = root / name
        n = int(args[1])
        if not (out / f"model_{n - 1}" / "simulation.json").is_file():
            _run_cli(["simulate", str(out), *args, "--overwrite"])
        folders += [out / f"model_{i}" for i in range(n)]
    return folders


def filtered_copy(folder: Path, out: Path, variant: str, card: dict) -> None:
    """`folder` (SHREC layout) with its reconstruction through `variant` ("matched (cap 10)" or
    "deconvolved"), truth copied."""
    from vpdetect.io.mrc import read_tomogram, write_mrc
    from vpdetect.preprocess import subtract_background
    from vpdetect.spectrum import match_spectrum

    out.mkdir(parents=True, exist_ok=True)
    tomo = read_tomogram(folder / "reconstruction.mrc", mmap=False)
    volume = tomo.data
    if variant == "matched (cap 10)":
        seen = subtract_background(volume, card.get("background_sigma"))
        volume = match_spectrum(seen, card["spectrum_reference"], max_gain=10.0)
    else:
        record = json.loads((folder / "simulation.json").read_text())
        volume = deconvolve(volume, tomo.voxel_size / 10.0, float(record["microscope"]["defocus_um"]))
    write_mrc(out / "reconstruction.mrc", volume, tomo.voxel_size)
    for name in ("occupancy_mask.mrc", "particle_locations.txt", "simulation.json"):
        shutil.copyfile(folder / name, out / name)


def one_point_grid(card: dict) -> list[str]:
    post = card.get("postprocess") or {}
    if "bandwidth_factor" not in post:
        raise SystemExit("the model's card holds no tuned post-processing (run vpdetect tune first)")
    return ["--threshold", f"{post['threshold']:g}", "--bandwidth-factor", f"{post['bandwidth_factor']:g}",
            "--merge-factor", f"{post['merge_factor']:g}", "--min-size", str(post["min_size"]),
            "--max-component", f"{post.get('max_component', 0.0):g}"]


def run(argv: list[str] | None = None) -> dict:
    from vpdetect.models import default_model_path
    from vpdetect.nn.checkpoint import read_model_card

    parser = argparse.ArgumentParser(prog="python -m benchmarks preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="Localizer (default: the bundled one).")
    parser.add_argument("--data", type=Path, action="append", default=None,
                        help="SHREC-layout folder with simulation.json (repeat; default: the tuning tomograms).")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR)
    args = parser.parse_args(list(argv or []))
    model = args.model or default_model_path("localizer")
    card = read_model_card(model)
    if not card.get("spectrum_reference"):
        raise SystemExit(f"{model} records no reference spectrum")
    data = args.data or default_data(args.work_dir / "data")
    grid = one_point_grid(card)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"localizer: {model}; {len(data)} tomogram(s); settings {' '.join(grid)}", flush=True)
    scores = {}
    for variant in VARIANTS:
        folders = []
        for i, folder in enumerate(data):
            if variant in ("none", "matched (cap 1)"):  # the tomograms as they are (cap 1: --match-spectrum)
                folders.append(folder)
                continue
            out = args.work_dir / variant.replace(" ", "_").replace("(", "").replace(")", "") / f"t{i:02d}"
            filtered_copy(folder, out, variant, card)
            folders.append(out)
        tuned = args.work_dir / "tuned.pt"
        matching = "--match-spectrum" if variant == "matched (cap 1)" else "--no-match-spectrum"
        _run_cli(["tune", str(model), "-o", str(tuned), *grid, matching,
                  *[a for f in folders for a in ("--data", str(f))]])
        scores[variant] = read_model_card(tuned)["postprocess"]["f1_per_map"]
        print(f"  {variant:18s} mean F1 {np.mean(scores[variant]):.3f}", flush=True)
    lines = ["| tomogram | SNR | defocus (um) | " + " | ".join(VARIANTS) + " |",
             "|---|---|---|" + "---|" * len(VARIANTS)]
    for i, folder in enumerate(data):
        micro = json.loads((folder / "simulation.json").read_text())["microscope"]
        snr = micro.get("snr")
        lines.append(f"| {folder.parent.name}/{folder.name} | {'-' if snr is None else f'{snr:.3g}'} | "
                     f"{micro['defocus_um']:.2f} | " + " | ".join(f"{scores[v][i]:.3f}" for v in VARIANTS) + " |")
    lines.append("| **mean** | | | " + " | ".join(f"**{np.mean(scores[v]):.3f}**" for v in VARIANTS) + " |")
    print("\n" + "\n".join(lines))
    return scores
