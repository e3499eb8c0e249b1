"""The building blocks of the scan-preparation pipeline (data/pipeline.py) and the paired writer of the
prepare commands (data/prepare.py), on small synthetic volumes."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from data import pipeline as pp
from data import prepare
from data.core.io import DataError, Geometry, read_volume

OBLIQUE = tuple(np.linalg.qr(np.array([[0.63, 0.51, -0.59], [0.2, 0.6, 0.7], [0.75, -0.6, 0.3]]))[0].ravel())


def _image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    geometry = Geometry(spacing, origin, direction or (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return geometry.apply_to(sitk.GetImageFromArray(array)), geometry


# ------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("size, spacing, new, reference, clean", [
    (4, 2.0, 1.0, 9, 7),            # exact ratio: reference adds one voxel past the extent
    (37, 7.0, 7.7, 34, 34),         # 33.64 -> ceil
    (448, 0.78125, 0.78125 * 1.75, 257, 256),   # SABS in-plane: the reference's 257
    (12, 12.0, 7.99, 19, 18),       # CMR patient 1: 12 slices -> 19 (Q-Net data)
    (256, 1.25, 1.25, 257, 256),
])
def test_resampled_size(size, spacing, new, reference, clean):
    assert pp.resampled_size([size], [spacing], [new], "reference") == (reference,)
    assert pp.resampled_size([size], [spacing], [new], "clean") == (clean,)


def test_reference_resampling_ends_in_a_zero_slice_and_clean_does_not():
    image, _ = _image(np.ones((4, 3, 3), np.float32), spacing=(1.0, 1.0, 2.0))
    ref = sitk.GetArrayFromImage(pp.resample_image(image, (1.0, 1.0, 1.0), "reference"))
    assert ref.shape == (9, 4, 4)
    assert (ref[-1] == 0).all(), "the +1 sample lies past the input and must be 0"
    assert (ref[:7, :3, :3] == 1).all()
    clean = sitk.GetArrayFromImage(pp.resample_image(image, (1.0, 1.0, 1.0), "clean"))
    assert clean.shape == (7, 3, 3)
    assert (clean == 1).all()


def test_reference_resampling_keeps_integer_type_and_truncates_toward_zero():
    row = np.array([0, 3, 0, -3], np.int16)
    image, _ = _image(np.tile(row, (2, 2, 1)))
    out = pp.resample_image(image, (0.5, 1.0, 1.0), "reference")
    assert out.GetPixelID() == sitk.sitkInt16
    values = sitk.GetArrayFromImage(out)[0, 0, :7]
    # samples at 0, 0.5, 1, 1.5, 2, 2.5, 3: interpolated 0, 1.5, 3, 1.5, 0, -1.5, -3
    np.testing.assert_array_equal(values, [0, 1, 3, 1, 0, -1, -3])
    clean = sitk.GetArrayFromImage(pp.resample_image(image, (0.5, 1.0, 1.0), "clean"))[0, 0, :7]
    np.testing.assert_allclose(clean, [0, 1.5, 3, 1.5, 0, -1.5, -3])


# ------------------------------------------------------------------------------------ labels
def test_paint_labels_higher_value_wins_where_indicators_overlap():
    a = np.array([[0.9, 0.9, 0.2, 0.5]])
    b = np.array([[0.1, 0.7, 0.8, 0.5]])
    out = pp.paint_labels([(0, 1 - np.maximum(a, b)), (1, a), (2, b)])
    np.testing.assert_array_equal(out, [[1, 2, 2, 0]])   # 0.5 is not > 0.5: nobody claims the last voxel
    assert out.dtype == np.float64


def test_resample_label_is_not_nearest_neighbour_and_keeps_values():
    label = np.zeros((1, 1, 4), np.uint8)
    label[0, 0, :] = [1, 2, 2, 0]
    label = np.repeat(np.repeat(label, 2, axis=0), 2, axis=1)      # (2, 2, 4)
    _, geometry = _image(label)
    out = pp.resample_label(label, geometry, (0.5, 1.0, 1.0))
    # samples at x = 0, .5, 1, 1.5, 2, 2.5, 3, 3.5(outside): the midpoint of 1|2 has 0.5 of each -> 0
    np.testing.assert_array_equal(out[0, 0], [1, 0, 2, 2, 2, 0, 0, 0, 0])
    assert set(np.unique(out)) <= {0, 1, 2}


def test_resample_label_matches_image_grid():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (5, 9, 11)).astype(np.uint8)
    image, geometry = _image(label.astype(np.int16), spacing=(1.5, 1.5, 6.0), direction=OBLIQUE)
    res_image = pp.resample_image(image, (1.25, 1.25, 7.7))
    res_label = pp.resample_label(label, geometry, (1.25, 1.25, 7.7))
    assert res_label.shape == sitk.GetArrayFromImage(res_image).shape


# ------------------------------------------------------------------------------------ crop / pad
@pytest.mark.parametrize("height, width", [(250, 251), (300, 301), (256, 257), (255, 320)])
def test_centre_crop_or_pad_offsets_and_world_positions(height, width):
    rng = np.random.default_rng(height)
    array = rng.integers(1, 1000, (3, height, width)).astype(np.float64)
    geometry = Geometry((0.7, 0.9, 5.0), (-12.0, 30.5, 4.0), OBLIQUE)
    out, (off_y, off_x) = pp.centre_crop_or_pad(array, pad_value=-1.0)
    assert out.shape == (3, 256, 256)
    assert (off_y, off_x) == (height // 2 - 128, width // 2 - 128)
    new_geometry = pp.shift_origin(geometry, (off_x, off_y, 0))
    before, after = pp.image_from_array(array, geometry), pp.image_from_array(out, new_geometry)
    # every input voxel that survives keeps its world position; padding holds the pad value
    for z, y, x in [(0, 0, 0), (1, height // 2, width // 2), (2, height - 1, width - 1), (1, 7, width - 3)]:
        point = before.TransformIndexToPhysicalPoint((x, y, z))
        ox, oy, oz = after.TransformPhysicalPointToIndex(point)
        if 0 <= oy < 256 and 0 <= ox < 256:
            assert out[oz, oy, ox] == array[z, y, x]
            assert (oy, ox) == (y - off_y, x - off_x)
        else:
            assert not (0 <= y - off_y < 256 and 0 <= x - off_x < 256)
    if off_y < 0:                                       # padded rows above and below the data
        assert (out[:, :-off_y] == -1).all() and (out[:, -off_y + height:] == -1).all()
        assert (out[:, -off_y:-off_y + height, max(0, -off_x):] != -1).any()


def test_centre_pad_loses_nothing_and_crop_keeps_the_centre():
    array = np.arange(3 * 5 * 7, dtype=np.float64).reshape(3, 5, 7) + 1
    padded, (oy, ox) = pp.centre_crop_or_pad(array, target=256, pad_value=0)
    assert padded.sum() == array.sum()
    np.testing.assert_array_equal(padded[:, -oy:-oy + 5, -ox:-ox + 7], array)
    big = np.arange(2 * 300 * 300, dtype=np.float64).reshape(2, 300, 300)
    cropped, (oy, ox) = pp.centre_crop_or_pad(big)
    np.testing.assert_array_equal(cropped, big[:, 22:278, 22:278])


def test_border_crop_with_origin_shift():
    array = np.random.default_rng(1).random((2, 64, 60))
    geometry = Geometry((0.8, 0.8, 3.0), (-100.0, -90.0, 10.0), OBLIQUE)
    cropped = pp.border_crop(array, 4, 6)
    assert cropped.shape == (2, 56, 48)
    shifted = pp.shift_origin(geometry, (6, 4, 0))
    point = pp.image_from_array(array, geometry).TransformIndexToPhysicalPoint((10, 20, 1))
    x, y, z = pp.image_from_array(cropped, shifted).TransformPhysicalPointToIndex(point)
    assert cropped[z, y, x] == array[1, 20, 10]
    with pytest.raises(ValueError):
        pp.border_crop(array, 32, 32)


# ------------------------------------------------------------------------------------ intensity
def test_percentile_clip_on_integer_array_uses_the_array_dtype():
    array = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    p = np.percentile(array, 99.5)                      # 994.005
    clipped, cap = pp.clip_top_percentile(array)
    assert clipped.dtype == np.int16 and cap == 994 == int(p)
    np.testing.assert_array_equal(clipped, np.minimum(array, 994))
    assert array.max() == 999, "the input must not be modified"
    floats, cap = pp.clip_top_percentile(array.astype(np.float64))
    assert cap == pytest.approx(p) and floats.max() == pytest.approx(p)


def test_hu_window_endpoints():
    volume = np.array([-1000, -125, 75, 275, 3000], np.int16).reshape(1, 1, 5)
    for compat in ("reference", "clean"):
        out = pp.hu_window(volume, compat=compat)
        np.testing.assert_allclose(out.ravel(), [0, 0, 127.5, 255, 255])
        assert out.dtype == np.float64
    no_air = np.array([0, 275], np.int16).reshape(1, 1, 2)
    np.testing.assert_allclose(pp.hu_window(no_air, compat="reference").ravel(), [0, 255])  # actual min
    np.testing.assert_allclose(pp.hu_window(no_air, compat="clean").ravel(), [125 / 400 * 255, 255])
    with pytest.raises(DataError, match="constant"):
        pp.hu_window(np.full((1, 2, 2), 500, np.int16), source="img0001.nii.gz")


# ------------------------------------------------------------------------------------ writing
def test_write_pair_writes_identical_geometry(tmp_path):
    geometry = Geometry((1.25, 1.25, 7.7), (1.0, 2.0, 3.0), OBLIQUE)
    image = np.random.default_rng(0).random((3, 8, 8))
    label = (image > 0.5).astype(np.float64)
    prepare.write_pair(tmp_path / "image_1.nii.gz", tmp_path / "label_1.nii.gz", image, label, geometry)
    img, g1 = read_volume(tmp_path / "image_1.nii.gz")
    lab, g2 = read_volume(tmp_path / "label_1.nii.gz")
    assert g1 == g2 and g1.matches(geometry)
    np.testing.assert_array_equal(img, image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_1.nii.gz", "label_1.nii.gz"]


def test_write_pair_leaves_nothing_when_a_write_fails(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, array, geometry=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(path, array, geometry)

    real_write = prepare.write_volume
    monkeypatch.setattr(prepare, "write_volume", failing_write)
    with pytest.raises(OSError):
        prepare.write_pair(tmp_path / "image_1.nii.gz", tmp_path / "label_1.nii.gz",
                      np.zeros((3, 4, 4)), np.zeros((3, 4, 4)), Geometry((1.0, 1.0, 1.0)))
    assert list(tmp_path.iterdir()) == []
