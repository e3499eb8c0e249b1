"""Synapse/SABS CT preparation (data/prepare_sabs.py) on small NIfTI volumes in HU written here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data import prepare_sabs as ps
from data.core.io import Geometry, read_volume, write_volume

SPACING = (0.8, 0.8, 3.0)
ORIGIN = (-200.0, -210.0, -300.0)


def make_case(training: Path, case: int, size: int = 64, nz: int = 4, label_offset: int = 0):
    """A CT volume in HU with a bright marker over the liver; returns the marker's native voxel (x, y, z)."""
    rng = np.random.default_rng(case)
    image = rng.integers(-1000, 0, (nz, size, size)).astype(np.int16)
    label = np.zeros((nz, size, size), np.uint8)
    q = size // 8
    marker = (slice(1, 3), slice(2 * q, 3 * q), slice(3 * q, 4 * q))
    image[marker] = 1500                            # above the window: 255 after windowing
    label[marker] = 6                               # liver
    label[1:3, 5 * q:6 * q, 2 * q + label_offset:3 * q + label_offset] = 1     # spleen, position per case
    label[2, 5 * q:5 * q + 2, 5 * q:5 * q + 2] = 13                         # a small adrenal
    geometry = Geometry(SPACING, ORIGIN)
    write_volume(training / "img" / f"img{case:04d}.nii.gz", image, geometry)
    write_volume(training / "label" / f"label{case:04d}.nii.gz", label, geometry)
    return (3.5 * q, 2.5 * q, 1.5), label


@pytest.fixture
def raw_sabs(tmp_path) -> Path:
    training = tmp_path / "RawData" / "Training"
    (training / "img").mkdir(parents=True)
    (training / "label").mkdir()
    make_case(training, 1, label_offset=0)
    make_case(training, 2, label_offset=4)
    make_case(training, 21, label_offset=8)
    return training


def out_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


@pytest.mark.parametrize("compat", ["reference", "clean"])
def test_prepare_sabs_small_cases(raw_sabs, tmp_path, compat):
    out = tmp_path / "SABS"
    assert ps.main([str(raw_sabs.parents[1]), str(out), "--compat", compat, "--verify", "--ids", "0", "1", "10"]) == 0
    folder = out / "sabs_CT_normalized"
    assert {p.name for p in folder.glob("image_*")} == {"image_0.nii.gz", "image_1.nii.gz", "image_10.nii.gz"}
    image, geometry = read_volume(folder / "image_10.nii.gz")
    label, label_geometry = read_volume(folder / "label_10.nii.gz")
    assert image.shape == label.shape == ((5 if compat == "reference" else 4), 256, 256)
    assert geometry == label_geometry
    # 64 px: a 4-px border (32/512 of the field of view) is removed, 56 px resampled to 256
    np.testing.assert_allclose(geometry.spacing, (0.8 * 56 / 256, 0.8 * 56 / 256, 3.0), rtol=1e-6)
    # origin: moved past the removed border; clean also centres the 256 pixels on the field of view
    shift = 4 * 0.8 + ((56 / 256 - 1) / 2 * 0.8 if compat == "clean" else 0.0)
    np.testing.assert_allclose(geometry.origin, (ORIGIN[0] + shift, ORIGIN[1] + shift, ORIGIN[2]), atol=1e-4)
    assert image.min() >= 0 and image.max() == pytest.approx(255)
    assert set(np.unique(label).tolist()) == {0, 1, 6, 13}
    if compat == "reference":
        assert image.dtype == label.dtype == np.float64
        assert (label[-1] == 0).all() and (image[-1] == 0).all()      # the reference's Z+1 slice
    else:
        assert image.dtype == np.float32 and label.dtype == np.uint8

    # the liver marker stays at its world position; case 21's own label came with it (paired by case)
    marker_world = sitk.ReadImage(str(raw_sabs / "img" / "img0021.nii.gz")).TransformContinuousIndexToPhysicalPoint((28.0, 20.0, 1.5))
    x, y, z = sitk.ReadImage(str(folder / "image_10.nii.gz")).TransformPhysicalPointToIndex(marker_world)
    assert image[z, y, x] == pytest.approx(255) and label[z, y, x] == 6
    spleen_x = {i: np.flatnonzero((read_volume(folder / f"label_{i}.nii.gz")[0] == 1).any(axis=(0, 1)))[0]
                for i in (0, 1, 10)}
    assert spleen_x[0] < spleen_x[1] < spleen_x[10]

    sidecar = json.loads((folder / "preprocessing.json").read_text())
    case = sidecar["cases"]["10"]
    assert case["sources"]["synapse_case"] == 21 and case["border_crop_offset_xyz"] == [4, 4, 0]
    assert any("not Synapse's 512x512" in w for w in case["warnings"])
    classmap = json.loads((folder / "classmap_1.json").read_text())
    assert list(classmap)[:3] == ["BGD", "SPLEEN", "KID_R"] and list(classmap["BGD"]) == ["0", "1", "10"]
    # count rule (the SABS reference): BGD lists every slice with background, not only foreground ones
    assert classmap["BGD"]["10"] == list(range(label.shape[0]))
    assert classmap["AG_L"]["10"] == np.flatnonzero((label == 13).any(axis=(1, 2))).tolist()


@pytest.mark.parametrize("compat", ["reference", "clean"])
def test_prepare_sabs_512_matches_the_reference_grid(tmp_path, compat):
    training = tmp_path / "Training"
    (training / "img").mkdir(parents=True)
    (training / "label").mkdir()
    _, raw_label = make_case(training, 5, size=512, nz=3)
    out = tmp_path / "SABS"
    assert ps.main([str(training), str(out), "--compat", compat]) == 0
    image, geometry = read_volume(out / "sabs_CT_normalized" / "image_4.nii.gz")
    label, _ = read_volume(out / "sabs_CT_normalized" / "label_4.nii.gz")
    # reference: 257 x 257 x (3 + 1) as the notebook, trimmed to 256 as its loader; clean: 256 x 256 x 3
    assert image.shape == ((4, 256, 256) if compat == "reference" else (3, 256, 256))
    np.testing.assert_allclose(geometry.spacing, (0.8 * 1.75, 0.8 * 1.75, 3.0), rtol=1e-6)
    shift = 32 * 0.8 + (0.75 / 2 * 0.8 if compat == "clean" else 0.0)
    np.testing.assert_allclose(geometry.origin[:2], (ORIGIN[0] + shift, ORIGIN[1] + shift), atol=1e-4)
    sidecar = json.loads((out / "sabs_CT_normalized" / "preprocessing.json").read_text())
    assert sidecar["cases"]["4"]["resampled_size_xyz"] == ([257, 257, 4] if compat == "reference" else [256, 256, 3])
    assert sidecar["cases"]["4"]["warnings"] == []
    # large structures keep their volume (liver block: 64 x 64 px of 0.8 mm on 2 slices)
    liver_mm2 = (label == 6).sum() * geometry.spacing[0] * geometry.spacing[1]
    assert liver_mm2 == pytest.approx((raw_label == 6).sum() * 0.8 * 0.8, rel=0.1)


def test_case_numbers_map_to_fixed_ids():
    assert ps.CASE_TO_ID[1] == 0 and ps.CASE_TO_ID[10] == 9 and ps.CASE_TO_ID[21] == 10 and ps.CASE_TO_ID[40] == 29
    assert ps.border_for(512) == 32 and ps.border_for(64) == 4 and ps.border_for(480) == 30


def _write_label(raw: Path, case: int, label: np.ndarray, geometry=Geometry(SPACING, ORIGIN)) -> Path:
    path = raw / "label" / f"label{case:04d}.nii.gz"
    write_volume(path, label, geometry)
    return path


@pytest.mark.parametrize("problem, expected", [
    ("value14", "label0002.nii.gz: unexpected label values [14]"),
    ("fraction", "label0002.nii.gz: non-integer label values [0.5]"),
    ("shape", "label0002.nii.gz: shape (z, y, x) (4, 64, 60) differs from its image img0002.nii.gz (4, 64, 64)"),
    ("geometry", "label0002.nii.gz: spacing (0.9, 0.8, 3) mm"),
    ("no_label", "image(s) without a label in"),
    ("unknown_case", "case number(s) [50]"),
    ("constant", "img0002.nii.gz: every voxel lies at or beyond the same end of the HU window"),
])
def test_bad_input_is_rejected_naming_the_file(raw_sabs, tmp_path, capsys, problem, expected):
    label = np.zeros((4, 64, 64), np.float32)
    if problem == "value14":
        label[0, 0, 0] = 14
        _write_label(raw_sabs, 2, label)
    elif problem == "fraction":
        label[0, 0, 0] = 0.5
        _write_label(raw_sabs, 2, label)
    elif problem == "shape":
        _write_label(raw_sabs, 2, label[:, :, :60])
    elif problem == "geometry":
        _write_label(raw_sabs, 2, label, Geometry((0.9, 0.8, 3.0), ORIGIN))
    elif problem == "no_label":
        (raw_sabs / "label" / "label0002.nii.gz").unlink()
        expected += f" {raw_sabs / 'label'}: {raw_sabs / 'img' / 'img0002.nii.gz'}"
    elif problem == "unknown_case":
        make_case(raw_sabs, 50)
    elif problem == "constant":
        write_volume(raw_sabs / "img" / "img0002.nii.gz", np.full((4, 64, 64), -2000, np.int16),
                     Geometry(SPACING, ORIGIN))
    out = tmp_path / "SABS"
    assert ps.main([str(raw_sabs), str(out), "--ids", "1"]) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert out_files(out) == []


def test_missing_folders(tmp_path, capsys):
    assert ps.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "raw Synapse folder not found" in capsys.readouterr().err
    (tmp_path / "raw" / "img").mkdir(parents=True)
    assert ps.main([str(tmp_path / "raw"), str(tmp_path / "out")]) == 1
    assert "has no img/ and label/ folders" in capsys.readouterr().err
