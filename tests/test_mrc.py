import mrcfile
import numpy as np
import pytest

from vpdetect.errors import VPDetectError
from vpdetect.io.mrc import read_mrc_header, read_tomogram, tomogram_name, write_mrc


def test_roundtrip_keeps_values_axes_and_voxel_size(tmp_path, rng):
    vol = rng.normal(size=(5, 6, 7)).astype(np.float32)
    path = tmp_path / "t.mrc"
    write_mrc(path, vol, voxel_size=10.5)
    tomo = read_tomogram(path)
    assert tomo.data.shape == (5, 6, 7)
    assert tomo.shape_xyz == (7, 6, 5)
    np.testing.assert_array_equal(tomo.data, vol)
    assert tomo.voxel_size == pytest.approx(10.5)
    assert tomo.name == "t"
    assert read_mrc_header(path)["shape"] == (5, 6, 7)


def test_mmap_read_equals_plain_read(tmp_path, rng):
    vol = rng.normal(size=(4, 4, 4)).astype(np.float32)
    write_mrc(tmp_path / "a.mrc", vol)
    np.testing.assert_array_equal(read_tomogram(tmp_path / "a.mrc", mmap=True).data, vol)


@pytest.mark.parametrize("header_value", [0.0, 1.0])
def test_voxel_size_0_or_1_is_unknown_and_overridable(tmp_path, header_value):
    path = tmp_path / "v.mrc"
    write_mrc(path, np.zeros((2, 2, 2), np.float32), voxel_size=header_value)
    assert read_tomogram(path).voxel_size is None
    assert read_tomogram(path, voxel_size=7.0).voxel_size == 7.0


def test_integer_labels_keep_integer_mode(tmp_path):
    labels = np.arange(27, dtype=np.int64).reshape(3, 3, 3) * 100
    write_mrc(tmp_path / "l.mrc", labels)
    with mrcfile.open(tmp_path / "l.mrc") as handle:
        assert handle.data.dtype == np.int16
        np.testing.assert_array_equal(handle.data, labels)


def test_int8_data_read_as_float32(tmp_path):
    write_mrc(tmp_path / "i.mrc", np.full((2, 3, 4), 5, np.int8))
    tomo = read_tomogram(tmp_path / "i.mrc")
    assert tomo.data.dtype == np.float32 and float(tomo.data.max()) == 5.0


def test_missing_truncated_and_2d_files_raise_clear_errors(tmp_path):
    with pytest.raises(VPDetectError, match="not found"):
        read_tomogram(tmp_path / "nope.mrc")
    path = tmp_path / "t.mrc"
    write_mrc(path, np.zeros((8, 8, 8), np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(VPDetectError):
        read_tomogram(path)
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc file at all" * 10)
    with pytest.raises(VPDetectError):
        read_tomogram(tmp_path / "junk.mrc")
    write_mrc(tmp_path / "img.mrc", np.zeros((8, 8), np.float32))
    with pytest.raises(VPDetectError, match="3D"):
        read_tomogram(tmp_path / "img.mrc")


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(VPDetectError):
        write_mrc(tmp_path / "x.mrc", np.full((2, 2, 2), 2**30, np.int64))
    assert list(tmp_path.iterdir()) == []


def test_tomogram_name_strips_mrc_suffixes():
    assert tomogram_name("/a/TS_01.mrc") == "TS_01"
    assert tomogram_name("b/x.rec") == "x"


@pytest.mark.parametrize("top", [40_000, 70_000])
def test_labels_beyond_int16_are_written_exactly(tmp_path, top):
    # An occupancy mask of a simulation with more than 32767 particles (int32 ids).
    labels = np.zeros((3, 3, 3), np.int32)
    labels[1, 2, 0], labels[2, 0, 1] = 1, top
    write_mrc(tmp_path / "occ.mrc", labels)
    data = read_tomogram(tmp_path / "occ.mrc").data
    np.testing.assert_array_equal(data, labels)


def _track_mmap_handles(monkeypatch):
    opened = []
    real = mrcfile.mmap

    def tracking(*args, **kwargs):
        handle = real(*args, **kwargs)
        opened.append(handle)
        return handle

    monkeypatch.setattr(mrcfile, "mmap", tracking)
    return opened


def test_mmap_read_of_other_dtypes_is_not_copied_to_float32(tmp_path):
    # A float32 copy of a memory-mapped int8/int16 tomogram would cost 2-4x the file in
    # memory: the map is returned in the file's dtype (big-endian too) and readers convert
    # what they read.
    from vpdetect.preprocess import normalise, streamed_zscore_params

    path16, path_be = tmp_path / "i16.mrc", tmp_path / "be.mrc"
    values = np.arange(24).reshape(2, 3, 4)
    write_mrc(path16, values.astype(np.int16))
    with mrcfile.new(path_be) as handle:
        handle.set_data(values.astype(">f4"))
    for path, dtype in ((path16, np.int16), (path_be, np.dtype(">f4"))):
        tomo = read_tomogram(path, mmap=True)
        assert tomo.data.dtype == dtype and isinstance(tomo.data, np.memmap)
        np.testing.assert_array_equal(tomo.data, values)
        mean, std = streamed_zscore_params(tomo.data)
        assert (mean, std) == pytest.approx((values.mean(), values.std()))
        assert normalise(tomo.data[:1], mean, std).dtype == np.float32
    assert read_tomogram(path16, mmap=False).data.dtype == np.float32  # in memory: float32


def test_roi_mask_keeps_its_dtype_and_is_not_copied(tmp_path):
    from vpdetect.io.mrc import read_roi

    mask = np.zeros((4, 5, 6), np.int8)
    mask[1:3, 2:4, 3:5] = 1
    write_mrc(tmp_path / "roi.mrc", mask)
    roi = read_roi(tmp_path / "roi.mrc", (4, 5, 6))
    assert roi.dtype == np.int8  # not a float32 copy four times the mask's size
    np.testing.assert_array_equal(roi != 0, mask != 0)


def test_anisotropic_voxel_size_warns_and_uses_x(tmp_path):
    path = tmp_path / "a.mrc"
    write_mrc(path, np.zeros((2, 2, 2), np.float32), voxel_size=10.0)
    with mrcfile.open(path, mode="r+") as handle:
        handle.voxel_size = (10.0, 10.0, 14.0)
    with pytest.warns(UserWarning, match="anisotropic"):
        assert read_tomogram(path).voxel_size == pytest.approx(10.0)
