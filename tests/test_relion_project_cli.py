"""--tomograms-star and --coords-pixel-size on the commands: picks of a binned tomogram
land where RELION and Warp read them, and a RELION project's tomograms are found."""

from __future__ import annotations

import numpy as np
import pytest
import starfile
from test_classify import run_cli, save_scene_model, write_shrec_scene
from test_localize_cli import CENTRES, intensity_localizer, scene
from test_relion_binning import CENTRED_LABELS, TOMOGRAM_LABELS, star_block

from vpdetect.io.mrc import write_mrc
from vpdetect.io.particles import read_particles, read_tomograms_star

# The tomogram TS_01.mrc is 44 x 40 x 36 voxels of 10 A: bin 4 of a 176 x 160 x 144 tilt
# series at 2.5 A.
TOMOGRAMS = star_block("global", TOMOGRAM_LABELS, "TS_01 {sx} 160 144 2.5 4 {path}")


@pytest.fixture
def project(tmp_path, rng):
    volume = scene(rng)
    write_mrc(tmp_path / "TS_01.mrc", volume, voxel_size=10.0)
    model = intensity_localizer(tmp_path / "localizer.pt", volume)
    star = tmp_path / "tomograms.star"
    star.write_text(TOMOGRAMS.format(sx=176, path="TS_01.mrc"))
    return tmp_path, model, star


def test_localize_relion5_output_in_a_binned_project(project):
    folder, model, star = project
    out = folder / "picks.star"
    result = run_cli("localize", folder / "TS_01.mrc", "--model", model, "-o", out, "--format", "relion5",
                     "--tomograms-star", star, "--tile", 24, "--device", "cpu")
    assert result.exit_code == 0, result.output
    plain = read_particles(out)  # the file's own global block
    with_star = read_particles(out, tomograms=read_tomograms_star(star))
    found = plain.coords_xyz()
    np.testing.assert_allclose(with_star.coords_xyz(), found, atol=1e-4)
    order = np.argsort(found[:, 0])
    expected_xyz = np.asarray(sorted((c[2], c[1], c[0]) for c in CENTRES))
    np.testing.assert_allclose(found[order], expected_xyz, atol=0.5)
    # By hand: centred A = (voxel * 4 - bin-1 size / 2) * 2.5; a centre at x = 12 voxels is
    # (48 - 88) * 2.5 = -100 A.
    particles = starfile.read(out, always_dict=True)["particles"]
    np.testing.assert_allclose(
        particles["rlnCenteredCoordinateXAngst"].to_numpy(), (found[:, 0] * 4 - 88) * 2.5, atol=1e-4)
    assert particles["rlnCenteredCoordinateXAngst"].min() == pytest.approx(-100, abs=2.5 * 4 * 0.5)
    assert set(particles["rlnTomoName"]) == {"TS_01"}

    # convert to RELION 4 with the same tomograms.star: bin-1 pixels = voxels * 4.
    r4 = folder / "picks_r4.star"
    result = run_cli("convert", out, r4, "--to", "relion4", "--tomograms-star", star)
    assert result.exit_code == 0, result.output
    coords = starfile.read(r4, always_dict=True)["particles"][["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]
    np.testing.assert_allclose(coords.to_numpy(), found * 4, atol=1e-4)


def test_localize_for_warp_and_a_mismatched_project(project):
    folder, model, star = project
    out = folder / "warp.star"
    result = run_cli("localize", folder / "TS_01.mrc", "--model", model, "-o", out, "--coords-pixel-size", 5,
                     "--tile", 24, "--device", "cpu")
    assert result.exit_code == 0, result.output
    particles = starfile.read(out, always_dict=True)["particles"]
    assert set(particles["rlnMicrographName"]) == {"TS_01.tomostar"}
    xs = np.sort(particles["rlnCoordinateX"].to_numpy())
    np.testing.assert_allclose(xs, np.sort([c[2] * 2 for c in CENTRES]), atol=1.0)  # 10 A voxels at 5 A
    # A tomograms.star that disagrees with the tomogram's header is refused in one line.
    star.write_text(TOMOGRAMS.format(sx=200, path="TS_01.mrc"))
    bad = folder / "bad.star"
    result = run_cli("localize", folder / "TS_01.mrc", "--model", model, "-o", bad, "--tomograms-star", star,
                     "--tile", 24, "--device", "cpu")
    assert result.exit_code == 2 and "rlnTomoSizeX/Y/Z" in result.output
    assert not bad.exists()


def test_classify_finds_the_tomogram_through_tomograms_star(tmp_path, rng):
    volume, particles = write_shrec_scene(tmp_path / "model_0", rng)
    model = save_scene_model(tmp_path / "classifier.pt", volume)
    # 40^3 voxels of 10 A, bin 2 of 5 A pixels; the tomogram lives in the project, not beside the table.
    star = tmp_path / "project" / "tomograms.star"
    star.parent.mkdir()
    star.write_text(TOMOGRAMS.replace("160 144", "80 80").format(sx=80, path="model_0/reconstruction.mrc")
                    .replace("2.5 4", "5 2"))
    tables = tmp_path / "tables"
    tables.mkdir()
    # The particles as RELION 5 holds them: centred A = (voxel * 2 - 40) * 5.
    rows = [f"TS_01 {(x * 2 - 40) * 5} {(y * 2 - 40) * 5} {(z * 2 - 40) * 5}" for _, x, y, z, _, _ in particles]
    (tables / "particles.star").write_text(star_block("particles", CENTRED_LABELS, *rows))
    out = tables / "classes.star"
    result = run_cli("classify", tables / "particles.star", "--model", model, "-o", out, "--format", "relion5",
                     "--tomograms-star", star, "--device", "cpu")
    assert result.exit_code == 0, result.output
    table = read_particles(out)
    assert table.data["class_name"].tolist() == [p[0] for p in particles]
    np.testing.assert_allclose(table.coords_xyz(), [p[1:4] for p in particles], atol=1e-4)
