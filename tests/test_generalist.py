"""The `generalist` simulator preset: randomised tomograms, every draw recorded, reproducible."""

import dataclasses
import json

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

import vpdetect.cli  # noqa: F401  registers the commands
from vpdetect.cli.app import app
from vpdetect.simulate.generalist import (
    DIAMETER_NM,
    MEMBRANE_PROTEIN_SHARES,
    RANDOMIZABLE,
    SHAPE_FAMILIES,
    Context,
    add_context,
    random_protein_class,
)
from vpdetect.simulate.microscope import RECONSTRUCTION_FILTERS, filter_window
from vpdetect.simulate.phantoms import render
from vpdetect.simulate.pipeline import preset_params, simulate_tomogram

SMALL = {"shape_xyz": (64, 64, 40), "slab_thickness": 32}


def small_generalist(**overrides):
    return preset_params("generalist", **{**SMALL, **overrides})


@pytest.mark.parametrize("family", SHAPE_FAMILIES)
def test_procedural_shapes_are_solid_centred_and_within_the_size_range(family):
    rng = np.random.default_rng(5)
    for i in range(6):
        particle = random_protein_class(rng, family, f"gen-{family}-{i}")
        density, mask = render(particle, (10.0, 20.0, 30.0))
        centre = mask.shape[0] // 2
        assert mask.sum() > 0 and density.max() > 0
        # the written centre lies on (or, for a ring, within a voxel of) the solid
        assert mask[centre - 1 : centre + 2, centre - 1 : centre + 2, centre - 1 : centre + 2].any()
        extent = 2.0 * particle.shape.bounding_radius
        # the drawn extent bounds the shape, up to recentring onto the solid
        assert extent <= 2.0 * DIAMETER_NM[1] + 1e-6
        assert particle.kind == "protein" and particle.imitates.endswith(family)


def test_same_seed_same_tomogram_and_every_draw_is_recorded():
    params = small_generalist()
    assert set(params.randomize) == set(RANDOMIZABLE) - {"slab_thickness"}  # given: fixed
    first = simulate_tomogram(params, seed=21)
    second = simulate_tomogram(params, seed=21)
    assert np.array_equal(first.reconstruction, second.reconstruction)
    assert np.array_equal(first.occupancy, second.occupancy)
    assert first.particles.data.equals(second.particles.data)
    drawn = first.metadata["randomized"]
    for key in ("snr", "defocus_um", "tilt_range_deg", "tilt_step_deg", "recon_filter", "contrast",
                "proteins_per_mvox", "shapes", "syn_classes"):
        assert key in drawn, key
    # the recorded parameters are the concrete ones the tomogram was made with
    recorded = first.metadata["parameters"]
    assert list(recorded["randomize"]) == []
    assert recorded["microscope"]["snr"] == drawn["snr"]
    assert recorded["microscope"]["recon_filter"] in RECONSTRUCTION_FILTERS
    assert recorded["contrast"] == drawn["contrast"] == first.metadata["contrast"]
    assert first.metadata["microscope"]["defocus_um"] == drawn["defocus_um"]
    # procedural classes are in the class table with labels, and are placed
    names = {row["name"] for row in first.metadata["classes"]}
    assert {s["name"] for s in drawn["shapes"]} <= names
    assert json.dumps(first.metadata)  # all plain values
    other = simulate_tomogram(params, seed=22)
    assert other.metadata["randomized"] != drawn


def test_named_parameters_are_fixed_not_drawn():
    params = small_generalist(snr=0.3, contrast="dark", tilt_min=-50.0, tilt_max=50.0)
    assert "snr" not in params.randomize and "contrast" not in params.randomize
    assert "tilt_range" not in params.randomize
    result = simulate_tomogram(params, seed=3)
    drawn = result.metadata["randomized"]
    assert "snr" not in drawn and "contrast" not in drawn and "tilt_range_deg" not in drawn
    assert result.metadata["microscope"]["snr_target"] == 0.3
    assert result.metadata["microscope"]["tilt_angles_deg"][0] == -50.0


def test_bright_contrast_is_the_negated_dark_tomogram():
    dark = simulate_tomogram(dataclasses.replace(small_generalist(contrast="dark")), seed=8)
    bright = simulate_tomogram(dataclasses.replace(small_generalist(contrast="bright")), seed=8)
    assert np.array_equal(bright.reconstruction, -dark.reconstruction)
    assert np.array_equal(bright.occupancy, dark.occupancy)


def test_fixed_parameter_presets_are_unchanged_by_the_randomize_stream():
    # spawning a fourth stream must not move the three existing ones
    params = preset_params("easy", shape_xyz=(48, 48, 32), slab_thickness=24, n_proteins=4,
                           vesicles=False, fiducials=False, classes=("syn-atpase",))
    result = simulate_tomogram(params, seed=2)
    assert "randomized" not in result.metadata
    seq = np.random.SeedSequence([2])
    assert [c.spawn_key for c in seq.spawn(4)[:3]] == [c.spawn_key for c in np.random.SeedSequence([2]).spawn(3)]


def test_reconstruction_filters_are_windows_on_the_ramp():
    for name in RECONSTRUCTION_FILTERS:
        window = filter_window(64, name)
        assert window[0] == pytest.approx(1.0)
        assert np.all(np.diff(window) <= 1e-12) and window.min() >= -1e-12
    assert filter_window(64, "hann")[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(filter_window(64, "ramp") == 1.0)


def test_context_adds_a_carbon_edge_and_an_ice_gradient_inside_the_slab():
    density = np.zeros((10, 32, 32), np.float32)
    add_context(density, (2, 8), Context(
        carbon_edge={"normal_deg": 0.0, "offset_vox": 5.0, "density": 1.0, "width_vox": 1.0},
        ice_gradient={"direction_deg": 90.0, "amplitude": 0.5},
    ))
    assert np.all(density[:2] == 0) and np.all(density[8:] == 0)
    # carbon: dense beyond x = centre + 5, empty before it (soft edge)
    assert density[4, 16, 31] - density[4, 16, 0] > 0.9
    # gradient along y
    assert density[4, 31, 0] > density[4, 0, 0]


def test_cli_generalist_preset_records_and_reproduces(tmp_path):
    args = ["simulate", "--preset", "generalist", "--shape", "64", "64", "40", "--seed", "5"]
    first = CliRunner().invoke(app, [*args, str(tmp_path / "a")])
    second = CliRunner().invoke(app, [*args, str(tmp_path / "b")])
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    for name in ("reconstruction.mrc", "occupancy_mask.mrc", "particle_locations.txt", "simulation.json"):
        assert (tmp_path / "a/model_0" / name).read_bytes() == (tmp_path / "b/model_0" / name).read_bytes()
    meta = json.loads((tmp_path / "a/model_0/simulation.json").read_text())
    assert meta["parameters"]["preset"] == "generalist" and "randomized" in meta
    bad = CliRunner().invoke(app, [*args, "--recon-filter", "wiener", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "reconstruction filter" in bad.output


def test_a_large_membrane_is_a_bilayer_on_its_sphere_inside_the_slab():
    from vpdetect.simulate.generalist import MEMBRANE_DENSITY, MEMBRANE_LEAFLET_NM, add_membrane

    density = np.zeros((30, 40, 40), np.float32)
    # A sphere of radius 100 voxels through (20, 20, 15) with its centre 100 voxels along +x:
    # near the point the membrane is almost the plane x = 20.
    membrane = {"point_vox": [20.0, 20.0, 15.0], "normal": [1.0, 0.0, 0.0], "radius_nm": 100.0}
    add_membrane(density, (5, 25), membrane, voxel_nm=1.0)
    assert np.all(density[:5] == 0) and np.all(density[25:] == 0)
    profile = density[15, 20]
    # two leaflets at +-1.6 voxels about x = 20, a trough between them, nothing far away
    peaks = [int(np.argmax(profile[:20])), 20 + int(np.argmax(profile[20:]))]
    assert abs(peaks[0] - (20 - MEMBRANE_LEAFLET_NM)) <= 1 and abs(peaks[1] - (20 + MEMBRANE_LEAFLET_NM)) <= 1
    assert profile[20] < profile[peaks[0]] and profile[peaks[0]] <= MEMBRANE_DENSITY * 1.05
    assert profile[0] == 0 and profile[39] == 0
    # at 2 nm voxels the same bilayer is half as wide in voxels, on the same plane
    coarse = np.zeros_like(density)
    add_membrane(coarse, (5, 25), {**membrane, "radius_nm": 200.0}, voxel_nm=2.0)
    width = lambda p: np.ptp(np.flatnonzero(p > 0.05))  # noqa: E731
    assert width(coarse[15, 20]) < 0.7 * width(profile)
    assert abs(np.average(np.arange(40), weights=coarse[15, 20]) - 20) < 0.5


def test_granular_carbon_is_textured_reproducibly_and_only_on_the_carbon():
    edge = {"normal_deg": 0.0, "offset_vox": 5.0, "density": 1.0, "width_vox": 1.0}
    textured = {**edge, "texture": 0.5, "texture_sigma_vox": 1.0, "texture_seed": 11}
    plain, first, second = (np.zeros((10, 32, 32), np.float32) for _ in range(3))
    add_context(plain, (2, 8), Context(carbon_edge=edge))
    add_context(first, (2, 8), Context(carbon_edge=textured))
    add_context(second, (2, 8), Context(carbon_edge=textured))
    assert np.array_equal(first, second)
    grains = first - plain
    assert np.all(grains[:2] == 0) and np.all(grains[8:] == 0)
    on_carbon, off_carbon = grains[2:8, :, 28:], grains[2:8, :, :12]
    assert on_carbon.std() == pytest.approx(0.5, rel=0.2)  # the relative amplitude on dense carbon
    assert np.abs(off_carbon).max() < 0.05 * np.abs(on_carbon).max()


def test_generalist_draws_membranes_gold_contrast_and_carbon_grain_and_records_them():
    from vpdetect.simulate.generalist import FIDUCIAL_CONTRAST, draw_tomogram

    params = preset_params("generalist", shape_xyz=(96, 96, 48))
    kinds = set()
    for seed in range(40):
        drawn, _, context, record = draw_tomogram(params, np.random.default_rng(seed))
        assert record["membranes"] == list(context.membranes)
        for m in context.membranes:
            assert np.linalg.norm(m["normal"]) == pytest.approx(1.0, abs=1e-3)
            kinds.add("membrane")
        if "fiducial_contrast" in record:
            assert FIDUCIAL_CONTRAST[0] <= record["fiducial_contrast"] <= FIDUCIAL_CONTRAST[1]
            assert drawn.fiducial_contrast == record["fiducial_contrast"]
        if context.carbon_edge and context.carbon_edge.get("texture"):
            assert record["carbon_edge"] == context.carbon_edge
            kinds.add("granular carbon")
    assert kinds == {"membrane", "granular carbon"}


def test_membrane_proteins_are_drawn_recorded_and_fixed_by_the_option(tmp_path):
    from scipy import ndimage

    drawn = [simulate_tomogram(small_generalist(), seed=s).metadata["randomized"] for s in range(12)]
    assert {d["membrane_protein_share"] for d in drawn} <= set(MEMBRANE_PROTEIN_SHARES)
    assert len({d["membrane_protein_share"] for d in drawn}) > 1
    assert "membrane_proteins" not in small_generalist(membrane_protein_share=0.2).randomize
    # fixed on the command line: not drawn, and the proteins listed touch a vesicle
    folder = tmp_path / "sim"
    result = CliRunner().invoke(app, [
        "simulate", str(folder), "--preset", "easy", "--shape", "64", "64", "48", "--seed", "4",
        "--membrane-proteins", "0.5", "--no-fiducials"])
    assert result.exit_code == 0, result.output
    meta = json.loads((folder / "model_0" / "simulation.json").read_text())
    assert meta["parameters"]["membrane_protein_share"] == 0.5
    bound = meta["placed"]["on_membranes"]
    assert bound
    with mrcfile.open(folder / "model_0" / "occupancy_mask.mrc") as m:
        occupancy = m.data.copy()
    classes = [line.split()[0] for line in (folder / "model_0" / "particle_locations.txt").read_text().splitlines()]
    vesicles = np.isin(occupancy, [k for k, name in enumerate(classes, 1) if name == "vesicle"])
    for k in bound:
        assert classes[k - 1] != "vesicle"
        assert (ndimage.binary_dilation(occupancy == k) & vesicles).any()
    bad = CliRunner().invoke(app, ["simulate", str(tmp_path / "bad"), "--membrane-proteins", "1.5"])
    assert bad.exit_code != 0 and "membrane protein share" in bad.output
    assert not (tmp_path / "bad").exists()


def test_context_preset_adds_beads_and_carbon_to_the_generalist_draw():
    from vpdetect.simulate.generalist import CONTEXT_BEADS, draw_tomogram, enrich_context

    params = preset_params("generalist-context", shape_xyz=(96, 96, 48))
    carbon = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        plain, _, context, record = draw_tomogram(params, rng)
        before = dict(record)
        rich, rich_context = enrich_context(plain, context, record, rng)
        assert CONTEXT_BEADS[0] <= rich.n_fiducials <= CONTEXT_BEADS[1] and rich.fiducials
        assert record["n_fiducials"] == rich.n_fiducials
        # Everything else is the generalist draw.
        assert dataclasses.replace(rich, n_fiducials=plain.n_fiducials, fiducials=plain.fiducials) == plain
        assert {k: v for k, v in record.items() if k not in ("n_fiducials", "carbon_edge")} == \
            {k: v for k, v in before.items() if k not in ("n_fiducials", "carbon_edge")}
        if context.carbon_edge is not None:
            assert rich_context.carbon_edge == context.carbon_edge
        elif rich_context.carbon_edge is not None:
            assert rich_context.carbon_edge["texture"] > 0 and record["carbon_edge"] == rich_context.carbon_edge
            carbon += 1
    assert 5 <= carbon <= 25
    # Same seed, same tomogram; its record names the beads placed.
    small = preset_params("generalist-context", **SMALL)
    first, second = simulate_tomogram(small, seed=4), simulate_tomogram(small, seed=4)
    assert np.array_equal(first.reconstruction, second.reconstruction)
    assert first.metadata["randomized"]["n_fiducials"] >= CONTEXT_BEADS[0]
