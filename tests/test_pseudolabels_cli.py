"""Tests of the pseudolabel command (data/pseudolabels.py) on a tiny dataset folder written here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from data.core.io import DataError, Geometry, read_volume, write_volume
from data.pseudolabels import generate_pseudolabels, header_spacing_zyx, main, pixdim_spacing_zyx
from data.supervoxels import foreground_mask, rescale_0_255

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GEOMETRY = Geometry(spacing=(0.8, 0.8, 7.7), origin=(12.5, -20.0, 4.0),
                    direction=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def tiny_image(seed: int) -> np.ndarray:
    """(5, 24, 28) volume: dark background, a textured body; integer-valued like CHAOS."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:5, :24, :28]
    body = ((yy - 12) ** 2 / 90 + (xx - 14) ** 2 / 140) < 1
    organ = ((yy - 10) ** 2 / 12 + (xx - 12 - zz) ** 2 / 20) < 1
    return np.where(body, 200 + 150 * organ + rng.integers(0, 40, body.shape), 0).astype(np.float64)


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "TINY"
    (root / "imgs").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "name": "TINY", "modality": "MR", "image_dir": "imgs", "labels": {"BG": 0, "ORGAN": 1},
        "defaults": {"n_sv": 50, "superpixel_threshold": 0.0}}))
    for scan_id in (1, 3):  # no label files: pseudolabels need images only
        write_volume(root / "imgs" / f"image_{scan_id}.nii.gz", tiny_image(scan_id), GEOMETRY)
    return root


def partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".partial" in p.name]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_supervoxels_written_with_the_image_geometry(dataset, capsys):
    rc, out, _ = run(capsys, dataset, "--dataset", "TINY")
    assert rc == 0
    assert "2 written, 0 skipped" in out
    for scan_id in (1, 3):
        path = dataset / "supervoxels_50" / f"superpix-MIDDLE_{scan_id}.nii.gz"
        labels, geometry = read_volume(path)
        image, image_geometry = read_volume(dataset / "imgs" / f"image_{scan_id}.nii.gz")
        assert labels.dtype == np.int32 and labels.shape == image.shape
        assert geometry.matches(image_geometry)
        np.testing.assert_array_equal(labels != 0, foreground_mask(rescale_0_255(image)))
        assert np.bincount(labels[labels > 0]).max() >= 50
    assert partial_files(dataset) == []


def test_second_run_skips_and_overwrite_rewrites(dataset, capsys):
    assert run(capsys, dataset, "--dataset", "TINY")[0] == 0
    path = dataset / "supervoxels_50" / "superpix-MIDDLE_1.nii.gz"
    before = path.stat().st_mtime_ns
    content = read_volume(path)[0]
    rc, out, _ = run(capsys, dataset, "--dataset", "TINY")
    assert rc == 0 and "0 written, 2 skipped" in out
    assert path.stat().st_mtime_ns == before
    os.utime(path, ns=(before - 10 ** 9, before - 10 ** 9))
    rc, out, _ = run(capsys, dataset, "--dataset", "TINY", "--overwrite")
    assert rc == 0 and "2 written, 0 skipped" in out
    assert path.stat().st_mtime_ns != before - 10 ** 9
    np.testing.assert_array_equal(read_volume(path)[0], content)  # deterministic


def test_superpixels_kind_min_size_ids_and_reference_ids(dataset, capsys):
    rc, out, _ = run(capsys, dataset, "--dataset", "TINY", "--kind", "superpixels", "--min-size", "20",
                     "--ids", "3", "--reference-ids")
    assert rc == 0 and "1 written" in out
    folder = dataset / "superpixels_20"
    assert sorted(p.name for p in folder.iterdir()) == ["superpix-MIDDLE_3.nii.gz"]
    labels, geometry = read_volume(folder / "superpix-MIDDLE_3.nii.gz")
    assert labels.dtype == np.int32 and geometry.matches(GEOMETRY)
    assert labels.max() > 1


def test_python_function_returns_written_paths_and_runs_workers(dataset):
    written = generate_pseudolabels(dataset, "TINY", min_size=30, progress=False, summary=False)
    assert written == [dataset / "supervoxels_30" / f"superpix-MIDDLE_{i}.nii.gz" for i in (1, 3)]
    serial = [read_volume(p)[0] for p in written]
    again = generate_pseudolabels(dataset, "TINY", min_size=30, overwrite=True, workers=2,
                                  progress=False, summary=False)
    assert again == written
    for path, expected in zip(again, serial):
        np.testing.assert_array_equal(read_volume(path)[0], expected)
    assert generate_pseudolabels(dataset, "TINY", min_size=30, progress=False, summary=False) == []


def test_pixdim_spacing_is_the_reference_string_and_header_the_float(dataset):
    path = dataset / "imgs" / "image_1.nii.gz"
    _, geometry = read_volume(path)
    assert pixdim_spacing_zyx(path, geometry) == (7.7, 0.8, 0.8)
    header = header_spacing_zyx(geometry, path)
    assert header == (float(np.float32(7.7)), float(np.float32(0.8)), float(np.float32(0.8)))
    assert header[0] != 7.7


def test_unusable_spacing_is_a_data_error(tmp_path):
    # ITK turns a zero pixdim into 1 when reading, so this guards geometry built in code.
    with pytest.raises(DataError, match="no usable voxel spacing"):
        header_spacing_zyx(Geometry(spacing=(1.0, 1.0, 0.0)), tmp_path / "image_1.nii.gz")


def test_header_spacing_option_keeps_the_foreground(dataset, capsys):
    assert run(capsys, dataset, "--dataset", "TINY", "--ids", "1")[0] == 0
    pixdim = read_volume(dataset / "supervoxels_50" / "superpix-MIDDLE_1.nii.gz")[0]
    rc = run(capsys, dataset, "--dataset", "TINY", "--ids", "1", "--overwrite", "--spacing", "header")[0]
    assert rc == 0
    header = read_volume(dataset / "supervoxels_50" / "superpix-MIDDLE_1.nii.gz")[0]
    np.testing.assert_array_equal(pixdim != 0, header != 0)


# ------------------------------------------------------------------------------------ errors
def test_missing_folder(tmp_path, capsys):
    rc, _, err = run(capsys, tmp_path / "nowhere", "--dataset", "CHAOST2")
    assert rc == 1 and "data directory not found" in err and "nowhere" in err


def test_unknown_dataset(tmp_path, capsys):
    rc, _, err = run(capsys, tmp_path, "--dataset", "CHAOS3")
    assert rc == 1 and "unknown dataset 'CHAOS3'" in err


def test_unknown_scan_id(dataset, capsys):
    rc, _, err = run(capsys, dataset, "--dataset", "TINY", "--ids", "2")
    assert rc == 1 and "scan id(s) [2] not found" in err


def test_reference_ids_rejected_for_supervoxels(dataset, capsys):
    rc, _, err = run(capsys, dataset, "--dataset", "TINY", "--reference-ids")
    assert rc == 1 and "superpixels only" in err


def test_2d_image_fails_before_any_work(dataset, capsys):
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((24, 28))), str(dataset / "imgs" / "image_5.nii.gz"))
    rc, _, err = run(capsys, dataset, "--dataset", "TINY")
    assert rc == 1 and "image_5.nii.gz" in err and "2-D" in err
    assert not (dataset / "supervoxels_50").exists()
    assert partial_files(dataset) == []


def test_all_background_volume_names_the_scan_and_leaves_no_partial_file(dataset, capsys):
    write_volume(dataset / "imgs" / "image_7.nii.gz", np.full((5, 24, 28), 3.0), GEOMETRY)
    rc, _, err = run(capsys, dataset, "--dataset", "TINY")
    assert rc == 1 and "scan 7" in err and "no foreground" in err
    folder = dataset / "supervoxels_50"
    assert sorted(p.name for p in folder.iterdir()) == [f"superpix-MIDDLE_{i}.nii.gz" for i in (1, 3)]
    assert read_volume(folder / "superpix-MIDDLE_3.nii.gz")[0].any()   # finished files are complete
    assert partial_files(dataset) == []
    with pytest.raises(DataError, match="scan 7"):                     # same in worker processes
        generate_pseudolabels(dataset, "TINY", overwrite=True, workers=2, progress=False, summary=False)
    assert partial_files(dataset) == []


def test_runs_as_a_module(dataset):
    result = subprocess.run([sys.executable, "-m", "data.pseudolabels", str(dataset), "--dataset", "TINY",
                             "--kind", "superpixels"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "TINY superpixels (min size 400): 2 written, 0 skipped" in result.stdout
    assert (dataset / "superpixels_400" / "superpix-MIDDLE_1.nii.gz").is_file()
