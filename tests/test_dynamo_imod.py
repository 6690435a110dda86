"""Dynamo `.tbl` and IMOD `.mod`: files read back by their own libraries, conventions
checked against values worked out by hand."""

from __future__ import annotations

import dynamotable
import imodmodel
import numpy as np
import pytest

from vpdetect.errors import VPDetectError
from vpdetect.io.particles import (
    ParticleTable,
    dynamo_to_zxz,
    read_particles,
    write_particles,
    zxz_matrix,
    zxz_to_dynamo,
)


def dynamo_reference_matrix(tdrot, tilt, narot):
    """Dynamo's dynamo_euler2matrix written out element by element."""
    td, ti, na = np.radians([tdrot, tilt, narot])
    ctd, cti, cna, std, sti, sna = np.cos(td), np.cos(ti), np.cos(na), np.sin(td), np.sin(ti), np.sin(na)
    return np.array([
        [ctd * cna - std * cti * sna, -cna * std - ctd * cti * sna, sna * sti],
        [ctd * sna + cna * std * cti, -std * sna + ctd * cti * cna, -cna * sti],
        [std * sti, ctd * sti, cti],
    ])


def table(**extra):
    return ParticleTable.from_arrays(
        [[0, 0, 0], [10.25, 20, 30], [5, 6, 7]], voxel_size=13.5, tomo_size=(64, 48, 32),
        tomo_name=["TS_01", "TS_01", "TS_02"], class_name=["ribo", "proteasome", "ribo"],
        score=[0.5, 0.9, 0.7], phi=[90, 10, 0], theta=[0, 30, 90], psi=[0, 40, 0], **extra,
    )


def test_dynamo_angles_are_the_inverse_of_vpdetects_rotation(rng):
    # dynamo_euler2matrix is the inverse (transpose) of the active rotation, as RELION's.
    for td, ti, na in rng.uniform(-180, 180, (20, 3)):
        phi, theta, psi = dynamo_to_zxz(td, ti, na)
        np.testing.assert_allclose(zxz_matrix(phi, theta, psi).T, dynamo_reference_matrix(td, ti, na), atol=1e-12)
        back = zxz_to_dynamo(phi, theta, psi)
        np.testing.assert_allclose(dynamo_reference_matrix(*back), dynamo_reference_matrix(td, ti, na), atol=1e-12)
    # +90 degrees about z: tdrot = -90 (the angles are negated, phi = -tdrot).
    assert tuple(float(v) for v in zxz_to_dynamo(90.0, 0.0, 0.0)) == pytest.approx((-90.0, 0.0, 0.0))
    # phi, theta, psi = -tdrot, -tilt, -narot, here written as the equivalent (180 - ..., tilt, ...).
    np.testing.assert_allclose(
        zxz_matrix(*dynamo_to_zxz(30.0, 40.0, 50.0)), zxz_matrix(-30.0, -40.0, -50.0), atol=1e-12)


def test_dynamo_table_read_by_dynamotable(tmp_path):
    write_particles(tmp_path / "picks.tbl", table())
    frame = dynamotable.read(str(tmp_path / "picks.tbl"), str(tmp_path / "picks.doc"))
    # 1-based positions: voxel 0 is Dynamo's 1.
    np.testing.assert_allclose(frame[["x", "y", "z"]].to_numpy(), [[1, 1, 1], [11.25, 21, 31], [6, 7, 8]])
    np.testing.assert_allclose(frame[["dx", "dy", "dz"]].to_numpy(), 0)
    np.testing.assert_allclose(frame[["tdrot", "tilt", "narot"]].iloc[0], [-90, 0, 0], atol=1e-9)
    assert frame["tag"].tolist() == [1, 2, 3] and frame["tomo"].tolist() == [1, 1, 2]
    assert frame["class"].tolist() == [1, 2, 1] and frame["cc"].tolist() == [0.5, 0.9, 0.7]
    assert (frame["apix"] == 13.5).all()
    assert frame["tomo_file"].tolist() == ["TS_01", "TS_01", "TS_02"]
    back = read_particles(tmp_path / "picks.tbl")
    np.testing.assert_allclose(back.coords_xyz(), table().coords_xyz(), atol=1e-6)
    assert back.data["tomo_name"].tolist() == ["TS_01", "TS_01", "TS_02"] and back.voxel_size == 13.5
    np.testing.assert_allclose(
        zxz_matrix(*(back.data[c] for c in ("phi", "theta", "psi"))),
        zxz_matrix(*(table().data[c] for c in ("phi", "theta", "psi"))), atol=1e-9)


def test_dynamo_shifts_and_table_map_by_hand(tmp_path):
    # Column 24 + column 4: x = 11 + 0.5 (1-based) is voxel 10.5; tomogram 3 is in the map.
    row = ["0"] * 26
    row[0], row[3], row[19], row[21], row[23], row[24], row[25] = "7", "0.5", "3", "2", "11", "21", "31"
    (tmp_path / "hand.tbl").write_text(" ".join(row) + "\n")
    (tmp_path / "hand.doc").write_text("3 /data/tomos/TS_07.mrc\n")
    back = read_particles(tmp_path / "hand.tbl")
    np.testing.assert_allclose(back.coords_xyz(), [[10.5, 20, 30]])
    assert back.data["tomo_name"].tolist() == ["TS_07"]
    assert back.data["tomo_path"].tolist() == ["/data/tomos/TS_07.mrc"]
    assert back.data["class_number"].tolist() == [2] and back.voxel_size is None
    (tmp_path / "short.tbl").write_text("1 2 3\n")
    with pytest.raises(VPDetectError, match="26 columns"):
        read_particles(tmp_path / "short.tbl")


def test_imod_model_read_by_imodmodel(tmp_path):
    write_particles(tmp_path / "picks.mod", table())
    frame = imodmodel.read(tmp_path / "picks.mod")
    # x and y + 0.5 (the first pixel's centre is 0.5), z on its section.
    np.testing.assert_allclose(frame[["x", "y", "z"]].to_numpy(), [[0.5, 0.5, 0], [5.5, 6.5, 7], [10.75, 20.5, 30]])
    assert frame["object_id"].tolist() == [0, 0, 1]  # one object per class: ribo, proteasome
    model = imodmodel.ImodModel.from_file(tmp_path / "picks.mod")
    assert [o.header.name for o in model.objects] == ["ribo", "proteasome"]
    assert model.header.pixelsize == 13.5 and model.header.units == -10
    assert (model.header.xmax, model.header.ymax, model.header.zmax) == (64, 48, 32)
    back = read_particles(tmp_path / "picks.mod")
    order = [0, 2, 1]  # grouped by object
    np.testing.assert_allclose(back.coords_xyz(), table().coords_xyz()[order], atol=1e-5)
    assert back.class_labels() == ["ribo", "ribo", "proteasome"]
    assert back.voxel_size == 13.5 and back.tomo_size == (64, 48, 32)


def test_imod_model_written_by_imodmodel_reads_by_hand(tmp_path):
    import pandas as pd

    points = pd.DataFrame({"object_id": [0, 1], "contour_id": [0, 0], "x": [10.5, 3.0], "y": [20.5, 4.0],
                           "z": [30.0, 5.0]})
    imodmodel.write(points, tmp_path / "hand.mod")
    back = read_particles(tmp_path / "hand.mod")
    np.testing.assert_allclose(back.coords_xyz(), [[10, 20, 30], [2.5, 3.5, 5]])
    assert back.class_labels() == ["object1", "object2"] and back.voxel_size is None
    (tmp_path / "bad.mod").write_bytes(b"IMODV1.2 not a model")
    with pytest.raises(VPDetectError, match="cannot parse IMOD model"):
        read_particles(tmp_path / "bad.mod")
    # A model cut short, and text read as IMOD: refused (imodmodel alone loops forever on them).
    (tmp_path / "cut.mod").write_bytes((tmp_path / "hand.mod").read_bytes()[:-6])
    with pytest.raises(VPDetectError, match="ends inside a chunk"):
        read_particles(tmp_path / "cut.mod")
    (tmp_path / "text.csv").write_text("x,y,z\n" + "1,2,3\n" * 60)
    with pytest.raises(VPDetectError, match="not an IMOD model"):
        read_particles(tmp_path / "text.csv", fmt="imod")


@pytest.mark.parametrize("name", ["empty.tbl", "empty.mod"])
def test_empty_tables(tmp_path, name):
    write_particles(tmp_path / name, ParticleTable.from_arrays(np.zeros((0, 3))))
    assert len(read_particles(tmp_path / name)) == 0


def test_convert_cli_to_dynamo_and_imod(tmp_path):
    from test_classify import run_cli

    write_particles(tmp_path / "picks.star", table())
    for fmt, name in (("dynamo", "out.tbl"), ("imod", "out.mod")):
        result = run_cli("convert", tmp_path / "picks.star", tmp_path / name, "--to", fmt)
        assert result.exit_code == 0, result.output
        np.testing.assert_allclose(
            np.sort(read_particles(tmp_path / name).coords_xyz(), axis=0), np.sort(table().coords_xyz(), axis=0),
            atol=1e-5)
