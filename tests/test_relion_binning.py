"""RELION 5 geometry from tomograms.star: binned tomograms, several tomograms, both directions.

Expected values are worked out by hand from RELION's C++ reader
(bin-1 position = Angstrom / rlnTomoTiltSeriesPixelSize + rlnTomoSize / 2; the binned
tomogram's voxel = bin-1 position / rlnTomoTomogramBinning).
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import starfile

from vpdetect.errors import VPDetectError
from vpdetect.io.particles import (
    ParticleTable,
    assign_tomogram,
    read_particles,
    read_tomograms_star,
    write_particles,
)


def star_block(name: str, labels: str, *rows: str) -> str:
    """A STAR loop block: `labels` space-separated (without the leading underscore)."""
    header = "".join(f"_{label}\n" for label in labels.split())
    return f"\ndata_{name}\n\nloop_\n{header}" + "".join(f"{row}\n" for row in rows)


TOMOGRAM_LABELS = (
    "rlnTomoName rlnTomoSizeX rlnTomoSizeY rlnTomoSizeZ rlnTomoTiltSeriesPixelSize "
    "rlnTomoTomogramBinning rlnTomoReconstructedTomogram"
)
# Tilt series of 1.5 A pixels, bin-1 size 4000 x 3000 x 1600 pixels.
TOMOGRAMS_STAR = star_block(
    "global", TOMOGRAM_LABELS,
    "TS_01 4000 3000 1600 1.5 {binning} Tomograms/job007/tomograms/rec_TS_01.mrc",
    "TS_02 8000 8000 2000 1.35 8 Tomograms/job007/tomograms/rec_TS_02.mrc",
)

# What RELION 5's picker and extraction read: optics + particles, no tomogram sizes.
CENTRED_LABELS = "rlnTomoName rlnCenteredCoordinateXAngst rlnCenteredCoordinateYAngst rlnCenteredCoordinateZAngst"
PARTICLES_STAR = star_block(
    "optics", "rlnOpticsGroup rlnOpticsGroupName rlnTomoTiltSeriesPixelSize",
    "1 opticsGroup1 1.5", "2 opticsGroup2 1.35",
) + star_block(
    "particles", CENTRED_LABELS + " rlnOpticsGroup",
    "TS_01 150.0 -300.0 30.0 1", "TS_01 0.0 0.0 0.0 1", "TS_02 10.0 0.0 -13.5 2",
)

# Hand-computed voxels of TS_01 for each binning:
# x: (150/1.5 + 4000/2) / b = 2100 / b;  y: (-300/1.5 + 3000/2) / b = 1300 / b;
# z: (30/1.5 + 1600/2) / b = 820 / b;  the centre (0, 0, 0) A: (2000, 1500, 800) / b.
TS01_BIN1 = np.array([[2100.0, 1300.0, 820.0], [2000.0, 1500.0, 800.0]])
# TS_02 at bin 8, 1.35 A: x = (10/1.35 + 4000) / 8 = 500.925926 (the example: read
# as unbinned it landed at 10/1.35 + 500 = 507.4); y = 4000/8 = 500; z = (-10 + 1000)/8 = 123.75.
TS02 = np.array([[500.925926, 500.0, 123.75]])


def _project(tmp_path, binning):
    star = tmp_path / "tomograms.star"
    star.write_text(TOMOGRAMS_STAR.format(binning=binning))
    particles = tmp_path / "particles.star"
    particles.write_text(PARTICLES_STAR)
    return read_tomograms_star(star), particles


@pytest.mark.parametrize("binning", [1, 4, 8])
def test_reading_binned_tomograms_as_relion_does(tmp_path, binning):
    tomograms, particles = _project(tmp_path, binning)
    assert tomograms.geometry["TS_01"].voxel_size == pytest.approx(1.5 * binning)
    table = read_particles(particles, tomograms=tomograms)
    coords = table.coords_xyz()
    np.testing.assert_allclose(coords[:2], TS01_BIN1 / binning, atol=1e-9)
    np.testing.assert_allclose(coords[2:], TS02, atol=1e-6)
    assert list(table.data["tomo_name"]) == ["TS_01", "TS_01", "TS_02"]
    assert table.voxel_size is None  # two tomograms of different voxel sizes
    assert set(table.geometry) == {"TS_01", "TS_02"}


@pytest.mark.parametrize("binning", [1, 4, 8])
def test_writing_inverts_reading_exactly(tmp_path, binning):
    tomograms, particles = _project(tmp_path, binning)
    table = read_particles(particles, tomograms=tomograms)
    write_particles(tmp_path / "r5.star", table, fmt="relion5")
    blocks = starfile.read(tmp_path / "r5.star", always_dict=True)
    centred = blocks["particles"][[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy()
    np.testing.assert_allclose(centred, [[150, -300, 30], [0, 0, 0], [10, 0, -13.5]], atol=1e-5)
    glob = blocks["global"].set_index("rlnTomoName")
    assert glob.loc["TS_01", "rlnTomoTomogramBinning"] == binning
    assert tuple(glob.loc["TS_01", ["rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ"]]) == (4000, 3000, 1600)
    assert glob.loc["TS_02", "rlnTomoReconstructedTomogram"] == "Tomograms/job007/tomograms/rec_TS_02.mrc"
    # One optics group per tilt-series pixel size, the particles in theirs.
    optics = blocks["optics"].set_index("rlnOpticsGroup")["rlnTomoTiltSeriesPixelSize"]
    groups = blocks["particles"]["rlnOpticsGroup"].map(optics).to_numpy()
    np.testing.assert_allclose(groups, [1.5, 1.5, 1.35])
    # RELION 4 style: rlnCoordinateX/Y/Z in bin-1 pixels whatever the binning.
    write_particles(tmp_path / "r4.star", table, fmt="relion4")
    r4 = starfile.read(tmp_path / "r4.star", always_dict=True)["particles"]
    np.testing.assert_allclose(
        r4[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(),
        [[2100, 1300, 820], [2000, 1500, 800], [4007.407407, 4000, 990]], atol=1e-5,
    )
    # Both files place every particle in the same voxel again, alone or with tomograms.star.
    for name in ("r5.star", "r4.star"):
        for given in (None, tomograms):
            back = read_particles(tmp_path / name, tomograms=given)
            np.testing.assert_allclose(back.coords_xyz(), table.coords_xyz(), atol=0.01)


def test_bin4_round_trip_from_voxels(tmp_path, rng):
    tomograms, _ = _project(tmp_path, 4)
    voxels = rng.uniform(0, 1, (20, 3)) * np.array([1000, 750, 400])
    picked = ParticleTable.from_arrays(voxels, voxel_size=6.0, tomo_size=(1000, 750, 400), tomo_name="rec_TS_01")
    # A tomogram file named after rlnTomoReconstructedTomogram gets the row's rlnTomoName.
    placed = assign_tomogram(picked, tomograms, "rec_TS_01", tmp_path / "rec_TS_01.mrc", (1000, 750, 400), 6.0)
    assert set(placed.data["tomo_name"]) == {"TS_01"}
    write_particles(tmp_path / "p.star", placed, fmt="relion5")
    back = read_particles(tmp_path / "p.star", tomograms=tomograms)
    assert np.abs(back.coords_xyz() - voxels).max() < 0.01
    # By hand for one particle: centred A = (x * 4 - 4000 / 2) * 1.5.
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    assert blocks["particles"]["rlnCenteredCoordinateXAngst"].iloc[0] == pytest.approx(
        (voxels[0, 0] * 4 - 2000) * 1.5, abs=1e-5)


def test_without_tomograms_star_binning_one_is_assumed_and_logged(tmp_path, caplog):
    path = tmp_path / "one.star"
    path.write_text(PARTICLES_STAR.replace("TS_02 10.0 0.0 -13.5 2\n", ""))
    with caplog.at_level("INFO", logger="vpdetect.io"):
        table = read_particles(path, tomo_size=(4000, 3000, 1600))
    np.testing.assert_allclose(table.coords_xyz(), TS01_BIN1, atol=1e-9)
    assert "binning 1" in caplog.text
    with pytest.raises(VPDetectError, match="tomogram size"):
        read_particles(tmp_path / "one.star")


def test_tomograms_star_errors(tmp_path):
    tomograms, particles = _project(tmp_path, 4)
    other = tmp_path / "other.star"
    other.write_text(PARTICLES_STAR.replace("TS_02", "TS_09"))
    with pytest.raises(VPDetectError, match="'TS_09' is not in"):
        read_particles(other, tomograms=tomograms)
    table = ParticleTable.from_arrays([[1, 2, 3]], tomo_name="TS_01")
    with pytest.raises(VPDetectError, match=r"\(990, 750, 400\) voxels"):
        assign_tomogram(table, tomograms, "TS_01", None, (990, 750, 400), 6.0)
    with pytest.raises(VPDetectError, match="A voxels"):
        assign_tomogram(table, tomograms, "TS_01", None, (1000, 750, 400), 7.0)
    bad = tmp_path / "bad.star"
    bad.write_text(TOMOGRAMS_STAR.format(binning=0))
    with pytest.raises(VPDetectError, match="rlnTomoTomogramBinning must hold positive"):
        read_tomograms_star(bad)
    with pytest.raises(VPDetectError, match="not found"):
        read_tomograms_star(tmp_path / "absent.star")


def test_reconstructed_tomogram_found_from_the_project_folder(tmp_path):
    project = tmp_path / "project"
    star = project / "Tomograms" / "job007" / "tomograms.star"
    rec = project / "Tomograms" / "job007" / "tomograms" / "rec_TS_01.mrc"
    rec.parent.mkdir(parents=True)
    rec.write_bytes(b"")
    star.write_text(TOMOGRAMS_STAR.format(binning=4))
    tomograms = read_tomograms_star(star)
    assert tomograms.tomogram_path("TS_01") == rec
    assert tomograms.tomogram_path("TS_02") is None
    assert tomograms.match("rec_TS_01", rec) == "TS_01"


def test_warp_coordinates_at_a_chosen_pixel_size(tmp_path):
    tomograms, particles = _project(tmp_path, 4)
    table = read_particles(particles, tomograms=tomograms)
    write_particles(tmp_path / "warp.star", table, fmt="relion4", coords_pixel_size=10.0)
    warp = starfile.read(tmp_path / "warp.star", always_dict=True)["particles"]
    # TS_01 voxels of 6 A at 10 A: 525 * 6 / 10 = 315 etc.; TS_02 voxels of 10.8 A.
    np.testing.assert_allclose(
        warp[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]].to_numpy(),
        [[315, 195, 123], [300, 225, 120], [500.925926 * 1.08, 540, 123.75 * 1.08]], atol=1e-5,
    )
    assert list(warp["rlnMicrographName"]) == ["TS_01.tomostar", "TS_01.tomostar", "TS_02.tomostar"]
    with pytest.raises(VPDetectError, match="relion4"):
        write_particles(tmp_path / "w5.star", table, fmt="relion5", coords_pixel_size=10.0)


@pytest.mark.skipif(shutil.which("relion_star_printtable") is None, reason="RELION is not installed")
def test_relion_parses_binned_multi_tomogram_files(tmp_path):
    tomograms, particles = _project(tmp_path, 4)
    table = read_particles(particles, tomograms=tomograms)
    write_particles(tmp_path / "r5.star", table, fmt="relion5")

    def printed(block, *labels):
        done = subprocess.run(["relion_star_printtable", str(tmp_path / "r5.star"), block, *labels],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return [line.split() for line in done.stdout.splitlines() if line.strip()]

    rows = printed("data_particles", "rlnTomoName", "rlnCenteredCoordinateXAngst", "rlnOpticsGroup")
    assert [r[0] for r in rows] == ["TS_01", "TS_01", "TS_02"]
    np.testing.assert_allclose([float(r[1]) for r in rows], [150, 0, 10], atol=1e-5)
    glob = printed("data_global", "rlnTomoName", "rlnTomoTomogramBinning", "rlnTomoSizeX")
    assert [(r[0], float(r[1]), int(r[2])) for r in glob] == [("TS_01", 4.0, 4000), ("TS_02", 8.0, 8000)]
