"""A file that cannot be read completely is an error: truncated files, NaN/inf voxels, scans that do not
fit the others. SimpleITK alone zero-fills a short NIfTI file and reads NaN as 0, silently; every
reader goes through `data.core.io.read_volume`, which refuses both. Each test corrupts its own files."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data import classmap as cm
from data import pseudolabels as pl
from data import verify as vf
from data.core.io import DataError, Geometry, read_volume, write_volume
from data.core.specs import load_spec
from data.prepare import read_nifti_pair
from dataloaders.volumes import VolumeStore
from tests.helpers import GEOMETRY, write_dataset

SHAPE = (4, 32, 32)
IDS = (1, 2, 3, 4)


def truncate(path: Path) -> Path:
    """Cut the file's bytes in half, as an interrupted copy or download does."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with its checksum: what a failed command must leave unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def noisy_label(seed: int = 0) -> np.ndarray:
    """A label that compresses to a few kB, so that half of the file still holds the header."""
    return np.random.default_rng(seed).integers(0, 3, SHAPE).astype(np.float64)


def stored_nan_count(path: Path) -> int:
    """NaN voxels in the file as nibabel reads it (SimpleITK would report none)."""
    return int(np.isnan(np.asanyarray(nib.load(str(path)).dataobj)).sum())


@pytest.fixture
def toy(tmp_path) -> Path:
    return write_dataset(tmp_path / "toy", ids=IDS, shape=SHAPE)


def store_of(root: Path) -> VolumeStore:
    return VolumeStore(load_spec("TOY", root), root)


# ------------------------------------------------------------------------------------ read_volume
def test_a_truncated_nii_gz_names_the_file(tmp_path):
    path = write_volume(tmp_path / "scan.nii.gz", np.random.default_rng(0).random(SHAPE, np.float32), GEOMETRY)
    truncate(path)
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == 0).mean() > 0.3   # SimpleITK: zeros, no error
    with pytest.raises(DataError, match=f"cannot read label {path}: the file is truncated or corrupt "
                                        r"\(its compressed stream ends early\)"):
        read_volume(path, what="label")


@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz"])
def test_fewer_voxel_bytes_than_the_header_declares(tmp_path, name):
    """A complete file (a whole gzip stream for .nii.gz) whose voxel data stops early."""
    whole = write_volume(tmp_path / "whole.nii", np.ones(SHAPE, np.float32), GEOMETRY).read_bytes()
    short = whole[:len(whole) - 1000]
    path = tmp_path / name
    path.write_bytes(gzip.compress(short) if name.endswith(".gz") else short)
    with pytest.raises(DataError, match=f"{path}: the file is truncated or corrupt \\(it holds "
                                        f"{np.prod(SHAPE) * 4 - 1000} voxel bytes where its header declares "
                                        f"{np.prod(SHAPE) * 4}\\)"):
        read_volume(path)


def test_nan_and_inf_voxels_are_counted(tmp_path):
    image = np.ones(SHAPE, np.float32)
    image[0, 0, :3] = np.nan
    image[1, 1, 1] = -np.inf
    path = write_volume(tmp_path / "scan.nii.gz", image, GEOMETRY)
    assert stored_nan_count(path) == 3                          # the file does hold them
    with pytest.raises(DataError, match=f"{path}: 3 NaN and 1 infinite value\\(s\\) in this image .*"
                                        f"re-export the file, or re-run the preprocessing"):
        read_volume(path, what="image")


def test_nan_in_a_non_nifti_file(tmp_path):
    """Other formats (.mha, .nrrd: nnU-Net datasets) keep NaN in SimpleITK's array; it is checked there."""
    image = np.ones(SHAPE, np.float32)
    image[2, 3, 4] = np.nan
    path = tmp_path / "scan.mha"
    sitk.WriteImage(GEOMETRY.apply_to(sitk.GetImageFromArray(image)), str(path))
    with pytest.raises(DataError, match=f"{path}: 1 NaN and 0 infinite"):
        read_volume(path)


def test_values_and_geometry_are_simpleitks(tmp_path):
    array = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    path = write_volume(tmp_path / "scan.nii.gz", array, GEOMETRY)
    image = sitk.ReadImage(str(path))
    read, geometry = read_volume(path)
    assert read.dtype == np.float32 and read.tobytes() == sitk.GetArrayFromImage(image).tobytes()
    assert repr(geometry) == repr(Geometry.of(image))


def test_real_volume_is_read_as_before(chaos_dir):
    path = chaos_dir / "chaos_MR_T2_normalized" / "image_1.nii.gz"
    image = sitk.ReadImage(str(path))
    read, geometry = read_volume(path)
    assert read.dtype == np.float64 and read.tobytes() == sitk.GetArrayFromImage(image).tobytes()
    assert repr(geometry) == repr(Geometry.of(image))           # signed zeros included


def test_read_nifti_pair_refuses_a_nan_label(tmp_path):
    image = write_volume(tmp_path / "img.nii.gz", np.ones(SHAPE, np.float32), GEOMETRY)
    label = np.zeros(SHAPE, np.float32)
    label[0, 0, 0] = np.nan
    label_path = write_volume(tmp_path / "lab.nii.gz", label, GEOMETRY)
    with pytest.raises(DataError, match=f"{label_path}: 1 NaN and 0 infinite value\\(s\\) in this CMR label"):
        read_nifti_pair(image, label_path, "CMR")


# ------------------------------------------------------------------------------------ VolumeStore
@pytest.mark.parametrize("kind", ["image", "label"])
def test_store_refuses_a_truncated_file(toy, kind):
    path = toy / "images" / f"{kind}_2.nii.gz"
    if kind == "label":
        write_volume(path, noisy_label(), GEOMETRY)
    truncate(path)
    store = store_of(toy)
    store.scan(1)
    with pytest.raises(DataError, match=f"cannot read TOY {kind} {path}: the file is truncated"):
        store.scan(2)


@pytest.mark.parametrize("kind", ["image", "label"])
def test_store_refuses_nan_voxels(toy, kind):
    path = toy / "images" / f"{kind}_3.nii.gz"
    array = read_volume(path, dtype=np.float32)[0]
    array[1, 2, 3] = np.nan
    array[1, 2, 4] = np.inf
    write_volume(path, array, GEOMETRY)
    with pytest.raises(DataError, match=f"{path}: 1 NaN and 1 infinite value\\(s\\) in this TOY {kind}"):
        store_of(toy).scan(3)


def test_store_refuses_a_pseudolabel_file_that_is_truncated(toy):
    path = truncate(toy / "supervoxels_100" / "superpix-MIDDLE_2.nii.gz")
    with pytest.raises(DataError, match=f"{path}"):
        store_of(toy).pseudolabels(2, "supervoxels_100")


def test_store_refuses_a_scan_of_another_in_plane_size(toy):
    rng = np.random.default_rng(1)
    path = write_volume(toy / "images" / "image_3.nii.gz", rng.random((4, 30, 32)), GEOMETRY)
    write_volume(toy / "images" / "label_3.nii.gz", np.zeros((4, 30, 32)), GEOMETRY)
    store = store_of(toy)
    for scan_id in (1, 2, 4):
        store.scan(scan_id)                                    # the others load
    with pytest.raises(DataError, match=f"{path}: in-plane size 30x32 \\(y x\\) differs from the other scans "
                                        f"of {toy / 'images'}: 32x32 \\(3 scan\\(s\\)\\).*re-run the preprocessing"):
        store.scan(3)


def test_store_names_a_constant_scan(toy):
    path = write_volume(toy / "images" / "image_4.nii.gz", np.full(SHAPE, 3.0, np.float32), GEOMETRY)
    with pytest.raises(DataError, match=f"cannot z-score TOY image {path}: it is constant \\(every voxel 3\\).*"
                                        f"re-run the preprocessing for this scan"):
        store_of(toy).scan(4)


def test_store_names_an_all_nan_scan(toy):
    path = write_volume(toy / "images" / "image_4.nii.gz", np.full(SHAPE, np.nan, np.float32), GEOMETRY)
    with pytest.raises(DataError, match=f"{path}: {np.prod(SHAPE)} NaN and 0 infinite value\\(s\\)"):
        store_of(toy).scan(4)


# ------------------------------------------------------------------------------------ commands
def test_classmap_command_fails_on_a_truncated_label_and_writes_nothing(toy, capsys):
    assert cm.main([str(toy), "--dataset", "TOY"]) == 0        # an existing classmap_1.json stays as is
    path = write_volume(toy / "images" / "label_3.nii.gz", noisy_label(), GEOMETRY)
    truncate(path)
    before = snapshot(toy)
    capsys.readouterr()
    assert cm.main([str(toy), "--dataset", "TOY", "--min-fg", "1", "100"]) == 1
    assert f"{path}: the file is truncated" in capsys.readouterr().err
    assert snapshot(toy) == before


def test_pseudolabels_command_fails_on_a_truncated_image_and_writes_nothing(tmp_path, capsys):
    root = write_dataset(tmp_path / "toy", ids=IDS, shape=SHAPE, with_supervoxels=False)
    path = truncate(root / "images" / "image_3.nii.gz")           # not the first scan: nothing is written
    before = snapshot(root)
    assert pl.main([str(root), "--dataset", "TOY", "--quiet"]) == 1
    assert f"{path}: the file is truncated" in capsys.readouterr().err
    assert snapshot(root) == before


def test_verify_command_reports_a_truncated_image(toy, capsys):
    path = truncate(toy / "images" / "image_2.nii.gz")
    before = snapshot(toy)
    assert vf.main([str(toy), "--dataset", "TOY"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("ERROR: ") and f"{path}: the file is truncated" in line for line in out), out
    assert snapshot(toy) == before


# ------------------------------------------------------------------------------------ verify: pseudolabels
def _corrupt_pseudolabel(root: Path, problem: str) -> str:
    """Damage the supervoxels of scan 2; returns the message expected in the report."""
    path = root / "supervoxels_100" / "superpix-MIDDLE_2.nii.gz"
    ids = read_volume(path)[0]
    if problem == "truncated":
        write_volume(path, np.random.default_rng(0).integers(0, 50, SHAPE).astype(np.int32), GEOMETRY)
        truncate(path)
        return f"{path}: the file is truncated"
    if problem == "shape":
        write_volume(path, ids[:, :, :30], GEOMETRY)
        return f"{path}: shape (z, y, x) (4, 32, 30) differs from its image's (4, 32, 32) (image_2.nii.gz)"
    if problem == "geometry":
        write_volume(path, ids, Geometry((1.5, 1.5, 5.0)))
        return f"{path}: geometry spacing (1.5, 1.5, 5) mm"
    if problem == "non-integer":
        write_volume(path, ids + np.where(ids == 11, 0.5, 0.0), GEOMETRY)
        return f"{path}: non-integer ids [11.5]"
    if problem == "negative":
        write_volume(path, ids - 2, GEOMETRY)
        return f"{path}: negative ids (smallest -1)"
    raise AssertionError(problem)


def test_verify_accepts_the_pseudolabels_of_a_clean_dataset(toy):
    report = vf.verify_dataset(toy, load_spec("TOY", toy))
    assert report.ok, report.format()


def test_verify_accepts_pseudolabels_without_geometry(toy):
    """The published reference pseudolabels carry no geometry: unit spacing, zero origin."""
    path = toy / "supervoxels_100" / "superpix-MIDDLE_2.nii.gz"
    write_volume(path, read_volume(path)[0], Geometry((1.0, 1.0, 1.0)))
    assert vf.verify_dataset(toy, load_spec("TOY", toy)).ok


@pytest.mark.parametrize("problem", ["truncated", "shape", "geometry", "non-integer", "negative"])
def test_verify_reports_each_pseudolabel_problem(toy, problem):
    expected = _corrupt_pseudolabel(toy, problem)
    report = vf.verify_dataset(toy, load_spec("TOY", toy))
    assert len(report.errors) == 1 and expected in report.errors[0], report.format()
    if problem != "truncated":
        assert "python -m data.pseudolabels" in report.errors[0] and "--ids 2 --overwrite" in report.errors[0]


def test_verify_headers_only_checks_the_pseudolabel_grid_not_its_values(toy):
    _corrupt_pseudolabel(toy, "non-integer")
    assert vf.verify_dataset(toy, load_spec("TOY", toy), read_arrays=False).ok
    expected = _corrupt_pseudolabel(toy, "shape")
    report = vf.verify_dataset(toy, load_spec("TOY", toy), read_arrays=False)
    assert [expected in e for e in report.errors] == [True]
