"""`vpdetect simulate`: phantoms, scenes, the microscope, the pipeline and the CLI."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

import vpdetect.cli  # noqa: F401 - registers the commands
from vpdetect.cli.app import app
from vpdetect.errors import VPDetectError
from vpdetect.simulate.microscope import (
    MicroscopeParams,
    build_backprojector,
    ctf_2d,
    electron_wavelength_nm,
    image_and_reconstruct,
    project,
    tilt_angles,
)
from vpdetect.simulate.phantoms import (
    class_by_name,
    euler_zxz_matrix,
    fiducial_class,
    protein_classes,
    render,
    shape_geometry,
    vesicle_class,
)
from vpdetect.simulate.pipeline import preset_params, simulate_tomogram
from vpdetect.simulate.scene import build_scene, random_orientations

# SHREC'21 table 1: volume (nm^3) and effective radius (nm), lightest first.
SHREC21_TABLE = [
    (90.82, 2.481), (127.9, 2.789), (196.5, 3.083), (347.0, 2.807), (401.2, 3.358),
    (516.0, 3.368), (499.3, 3.327), (1136.0, 4.573), (1021.0, 5.25), (1354.0, 3.821),
    (2675.0, 4.347), (6372.0, 6.047),
]
SMALL = dict(shape_xyz=(48, 48, 40), slab_thickness=36)
runner = CliRunner()


# ----------------------------------------------------------------------------- phantoms


def test_twelve_named_classes_span_the_shrec21_table():
    classes = protein_classes()
    assert len(classes) == 12
    for particle_class, (volume, radius) in zip(classes, SHREC21_TABLE, strict=True):
        assert particle_class.name.startswith("syn-") and particle_class.name == particle_class.name.lower()
        assert " " not in particle_class.name
        geometry = shape_geometry(particle_class.shape)
        assert geometry["volume_nm3"] == pytest.approx(volume, rel=0.2), particle_class.name
        assert geometry["effective_radius_nm"] == pytest.approx(radius, rel=0.25), particle_class.name
        assert 0.4 < geometry["sphericity"] < 1.0
    assert [c.size_group for c in classes] == ["small"] * 5 + ["medium"] * 5 + ["large"] * 2


def test_sphere_geometry_is_exact():
    geometry = shape_geometry(fiducial_class(4.0).shape, step_nm=0.25)
    assert geometry["volume_nm3"] == pytest.approx(4 / 3 * np.pi * 64, rel=0.02)
    assert geometry["sphericity"] == pytest.approx(1.0, abs=0.02)
    assert geometry["effective_radius_nm"] == pytest.approx(4.0, rel=0.02)


def test_every_class_centre_lies_on_the_particle():
    # a pick at the written centre must hit the particle's own voxel
    for particle_class in protein_classes():
        assert particle_class.shape.sdf(np.zeros((1, 3)))[0] < -0.4, particle_class.name
        _, mask = render(particle_class, (12.0, 34.0, 56.0))
        centre = mask.shape[0] // 2
        assert mask[centre, centre, centre]


def test_euler_convention_matches_scipy_intrinsic_zxz():
    rng = np.random.default_rng(0)
    for phi, theta, psi in rng.uniform(0, 360, size=(5, 3)):
        expected = Rotation.from_euler("ZXZ", [phi, theta, psi], degrees=True).as_matrix()
        np.testing.assert_allclose(euler_zxz_matrix(phi, theta, psi), expected, atol=1e-12)


def test_render_rotation_moves_body_x_to_world_y():
    # Rz(90): body (x, y, z) -> world (-y, x, z); arrays are [z, y, x]
    particle_class = class_by_name("syn-get3")
    plain, plain_mask = render(particle_class, (0.0, 0.0, 0.0))
    turned, turned_mask = render(particle_class, (90.0, 0.0, 0.0))
    assert plain.shape == turned.shape
    c = plain.shape[0] // 2
    idx = np.arange(plain.shape[0]) - c
    z, y_world, x_world = np.meshgrid(idx, idx, idx, indexing="ij")
    # world (X, Y) came from body (x, y) = (Y, -X)
    source = plain[z + c, -x_world + c, y_world + c]
    np.testing.assert_allclose(turned, source, atol=1e-5)
    assert np.array_equal(turned_mask, plain_mask[z + c, -x_world + c, y_world + c])


def test_vesicle_is_a_bilayer_shell():
    density, mask = render(vesicle_class(10.0, 4.0))
    c = mask.shape[0] // 2
    assert not mask[c, c, c]  # hollow
    radial = density[c, c, c:]
    assert mask[c, c, c + 8] and not mask[c, c, c + 5]
    # head groups denser than the tail region at the membrane's middle (r = 8)
    assert radial[7] > radial[8] < radial[9]
    with pytest.raises(VPDetectError):
        vesicle_class(3.0, 4.0)


# ----------------------------------------------------------------------------- scene


def test_orientations_are_uniform_over_so3():
    angles = random_orientations(np.random.default_rng(1), 20000)
    matrices = Rotation.from_euler("ZXZ", angles, degrees=True).as_matrix()
    # for a Haar-random rotation every matrix entry has mean 0 and the image of
    # any axis is uniform on the sphere (its z component uniform on [-1, 1])
    assert np.abs(matrices.mean(axis=0)).max() < 0.03
    for column in range(3):
        assert stats.kstest(matrices[:, 2, column], "uniform", args=(-1, 2)).pvalue > 1e-3
    assert angles.min() >= 0 and angles[:, [0, 2]].max() < 360 and angles[:, 1].max() <= 180


@pytest.fixture(scope="module")
def small_scene():
    classes = [class_by_name(n) for n in ("syn-atpase", "syn-hsp90", "syn-p97", "syn-cand1")]
    classes += [vesicle_class(7.0), fiducial_class(3.0)]
    scene = build_scene(
        (48, 48, 40), 34, classes, [1, 2, 3, 4, 5, 6], [4, 3, 1, 1, 1, 2], np.random.default_rng(5)
    )
    return scene


def test_scene_places_without_overlap_and_in_the_slab(small_scene):
    scene = small_scene
    assert len(scene.placements) == 12
    assert scene.occupancy.max() == 12
    z0, z1 = scene.slab
    assert scene.density[:z0].max() == 0 and scene.density[z1:].max() == 0
    for k, placement in enumerate(scene.placements, start=1):
        owned = scene.occupancy == k
        assert owned.any()
        # each id carries exactly one class label (no overlaps mixing particles)
        labels = np.unique(scene.class_mask[owned])
        label = scene.labels[placement.class_index]
        assert set(labels) <= {0, label}
        assert scene.occupancy[placement.z, placement.y, placement.x] == k
        assert z0 <= placement.z < z1


def test_rendering_written_angles_reproduces_the_particle(small_scene):
    scene = small_scene
    for k, p in enumerate(scene.placements, start=1):
        particle_class = scene.classes[p.class_index]
        density, mask = render(particle_class, (p.phi, p.theta, p.psi))
        h = mask.shape[0] // 2
        box = (slice(p.z - h, p.z + h + 1), slice(p.y - h, p.y + h + 1), slice(p.x - h, p.x + h + 1))
        owned = scene.occupancy[box] == k
        if particle_class.kind != "vesicle":
            assert np.array_equal(owned, mask)  # exactly the rendered solid
        assert np.array_equal(scene.class_mask[box][mask], np.full(mask.sum(), scene.labels[p.class_index]))
        np.testing.assert_array_equal(scene.density[box][owned], density[owned])


def test_too_many_particles_cannot_fit():
    with pytest.raises(VPDetectError, match="cannot fit"):
        build_scene((24, 24, 24), 20, [class_by_name("syn-rubisco")], [1], [40], np.random.default_rng(0))
    with pytest.raises(VPDetectError, match="cannot fit"):
        build_scene((24, 24, 24), 20, [class_by_name("syn-ribosome")], [1], [1], np.random.default_rng(0))


# ----------------------------------------------------------------------------- microscope


def test_tilt_angles_and_wavelength():
    angles = tilt_angles(-60, 60, 2)
    assert len(angles) == 61 and angles[0] == -60 and angles[-1] == 60 and 0 in angles
    assert electron_wavelength_nm(300) == pytest.approx(0.001969, rel=1e-3)


def test_ctf_first_zero_at_the_defocus_formula():
    params = MicroscopeParams(defocus_um=3.0, cs_mm=0.0, amplitude_contrast=0.0, b_factor_nm2=0.0)
    ctf = ctf_2d((8, 1024), 0.25, params)[0]
    k = np.fft.rfftfreq(1024, d=0.25)
    first_zero = k[1:][np.argmax(np.diff(np.sign(ctf[1:])) != 0)]
    expected = 1.0 / np.sqrt(electron_wavelength_nm(300) * 3000.0)
    assert first_zero == pytest.approx(expected, abs=2 * (k[1] - k[0]))
    assert ctf[1] < 0  # weak phase object in underfocus: dense matter dark


def test_projection_is_a_line_integral():
    # a uniform slab of thickness T projects to T / cos(theta) away from the edges
    nx, nz, thickness = 64, 48, 10
    angles = np.array([0.0, 60.0])
    volume = np.zeros((nz, 3, nx), np.float32)
    volume[19:29] = 1.0
    matrix = build_backprojector(nx, nz, angles)
    images = project(volume, matrix, len(angles))
    assert images[0, 1, 32] == pytest.approx(thickness, rel=1e-5)
    assert images[1, 1, 32] == pytest.approx(thickness / np.cos(np.deg2rad(60)), rel=0.02)


@pytest.mark.parametrize("xyz", [(12, 30, 20), (33, 9, 27), (24, 24, 17)])
def test_point_reconstructs_at_its_position(xyz):
    x, y, z = xyz
    volume = np.zeros((44, 40, 48), np.float32)
    volume[z, y, x] = 1.0
    params = MicroscopeParams(snr=None, ctf=False, max_shift_nm=0.0)
    reconstruction, record = image_and_reconstruct(volume, (10, 34), params, np.random.default_rng(0))
    assert np.unravel_index(np.argmax(reconstruction), reconstruction.shape) == (z, y, x)
    assert record["tilt_axis"] == "y" and record["snr_measured"] is None


def test_reconstruction_shows_the_missing_wedge():
    rng = np.random.default_rng(2)
    volume = rng.standard_normal((48, 48, 48)).astype(np.float32)
    params = MicroscopeParams(snr=None, ctf=False, max_shift_nm=0.0, ice_attenuation=False)
    reconstruction, _ = image_and_reconstruct(volume, (0, 48), params, rng)
    power = np.abs(np.fft.fftn(reconstruction)) ** 2
    k = np.fft.fftfreq(48)
    kz, _, kx = np.meshgrid(k, k, k, indexing="ij")
    radius = np.hypot(kx, kz)
    band = (radius > 0.08) & (radius < 0.4)
    # angle of (kx, kz) from the kz axis: tilts up to 60 degrees leave +-30 degrees unsampled
    from_kz = np.degrees(np.arctan2(np.abs(kx), np.abs(kz)))
    inside = band & (from_kz < 20)
    outside = band & (from_kz > 40)
    assert power[inside].mean() < 0.05 * power[outside].mean()


def test_noise_is_scaled_to_the_requested_snr():
    volume = np.zeros((32, 32, 40), np.float32)
    volume[10:22, 8:24, 10:30] = np.random.default_rng(3).random((12, 16, 20)) > 0.7
    for snr in (0.3, 2.0):
        params = MicroscopeParams(snr=snr, defocus_um=3.0)
        _, record = image_and_reconstruct(volume, (4, 28), params, np.random.default_rng(4))
        assert record["snr_measured"] == pytest.approx(snr, rel=0.25)


def test_impossible_microscope_parameters():
    for bad in (dict(tilt_min=-95.0), dict(tilt_max=91.0), dict(tilt_step=0.0), dict(defocus_um=-1.0),
                dict(snr=-0.5), dict(amplitude_contrast=1.5)):
        with pytest.raises(VPDetectError):
            MicroscopeParams(**bad).validate()


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_is_deterministic_and_consistent():
    params = preset_params("easy", **SMALL)
    first = simulate_tomogram(params, seed=11)
    second = simulate_tomogram(params, seed=11)
    for name in ("reconstruction", "grandmodel", "class_mask", "occupancy"):
        assert np.array_equal(getattr(first, name), getattr(second, name)), name
    assert first.particles.data.equals(second.particles.data)
    other = simulate_tomogram(params, seed=12)
    assert not np.array_equal(first.occupancy, other.occupancy)

    result = first
    assert result.reconstruction.shape == (40, 48, 48)
    assert result.reconstruction.dtype == np.float32
    assert abs(float(result.reconstruction.mean())) < 1e-3
    table = {row["name"]: row for row in result.metadata["classes"]}
    assert table["vesicle"]["kind"] == "vesicle" and table["fiducial"]["kind"] == "fiducial"
    assert table["syn-ribosome"]["size_group"] == "large"
    assert len(result.particles.data) == result.occupancy.max()
    assert result.particles.voxel_size == 10.0 and result.particles.tomo_size == (48, 48, 40)
    assert set(result.particles.data["kind"]) >= {"protein", "fiducial"}
    for row in result.particles.data.itertuples():
        assert result.class_mask[row.z, row.y, row.x] in (0, table[row.class_name]["label"])
    assert result.metadata["snr_measured"] == pytest.approx(params.microscope.snr, rel=0.3)


def test_bad_simulation_parameters_name_the_problem():
    cases = [
        (dict(shape_xyz=(48, -4, 40)), "shape"),
        (dict(slab_thickness=60, shape_xyz=(48, 48, 40)), "slab"),
        (dict(n_proteins=-3), "non-negative"),
        (dict(classes=("syn-unicorn",)), "unknown particle class"),
        (dict(tilt_min=-100.0), "tilt range"),
    ]
    for overrides, message in cases:
        with pytest.raises(VPDetectError, match=message):
            preset_params("easy", **overrides).validate()
    with pytest.raises(VPDetectError, match="preset"):
        preset_params("nonsense")


# ----------------------------------------------------------------------------- CLI


def _simulate(out, *extra):
    args = ["simulate", str(out), "--preset", "easy", "--shape", "48", "48", "48",
            "--slab-thickness", "40", *extra]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    result = _simulate(out, "--seed", "4", "--n-tomograms", "2")
    assert result.exit_code == 0, result.output
    return out


def test_cli_writes_the_shrec_layout(simulated):
    folder = simulated / "model_0"
    for name in ("reconstruction.mrc", "grandmodel.mrc", "class_mask.mrc", "occupancy_mask.mrc",
                 "particle_locations.txt", "simulation.json"):
        assert (folder / name).is_file(), name
    assert (simulated / "model_1" / "reconstruction.mrc").is_file()
    with mrcfile.open(folder / "reconstruction.mrc") as handle:
        assert handle.data.shape == (48, 48, 48) and handle.data.dtype == np.float32
        assert float(handle.voxel_size.x) == pytest.approx(10.0)
    with mrcfile.open(folder / "occupancy_mask.mrc") as handle:
        occupancy = handle.data.astype(int)
    with mrcfile.open(folder / "class_mask.mrc") as handle:
        class_mask = handle.data.astype(int)
    lines = (folder / "particle_locations.txt").read_text().splitlines()
    assert len(lines) == occupancy.max()
    meta = json.loads((folder / "simulation.json").read_text())
    labels = {row["name"]: row["label"] for row in meta["classes"]}
    assert meta["seed"] == 4 and meta["voxel_size_angstrom"] == 10.0
    assert {"name", "label", "radius_nm", "volume", "sphericity", "size_group", "kind"} <= set(meta["classes"][0])
    for k, line in enumerate(lines, start=1):
        name, x, y, z, *angles = line.split()
        assert len(angles) == 3
        x, y, z = int(x), int(y), int(z)  # integer voxel indices
        assert occupancy[z, y, x] == k  # line k is occupancy id k
        if name != "vesicle":
            assert class_mask[z, y, x] == labels[name]
    assert "fiducial" in {line.split()[0] for line in lines}


def test_cli_same_seed_gives_identical_files(simulated, tmp_path):
    result = _simulate(tmp_path, "--seed", "4")
    assert result.exit_code == 0, result.output
    for path in sorted((simulated / "model_0").iterdir()):
        assert (tmp_path / "model_0" / path.name).read_bytes() == path.read_bytes(), path.name


def test_cli_refuses_to_overwrite(simulated):
    result = _simulate(simulated, "--seed", "4")
    assert result.exit_code == 2 and "--overwrite" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tilt-range", "-60", "95"], "tilt range"),
        (["--slab-thickness", "-5"], "slab thickness"),
        (["--n-particles", "400"], "cannot fit"),
        (["--shape", "16", "16", "16", "--slab-thickness", "12"], "cannot fit"),
        (["--snr", "0"], "SNR"),
    ],
)
def test_cli_impossible_parameters_exit_2_without_output(tmp_path, extra, message):
    out = tmp_path / "out"
    result = _simulate(out, *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if "error" in line]) == 1
    assert not (out / "model_0" / "reconstruction.mrc").exists()


def test_ground_truth_scores_perfectly(simulated, tmp_path):
    folder = simulated / "model_0"
    # SHREC'21 does not score vesicles (context, not targets): picks are the other lines
    picks = tmp_path / "picks.txt"
    lines = (folder / "particle_locations.txt").read_text().splitlines()
    picks.write_text("".join(line + "\n" for line in lines if not line.startswith("vesicle ")))
    report = tmp_path / "metrics.json"
    result = runner.invoke(app, ["evaluate", str(picks), "--truth", str(folder), "--json", str(report)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())
    assert metrics["localization"]["f1"] == 1.0
    assert metrics["localization"]["AD"] == 0.0


def test_membrane_proteins_touch_their_vesicle_and_share_zero_changes_nothing():
    classes = [class_by_name(n) for n in ("syn-hsp90", "syn-cand1", "syn-atpase")] + [vesicle_class(12.0)]
    args = ((64, 64, 48), 44, classes, [1, 2, 3, 4], [6, 6, 6, 1])
    plain = build_scene(*args, np.random.default_rng(2))
    # share 0 draws nothing extra: the scene is byte-identical to one built without the option
    again = build_scene(*args, np.random.default_rng(2), membrane_share=0.0)
    assert np.array_equal(plain.occupancy, again.occupancy) and again.on_membrane == []
    bound = build_scene(*args, np.random.default_rng(2), membrane_share=1.0)
    vesicle_id = next(k for k, p in enumerate(bound.placements, 1) if classes[p.class_index].kind == "vesicle")
    assert len(bound.on_membrane) >= 12  # nearly every protein found a place on the vesicle
    vesicle = bound.occupancy == vesicle_id
    for k in range(1, len(bound.placements) + 1):
        if k == vesicle_id:
            continue
        touches = (ndimage.binary_dilation(bound.occupancy == k) & vesicle).any()
        assert touches == (k in bound.on_membrane)
    # the same seed places them identically
    twice = build_scene(*args, np.random.default_rng(2), membrane_share=1.0)
    assert np.array_equal(bound.occupancy, twice.occupancy) and bound.on_membrane == twice.on_membrane
