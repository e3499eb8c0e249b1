"""nnU-Net v2 raw dataset -> our layout (data/convert_nnunet.py): conversion, integrity, clear errors; and the
scan-preparation pipeline it shares with the built-in datasets (data/pipeline.py)."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from data import convert_nnunet as cn
from data import pipeline as pl
from data.core.io import Geometry, read_volume
from data.core.specs import load_spec
from data.phantoms import make_phantom
from data.verify import verify_dataset

LABELS = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
LAS = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _image(array, spacing, direction, origin=(10.0, -20.0, 5.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def write_nnunet(root, cases, channel="T2", labels=LABELS, ending=".nii.gz"):
    """An nnU-Net v2 raw dataset: cases = [(identifier, image array, label array, spacing, direction)]."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for identifier, image, label, spacing, direction in cases:
        sitk.WriteImage(_image(image, spacing, direction), str(root / "imagesTr" / f"{identifier}_0000{ending}"))
        sitk.WriteImage(_image(label, spacing, direction), str(root / "labelsTr" / f"{identifier}{ending}"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": channel}, "labels": labels, "numTraining": len(cases), "file_ending": ending}))
    return root


def _world_centroid(path, value):
    image = sitk.ReadImage(str(path))
    zyx = np.argwhere(sitk.GetArrayFromImage(image) == value).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


@pytest.fixture(scope="module")
def mr_cases():
    """Two MR phantoms with different in-plane sizes (none 256) and spacings."""
    a_image, a_label = make_phantom(1, size=64, slices=8)
    b_image, b_label = make_phantom(2, size=56, slices=6)
    return [("ph_003", a_image, a_label, (2.0, 2.2, 6.0), LAS),
            ("ph_017", b_image[:, 4:52, :], b_label[:, 4:52, :], (3.0, 2.5, 8.0), LAS)]   # 48 x 56 in-plane


def test_mr_dataset_converts_and_passes_the_integrity_check(mr_cases, tmp_path, capsys):
    raw = write_nnunet(tmp_path / "Dataset042_Phantoms", mr_cases)
    out = tmp_path / "PH"
    assert cn.main([str(raw), str(out), "--n-sv", "2000", "--quiet"]) == 0

    description = json.loads((out / "dataset.json").read_text())
    assert description["name"] == "PHANTOMS" and description["modality"] == "MR"
    assert description["labels"] == LABELS and description["defaults"]["n_sv"] == 2000
    fov = np.median([max(64 * 2.0, 64 * 2.2), max(56 * 3.0, 48 * 2.5)])
    expected_spacing = round(fov / 256, 3)
    assert description["preprocessing"]["spacing"] == [expected_spacing, expected_spacing]
    assert description["preprocessing"]["intensity"] == "clip_top"
    assert json.loads((out / "case_ids.json").read_text()) == {"ph_003": 3, "ph_017": 17}

    spec = load_spec("PHANTOMS", out)
    assert spec.preprocessing.size == 256 and spec.scan_ids(out) == (3, 17)
    for scan_id, (_, raw_image, raw_label, spacing, _) in zip((3, 17), mr_cases):
        image, geometry = read_volume(spec.image_path(out, scan_id))
        label, label_geometry = read_volume(spec.label_path(out, scan_id))
        assert image.shape == (raw_image.shape[0], 256, 256) and label.shape == image.shape
        assert np.allclose(geometry.spacing, (expected_spacing, expected_spacing, spacing[2]), atol=1e-6)
        assert label_geometry.matches(geometry) and np.allclose(geometry.direction, LAS)
        assert set(np.unique(label)) == set(np.unique(raw_label))
        assert image.max() <= np.percentile(raw_image, 99.5) + 1e-3          # MR top 0.5 % clipped
        raw_label_path = tmp_path / "Dataset042_Phantoms" / "labelsTr" / f"{mr_cases[(3, 17).index(scan_id)][0]}.nii.gz"
        for value in (1, 4):    # organs stay where they were in the world (origin corrected for the crop)
            shift = _world_centroid(spec.label_path(out, scan_id), value) - _world_centroid(raw_label_path, value)
            assert np.abs(shift).max() < 1.0
        supervoxels, _ = read_volume(spec.supervoxel_path(out, scan_id, 2000))
        assert supervoxels.shape == image.shape and supervoxels.max() > 0
    classmap = json.loads((spec.image_folder(out) / "classmap_1.json").read_text())
    assert list(classmap) == list(LABELS) and set(classmap["liver"]) == {"3", "17"}
    assert verify_dataset(out, spec).ok
    assert "OK" in capsys.readouterr().out

    assert cn.main([str(raw), str(out), "--n-sv", "2000", "--quiet"]) == 0          # idempotent
    assert "0 scan(s) written, 2 skipped" in capsys.readouterr().out   # -q hides the info line


def test_ct_case_is_windowed_and_reoriented(tmp_path):
    image, label = make_phantom(3, size=40, slices=5)
    hu = np.where(image < 30, -1000.0, image * 2 - 150).astype(np.int16)   # air and soft tissue in HU
    raw = write_nnunet(tmp_path / "Dataset007_CT", [("abd_a", hu, label, (4.0, 4.0, 5.0), LPS)], channel="CT")
    out = tmp_path / "CTOUT"
    assert cn.main([str(raw), str(out), "--name", "MYCT", "--orientation", "LAS", "--n-sv", "500", "--quiet"]) == 0
    spec = load_spec("MYCT", out)
    assert spec.modality == "CT" and spec.preprocessing.intensity == "ct_window"
    assert spec.preprocessing.orientation == "LAS" and spec.preprocessing.spacing == (0.625, 0.625)
    assert json.loads((out / "case_ids.json").read_text()) == {"abd_a": 1}    # no trailing digits: sorted 1..N
    converted, geometry = read_volume(spec.image_path(out, 1))
    assert converted.min() == 0.0 and converted.max() <= 255.0               # [-125, 275] HU -> [0, 255]
    assert np.allclose(geometry.direction, LAS)
    raw_label_path = raw / "labelsTr" / "abd_a.nii.gz"
    shift = _world_centroid(spec.label_path(out, 1), 1) - _world_centroid(raw_label_path, 1)
    assert np.abs(shift).max() < 2.0


def test_case_id_rule():
    assert cn.case_id_map(["liver_10", "liver_2"]) == {"liver_2": 2, "liver_10": 10}
    assert cn.case_id_map(["a_1", "b_1", "c_2"]) == {"a_1": 1, "b_1": 2, "c_2": 3}      # numbers not unique
    assert cn.case_id_map(["zeta", "alpha"]) == {"alpha": 1, "zeta": 2}


def _break_no_labels(root):
    shutil.rmtree(root / "labelsTr")


def _break_two_channels(root):
    description = json.loads((root / "dataset.json").read_text())
    description["channel_names"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(description))


def _break_channel_file(root):
    shutil.copy(root / "imagesTr" / "ph_001_0000.nii.gz", root / "imagesTr" / "ph_001_0001.nii.gz")


def _break_label_values(root):
    path = root / "labelsTr" / "ph_002.nii.gz"
    label = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(label)
    array[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(label)
    sitk.WriteImage(bad, str(path))


def _break_missing_label(root):
    (root / "labelsTr" / "ph_002.nii.gz").unlink()


def _break_no_description(root):
    (root / "dataset.json").unlink()


def _break_region_labels(root):
    description = json.loads((root / "dataset.json").read_text())
    description["labels"] = {"background": 0, "organs": [1, 2, 3, 4]}
    (root / "dataset.json").write_text(json.dumps(description))


def _break_ignore_label(root):
    description = json.loads((root / "dataset.json").read_text())
    description["labels"]["ignore"] = 5
    (root / "dataset.json").write_text(json.dumps(description))


def _break_label_name(root):
    description = json.loads((root / "dataset.json").read_text())
    description["labels"] = {"background": 0, "../../liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    (root / "dataset.json").write_text(json.dumps(description))


@pytest.mark.parametrize("break_it, message", [
    (_break_label_name, "label name '../../liver' cannot be used in file names"),
    (_break_no_labels, "labelsTr not found"),
    (_break_two_channels, "2 input channels"),
    (_break_channel_file, "channel 0001; only single-channel datasets"),
    (_break_label_values, "unexpected label values [7]"),
    (_break_missing_label, "image(s) without a label: ph_002_0000.nii.gz needs"),
    (_break_no_description, "nnU-Net dataset.json not found"),
    (_break_region_labels, "label 'organs' is region-based"),
    (_break_ignore_label, "an 'ignore' label (nnU-Net's sparse annotation) is not supported"),
])
def test_bad_inputs_are_clear_errors_with_no_output(tmp_path, capsys, break_it, message):
    image, label = make_phantom(4, size=24, slices=4)
    raw = write_nnunet(tmp_path / "Dataset001_Bad", [(f"ph_00{i}", image, label, (2.0, 2.0, 8.0), LAS)
                                                     for i in (1, 2)])
    break_it(raw)
    out = tmp_path / "out"
    assert cn.main([str(raw), str(out), "--quiet"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ prepare_scan = the reference recipes
# data.pipeline.prepare_scan prepares the built-in datasets (data/prepare_*.py), converted datasets and
# new scans (scripts/segment.py) alike. These tests spell out the reference notebooks' steps with the
# pipeline's building blocks (each unit-tested in test_preprocessing.py) and check that prepare_scan,
# driven by a dataset's preprocessing block, composes exactly those steps.
def _dtypes(compat):
    return (np.float64, np.float64) if compat == "reference" else (np.float32, np.uint8)


def _chaos_recipe(las_image, las_label, compat):
    """image_normalize.ipynb: clip the top 0.5 %, resample to 1.25 x 1.25 x 7.70 mm, centre crop/pad to
    256 x 256 (the image padded with its minimum); the origin follows the crop."""
    geometry = Geometry.of(las_image)
    clipped, _ = pl.clip_top_percentile(sitk.GetArrayFromImage(las_image), 99.5)
    resampled = pl.resample_image(pl.image_from_array(clipped, geometry), (1.25, 1.25, 7.70), compat)
    array = sitk.GetArrayFromImage(resampled)
    label = pl.resample_label(las_label, geometry, (1.25, 1.25, 7.70), compat)
    image_dtype, label_dtype = _dtypes(compat)
    image, (off_y, off_x) = pl.centre_crop_or_pad(array, 256, float(array.min()), image_dtype)
    label, _ = pl.centre_crop_or_pad(label, 256, 0.0, label_dtype)
    return image, label, pl.shift_origin(Geometry.of(resampled), (off_x, off_y, 0))


def _sabs_recipe(hu_image, label, compat):
    """intensity_normalization + resampling_and_roi.ipynb: window [-125, 275] HU -> [0, 255], remove a
    32/512 border, resample in-plane so the rest spans 256 pixels; reference: the 257 x 257 x (Z + 1)
    grid cut to [:256, :256], clean: 256 x 256 x Z pixels centred on the field of view."""
    geometry = Geometry.of(hu_image)
    windowed = pl.hu_window(sitk.GetArrayFromImage(hu_image), (-125.0, 275.0), compat)
    nz, height, width = windowed.shape
    by, bx = round(height * 32 / 512), round(width * 32 / 512)
    cropped = pl.shift_origin(geometry, (bx, by, 0))
    sx, sy, sz = geometry.spacing
    spacing = (sx * ((width - 2 * bx) / 256), sy * ((height - 2 * by) / 256), sz)
    size = origin = None
    if compat == "clean":
        size = (256, 256, nz)
        origin = pl.shift_origin(cropped, ((spacing[0] / sx - 1) / 2, (spacing[1] / sy - 1) / 2, 0.0)).origin
    resampled = pl.resample_image(pl.image_from_array(pl.border_crop(windowed, by, bx), cropped), spacing, compat,
                                  size, origin)
    label = pl.resample_label(pl.border_crop(label, by, bx), cropped, spacing, compat, size, origin)
    image_dtype, label_dtype = _dtypes(compat)
    return (sitk.GetArrayFromImage(resampled)[:, :256, :256].astype(image_dtype),
            label[:, :256, :256].astype(label_dtype), Geometry.of(resampled))


@pytest.mark.parametrize("compat", ["reference", "clean"])
def test_prepare_scan_with_the_chaos_block_is_the_chaos_recipe(compat):
    """CHAOS: LAS reorientation, then the reference's clip, resample, crop/pad."""
    image, label = make_phantom(5, size=40, slices=6)
    raw = _image((image * 3).astype(np.int16), (1.5, 1.6, 9.0), LPS)
    expected = _chaos_recipe(sitk.DICOMOrient(raw, "LAS"), np.flip(label, axis=1), compat)   # LPS -> LAS flips rows
    prep = dataclasses.replace(load_spec("CHAOST2").preprocessing, compat=compat)
    got = pl.prepare_scan(raw, label, prep)
    assert got.image.dtype == expected[0].dtype and got.label.dtype == expected[1].dtype
    assert np.array_equal(got.image, expected[0]) and np.array_equal(got.label, expected[1])
    assert got.geometry == expected[2]
    assert got.record["crop_offset_xyz"][2] == 0 and got.record["orientation"] == "LAS"


@pytest.mark.parametrize("compat", ["reference", "clean"])
def test_prepare_scan_with_the_sabs_block_is_the_sabs_recipe(compat):
    image, label = make_phantom(6, size=48, slices=5)
    hu = np.where(image < 30, -1000.0, image * 2 - 150).astype(np.int16)
    raw = _image(hu, (0.8, 0.8, 2.5), LPS)
    expected = _sabs_recipe(raw, label, compat)
    got = pl.prepare_scan(raw, label, dataclasses.replace(load_spec("SABS").preprocessing, compat=compat))
    assert got.image.dtype == expected[0].dtype and got.label.dtype == expected[1].dtype
    assert np.array_equal(got.image, expected[0]) and np.array_equal(got.label, expected[1])
    assert got.geometry.matches(expected[2], rtol=1e-12, atol=1e-12)
    assert got.record["border_crop_offset_xyz"] == [3, 3, 0]


def test_prepare_scan_without_a_label_prepares_the_same_image():
    image, label = make_phantom(8, size=36, slices=4)
    raw = _image((image * 3).astype(np.int16), (1.5, 1.6, 9.0), LPS)
    prep = load_spec("CMR").preprocessing
    with_label, without = pl.prepare_scan(raw, label, prep), pl.prepare_scan(raw, None, prep)
    assert without.label is None and np.array_equal(without.image, with_label.image)
    assert without.geometry == with_label.geometry


def test_prepare_scan_leaves_a_synth_scan_on_its_grid():
    from data.phantoms import phantom_geometry
    image, label = make_phantom(7, size=128, slices=6)
    raw = phantom_geometry(size=128).apply_to(sitk.GetImageFromArray(image))
    got = pl.prepare_scan(raw, label, load_spec("SYNTH").preprocessing)
    assert np.array_equal(got.image, image) and np.array_equal(got.label, label)
    assert got.geometry.matches(phantom_geometry(size=128), rtol=1e-9, atol=1e-9)
