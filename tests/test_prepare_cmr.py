"""MS-CMRSeg bSSFP preparation (data/prepare_cmr.py) on small MS-CMRSeg-like NIfTI pairs written here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data import prepare_cmr as pcmr
from data.core.io import Geometry, read_volume, write_volume

# an oblique short-axis orientation, as in the challenge data
OBLIQUE = tuple(np.linalg.qr(np.array([[0.63, 0.51, -0.59], [0.2, 0.6, 0.7], [0.75, -0.6, 0.3]]))[0].ravel())
# (patient, (nz, ny, nx), spacing): like patient 1 (256 px of 1.25 mm, 12 slices of 12 mm) and
# patient 20 (320 px of 1.1875 mm), which the reference turns into 19 and 15 slices, 257 and 305 px
CASES = {1: ((12, 256, 256), (1.25, 1.25, 12.0)), 20: ((14, 320, 320), (1.1875, 1.1875, 8.0))}


def make_pair(image_dir: Path, label_dir: Path, patient: int, shape, spacing, dtype=np.int16):
    rng = np.random.default_rng(patient)
    image = rng.integers(0, 400, shape).astype(dtype)
    label = np.zeros(shape, np.int16)
    cy, cx = shape[1] // 2, shape[2] // 2
    label[2:-2, cy - 24:cy + 24, cx - 24:cx + 24] = 200            # myocardium ring around
    label[2:-2, cy - 14:cy + 14, cx - 14:cx + 14] = 500            # the blood pool
    label[2:-2, cy - 20:cy + 20, cx - 60:cx - 30] = 600            # right ventricle
    image[2:-2, cy - 14:cy + 14, cx - 14:cx + 14] = 1500           # bright blood pool
    geometry = Geometry(spacing, (-50.0, 120.0, -30.0), OBLIQUE)
    write_volume(image_dir / f"patient{patient}_C0.nii.gz", image, geometry)
    if label_dir is not None:
        write_volume(label_dir / f"patient{patient}_C0_manual.nii.gz", label, geometry)
    return image, label, geometry


@pytest.fixture
def raw_cmr(tmp_path) -> Path:
    root = tmp_path / "C0LET2_nii45_for_challenge19"
    (root / "c0t2lge").mkdir(parents=True)
    (root / "c0gt").mkdir()
    for patient, (shape, spacing) in CASES.items():
        make_pair(root / "c0t2lge", root / "c0gt", patient, shape, spacing)
    make_pair(root / "c0t2lge", None, 40, (8, 64, 64), (1.25, 1.25, 10.0))   # unlabelled test case
    return root


def out_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


def test_prepare_cmr_reproduces_the_published_grid(raw_cmr, tmp_path, capsys):
    out = tmp_path / "CMR"
    assert pcmr.main([str(raw_cmr.parent), str(out), "--verify", "--ids", "1", "20"]) == 0
    folder = out / "cmr_MR_normalized"
    expected = {1: (19, 0), 20: (15, 152 - 128)}              # slices; crop offset of 257 / 305 px
    for patient, (nz, offset) in expected.items():
        image, geometry = read_volume(folder / f"image_{patient}.nii.gz")
        label, label_geometry = read_volume(folder / f"label_{patient}.nii.gz")
        assert image.shape == label.shape == (nz, 256, 256)
        assert geometry == label_geometry
        np.testing.assert_allclose(geometry.spacing, (1.25, 1.25, 7.99), rtol=1e-6)
        np.testing.assert_allclose(geometry.direction, OBLIQUE, atol=1e-6)
        assert image.dtype == label.dtype == np.float64
        assert set(np.unique(label).tolist()) == {0, 200, 500, 600}, "raw label values are kept"
        assert (image == np.round(image)).all() and image.min() == 0
        assert (label[-1] == 0).all()
        sidecar = json.loads((folder / "preprocessing.json").read_text())["cases"][str(patient)]
        assert sidecar["crop_offset_xyz"] == [offset, offset, 0]
        assert sidecar["sources"]["label"].endswith(f"c0gt/patient{patient}_C0_manual.nii.gz")
        # the blood pool centre keeps its world position through resampling, crop and origin shift
        raw = sitk.ReadImage(str(raw_cmr / "c0t2lge" / f"patient{patient}_C0.nii.gz"))
        ny, nx = CASES[patient][0][1:]
        world = raw.TransformContinuousIndexToPhysicalPoint((nx // 2, ny // 2, 5.0))
        x, y, z = sitk.ReadImage(str(folder / f"image_{patient}.nii.gz")).TransformPhysicalPointToIndex(world)
        assert label[z, y, x] == 500 and image[z, y, x] == image.max()
    classmap = json.loads((folder / "classmap_200.json").read_text())
    assert list(classmap) == ["BG", "LV-MYO", "LV-BP", "RV"] and list(classmap["RV"]) == ["1", "20"]
    assert (folder / "classmap_1.json").is_file()


def test_single_folder_layout_and_unlabelled_images(tmp_path, capsys):
    raw = tmp_path / "flat"
    raw.mkdir()
    make_pair(raw, raw, 3, (6, 80, 96), (1.5, 1.5, 10.0), dtype=np.float32)
    make_pair(raw, None, 41, (6, 80, 96), (1.5, 1.5, 10.0))
    out = tmp_path / "CMR"
    assert pcmr.main([str(raw), str(out)]) == 0
    assert "skipping 1 bSSFP image(s) without a manual label: patients [41]" in capsys.readouterr().err
    image, _ = read_volume(out / "cmr_MR_normalized" / "image_3.nii.gz")
    assert image.shape == (8, 256, 256)                       # int(6 * 10 / 7.99 + 1); 97 x 116 px padded
    assert not (image == np.round(image)).all(), "float input is not truncated"
    assert out_files(out) == ["cmr_MR_normalized/classmap_1.json", "cmr_MR_normalized/classmap_200.json",
                              "cmr_MR_normalized/image_3.nii.gz", "cmr_MR_normalized/label_3.nii.gz",
                              "cmr_MR_normalized/preprocessing.json"]


@pytest.mark.parametrize("problem, expected", [
    ("value", "patient1_C0_manual.nii.gz: unexpected label values [300]"),
    ("ids", "patient1_C0_manual.nii.gz: unexpected label values [1, 2, 3]"),
    ("shape", "patient1_C0_manual.nii.gz: shape (z, y, x) (12, 256, 250) differs from its image"),
    ("no_image", "label(s) without a bSSFP image in"),
    ("direction", "patient1_C0_manual.nii.gz: spacing (1.25, 1.25, 12) mm"),
    ("nan", "patient1_C0.nii.gz: 1 NaN and 0 infinite value(s) in this CMR image"),
])
def test_bad_input_is_rejected_naming_the_file(raw_cmr, tmp_path, capsys, problem, expected):
    label_path = raw_cmr / "c0gt" / "patient1_C0_manual.nii.gz"
    label, geometry = read_volume(label_path)
    if problem == "value":
        label[3, 0, 0] = 300
        write_volume(label_path, label, geometry)
    elif problem == "ids":                                    # already mapped to 1/2/3: not the raw release
        write_volume(label_path, np.searchsorted([0, 200, 500, 600], label).astype(np.int16), geometry)
    elif problem == "shape":
        write_volume(label_path, label[:, :, :250], geometry)
    elif problem == "no_image":
        (raw_cmr / "c0t2lge" / "patient1_C0.nii.gz").unlink()
    elif problem == "direction":
        write_volume(label_path, label, Geometry(geometry.spacing, geometry.origin))
    elif problem == "nan":
        image_path = raw_cmr / "c0t2lge" / "patient1_C0.nii.gz"
        image, image_geometry = read_volume(image_path, dtype=np.float32)
        image[0, 0, 0] = np.nan
        write_volume(image_path, image, image_geometry)
    out = tmp_path / "CMR"
    assert pcmr.main([str(raw_cmr), str(out), "--ids", "1"]) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert out_files(out) == []


def test_missing_folders(tmp_path, capsys):
    assert pcmr.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "raw MS-CMRSeg folder not found" in capsys.readouterr().err
    (tmp_path / "raw").mkdir()
    assert pcmr.main([str(tmp_path / "raw"), str(tmp_path / "out")]) == 1
    assert "has neither c0t2lge/ and c0gt/ folders" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["prepare_chaos", "prepare_sabs", "prepare_cmr", "classmap", "verify"])
def test_every_command_has_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"data.{module}").main(["-h"])
    assert exit_info.value.code == 0
    assert f"python -m data.{module}" in capsys.readouterr().out
