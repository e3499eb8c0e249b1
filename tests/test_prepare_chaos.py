"""CHAOS T2-SPIR preparation (data/prepare_chaos.py) on a small DICOM + PNG subject written here."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from data import prepare_chaos as pc
from data.core.io import DataError, Geometry, read_volume
from data.core.specs import load_spec
from data.pipeline import image_from_array, reorient

ROWS, COLS, NZ = 48, 64, 6
ROW_SPACING, COL_SPACING, SLICE_GAP = 1.6, 1.4, 7.0
FIRST_POSITION = np.array([-40.0, -30.0, -20.0])
# z index -> instance number - 1: file names do not sort in slice order
INSTANCE_OF_Z = [3, 5, 0, 4, 1, 2]
MARKER = (slice(2, 4), slice(4, 12), slice(40, 52))          # (z, rows, cols) in native DICOM order


def _stem(k: int) -> str:
    return f"IMG-0002-{INSTANCE_OF_Z[k] + 1:05d}"


def native_volumes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(z, rows, cols) pixels and PNG grey values in native DICOM order (row 0 = anterior), z ascending."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 100, (NZ, ROWS, COLS)).astype(np.uint16)
    pixels[MARKER] = 1000
    png = np.zeros((NZ, ROWS, COLS), np.uint8)
    png[MARKER] = 63                                          # liver under the bright marker
    png[1:5, 30:41, 5:16] = 126                               # right kidney (patient right = low x)
    png[1:5, 30:41, 45:56] = 189                              # left kidney
    png[2:4, 18:27, 52:61] = 252                              # spleen
    return pixels, png


def write_dicom(path: Path, pixels: np.ndarray, position, orientation=(1, 0, 0, 0, 1, 0),
                instance: int = 1, series_uid: str = "1.2.3") -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "MR", series_uid, series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [str(v) for v in orientation]
    ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
    ds.SliceThickness = SLICE_GAP
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_subject(mr_root: Path, subject: int, seed: int = 0) -> Path:
    t2 = mr_root / str(subject) / "T2SPIR"
    (t2 / "DICOM_anon").mkdir(parents=True)
    (t2 / "Ground").mkdir()
    pixels, png = native_volumes(seed)
    uid = generate_uid()
    for k in np.random.default_rng(seed).permutation(NZ):          # written in shuffled order too
        position = FIRST_POSITION + np.array([0, 0, SLICE_GAP * k])
        write_dicom(t2 / "DICOM_anon" / f"{_stem(k)}.dcm", pixels[k], position,
                    instance=INSTANCE_OF_Z[k] + 1, series_uid=uid)
        cv2.imwrite(str(t2 / "Ground" / f"{_stem(k)}.png"), png[k])
    return t2


@pytest.fixture
def raw_mr(tmp_path) -> Path:
    mr = tmp_path / "CHAOS_Train_Sets" / "Train_Sets" / "MR"
    make_subject(mr, 1, seed=0)
    make_subject(mr, 2, seed=1)
    return mr


def out_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


# ------------------------------------------------------------------------------------ raw reading
def test_slices_are_sorted_by_position_and_reoriented_like_dcm2nii(raw_mr):
    native, native_label, paths = pc.read_subject(raw_mr / "1" / "T2SPIR")
    orientation = load_spec("CHAOST2").preprocessing.orientation          # LAS, as dcm2nii laid it out
    image = reorient(native, orientation)
    label = sitk.GetArrayFromImage(reorient(image_from_array(native_label, Geometry.of(native)), orientation))
    assert [p.stem for p in paths] == [_stem(k) for k in range(NZ)]
    assert image.GetDirection() == (1, 0, 0, 0, -1, 0, 0, 0, 1)                   # LAS
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(image.GetSpacing(), (COL_SPACING, ROW_SPACING, SLICE_GAP), rtol=1e-6)
    pixels, png = native_volumes(0)
    # the reference's layout: native slices inferior->superior, rows flipped (row 0 = posterior)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), pixels[:, ::-1, :])
    ids = pc.png_lookup()[png]
    np.testing.assert_array_equal(label, ids[:, ::-1, :])                         # png_gth_to_nii's flip
    # the flipped first row is the most posterior one: its world y (LPS, +y = posterior) is the largest
    y_first_row = image.TransformIndexToPhysicalPoint((0, 0, 0))[1]
    assert y_first_row == pytest.approx(FIRST_POSITION[1] + (ROWS - 1) * ROW_SPACING, abs=1e-3)


def test_png_value_ranges_and_strictness(tmp_path):
    good = np.array([[0, 55, 63, 70, 110, 126, 135], [175, 189, 200, 240, 252, 255, 0]], np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), good)
    np.testing.assert_array_equal(pc.read_png_label(tmp_path / "a.png", good.shape),
                                  [[0, 1, 1, 1, 2, 2, 2], [3, 3, 3, 4, 4, 4, 0]])
    bad = good.copy()
    bad[0, 0] = 100
    cv2.imwrite(str(tmp_path / "b.png"), bad)
    with pytest.raises(DataError, match=r"b\.png has grey values \[100\]"):
        pc.read_png_label(tmp_path / "b.png", bad.shape)


# ------------------------------------------------------------------------------------ pipeline
def _world_of_native(col: float, row: float, k: float) -> tuple[float, float, float]:
    return tuple(FIRST_POSITION + np.array([col * COL_SPACING, row * ROW_SPACING, k * SLICE_GAP]))


@pytest.mark.parametrize("compat", ["reference", "clean"])
def test_prepare_writes_256_las_volumes_with_the_marker_in_place(raw_mr, tmp_path, compat):
    out = tmp_path / "CHAOST2"
    assert pc.main([str(raw_mr), str(out), "--ids", "1", "2", "--compat", compat, "--verify"]) == 0
    folder = out / "chaos_MR_T2_normalized"
    image, geometry = read_volume(folder / "image_1.nii.gz")
    label, label_geometry = read_volume(folder / "label_1.nii.gz")
    expected_z = 6 if compat == "reference" else 5        # int(6 * 7 / 7.7 + 1); ceil(5.5 * 7 / 7.7)
    assert image.shape == label.shape == (expected_z, 256, 256)
    assert geometry == label_geometry
    np.testing.assert_allclose(geometry.spacing, (1.25, 1.25, 7.70), rtol=1e-6)
    assert geometry.direction == (1, 0, 0, 0, -1, 0, 0, 0, 1)
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
    pixels, _ = native_volumes(0)
    assert image.min() >= 0 and image.max() <= np.percentile(pixels, 99.5)
    if compat == "reference":
        assert image.dtype == label.dtype == np.float64
        assert (image == np.round(image)).all(), "int16 input is truncated, so values stay integers"
        assert (label[-1] == 0).all() and (image[-1] == 0).all(), "the +1 slice lies past the input"
        assert image.min() == 0, "the padding takes the minimum, 0 from the trailing slice"
    else:
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image[-1].min() > 0, "no sample past the input, so no empty slice"

    # the marker, placed at a known patient position, lands where the world coordinates say
    out_image = sitk.ReadImage(str(folder / "image_1.nii.gz"))
    x, y, z = out_image.TransformPhysicalPointToIndex(_world_of_native(45.5, 7.5, 2.5))
    assert label[z, y, x] == 1 and image[z, y, x] == image.max()
    assert y > 128, "native row 7 (anterior) must land in the lower half: rows run toward anterior in LAS"
    # patient right (low x) holds the right kidney
    x, y, z = out_image.TransformPhysicalPointToIndex(_world_of_native(10, 35, 2.5))
    assert label[z, y, x] == 2 and x < 128

    sidecar = json.loads((folder / "preprocessing.json").read_text())
    assert sidecar["parameters"]["compat"] == compat and set(sidecar["cases"]) == {"1", "2"}
    case = sidecar["cases"]["1"]
    assert case["sources"]["dicom_files_in_slice_order"] == [f"{_stem(k)}.dcm" for k in range(NZ)]
    assert case["crop_offset_xyz"][2] == 0 and case["crop_offset_xyz"][0] < 0       # padded
    for m in (1, 100, 400):
        classmap = json.loads((folder / f"classmap_{m}.json").read_text())
        assert list(classmap) == ["BG", "LIVER", "RK", "LK", "SPLEEN"]
        assert list(classmap["LIVER"]) == ["1", "2"]
    assert json.loads((folder / "classmap_1.json").read_text())["LIVER"]["1"] == \
        np.flatnonzero((label == 1).any(axis=(1, 2))).tolist()


def test_rerun_skips_existing_and_overwrite_is_deterministic(raw_mr, tmp_path, capsys):
    out = tmp_path / "CHAOST2"
    args = [str(raw_mr), str(out), "--ids", "1"]
    assert pc.main(args) == 0
    image_path = out / "chaos_MR_T2_normalized" / "image_1.nii.gz"
    classmap_path = out / "chaos_MR_T2_normalized" / "classmap_1.json"
    first_bytes, first_mtime = image_path.read_bytes(), image_path.stat().st_mtime_ns
    classmap_mtime = classmap_path.stat().st_mtime_ns
    capsys.readouterr()
    assert pc.main(args) == 0
    assert "1 of 1 scans already prepared" in capsys.readouterr().err
    assert image_path.stat().st_mtime_ns == first_mtime
    assert classmap_path.stat().st_mtime_ns == classmap_mtime, "an unchanged index is not rewritten"
    classmap_path.unlink()                          # e.g. a run interrupted before the index
    assert pc.main(args) == 0 and classmap_path.is_file()
    assert pc.main(args + ["--overwrite"]) == 0
    assert image_path.read_bytes() == first_bytes
    # other options on top of existing scans are refused instead of mixing conventions
    assert pc.main(args[:2] + ["--ids", "2", "--compat", "clean"]) == 1
    assert "compat='reference' (this run: 'clean')" in capsys.readouterr().err


def test_raw_folder_may_be_any_level_of_the_archive(raw_mr, tmp_path):
    archive_root = raw_mr.parents[2]
    assert pc.find_mr_root(archive_root) == raw_mr
    assert pc.find_mr_root(raw_mr.parent) == raw_mr


# ------------------------------------------------------------------------------------ bad input
def _corrupt_dicom(t2: Path) -> str:
    path = t2 / "DICOM_anon" / f"{_stem(3)}.dcm"
    path.write_bytes(b"\x00garbage" * 64)
    return path.name


def _truncated_dicom(t2: Path) -> str:
    path = t2 / "DICOM_anon" / f"{_stem(1)}.dcm"
    path.write_bytes(path.read_bytes()[:-2000])
    return path.name


def _missing_png(t2: Path) -> str:
    (t2 / "Ground" / f"{_stem(4)}.png").unlink()
    return f"no PNG for {_stem(4)}.dcm"


def _extra_png(t2: Path) -> str:
    cv2.imwrite(str(t2 / "Ground" / "IMG-0002-00099.png"), np.zeros((ROWS, COLS), np.uint8))
    return "7 PNG(s) for 6 DICOM slice(s); no DICOM for IMG-0002-00099.png"


def _bad_png_value(t2: Path) -> str:
    png = np.zeros((ROWS, COLS), np.uint8)
    png[3, 3] = 90
    cv2.imwrite(str(t2 / "Ground" / f"{_stem(2)}.png"), png)
    return f"{_stem(2)}.png has grey values [90]"


def _rgb_png(t2: Path) -> str:
    cv2.imwrite(str(t2 / "Ground" / f"{_stem(0)}.png"), np.zeros((ROWS, COLS, 3), np.uint8))
    return f"{_stem(0)}.png is 3-channel"


def _png_size(t2: Path) -> str:
    cv2.imwrite(str(t2 / "Ground" / f"{_stem(5)}.png"), np.zeros((ROWS, COLS + 1), np.uint8))
    return f"{_stem(5)}.png is 48x65"


def _missing_ground(t2: Path) -> str:
    shutil.rmtree(t2 / "Ground")
    return str(t2 / "Ground")


def _duplicate_position(t2: Path) -> str:
    pixels, _ = native_volumes(0)
    write_dicom(t2 / "DICOM_anon" / "IMG-0002-00050.dcm", pixels[0], FIRST_POSITION)
    return "lie at the same slice position"


def _mixed_orientation(t2: Path) -> str:
    path = t2 / "DICOM_anon" / f"{_stem(2)}.dcm"
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.save_as(path)
    return f"{_stem(2)}.dcm: ImageOrientationPatient"


def _gap(t2: Path) -> str:
    (t2 / "DICOM_anon" / f"{_stem(2)}.dcm").unlink()
    (t2 / "Ground" / f"{_stem(2)}.png").unlink()
    return f"slice gap 14.0000 mm between {_stem(1)}.dcm and {_stem(3)}.dcm"


@pytest.mark.parametrize("corrupt", [_corrupt_dicom, _truncated_dicom, _missing_png, _extra_png,
                                     _bad_png_value, _rgb_png, _png_size, _missing_ground,
                                     _duplicate_position, _mixed_orientation, _gap])
def test_bad_input_fails_naming_the_file_and_writes_nothing(raw_mr, tmp_path, capsys, corrupt):
    expected = corrupt(raw_mr / "1" / "T2SPIR")
    out = tmp_path / "CHAOST2"
    assert pc.main([str(raw_mr), str(out), "--ids", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and expected in err, err
    assert out_files(out) == []


def test_missing_raw_folder(tmp_path, capsys):
    assert pc.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert f"raw CHAOS folder not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert pc.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "holds no <id>/T2SPIR folders" in capsys.readouterr().err


def test_unknown_subject_id(raw_mr, tmp_path, capsys):
    assert pc.main([str(raw_mr), str(tmp_path / "out"), "--ids", "1", "7"]) == 1
    assert "no T2SPIR folder for subject(s) [7]" in capsys.readouterr().err


def test_a_failing_subject_leaves_the_finished_ones_complete(raw_mr, tmp_path, capsys):
    _bad_png_value(raw_mr / "2" / "T2SPIR")
    out = tmp_path / "CHAOST2"
    assert pc.main([str(raw_mr), str(out), "--ids", "1", "2"]) == 1
    folder = "chaos_MR_T2_normalized"
    assert out_files(out) == [f"{folder}/image_1.nii.gz", f"{folder}/label_1.nii.gz",
                              f"{folder}/preprocessing.json"]
    # fix the PNG; the re-run keeps subject 1 and adds subject 2
    cv2.imwrite(str(raw_mr / "2" / "T2SPIR" / "Ground" / f"{_stem(2)}.png"), np.zeros((ROWS, COLS), np.uint8))
    capsys.readouterr()
    assert pc.main([str(raw_mr), str(out), "--ids", "1", "2"]) == 0
    assert "1 of 2 scans already prepared" in capsys.readouterr().err
    assert f"{folder}/image_2.nii.gz" in out_files(out)
