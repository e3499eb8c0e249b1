"""Dataset integrity check (data/verify.py): passes on the real data, and names each corruption."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data import verify as vf
from data.classmap import build_classmaps, write_classmaps
from data.core.io import Geometry, write_volume
from data.core.specs import PROJECT_ROOT, load_spec
from tests.helpers import write_dataset

GEOMETRY = Geometry((1.25, 1.25, 7.7), (-150.0, 170.0, -80.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))


@pytest.mark.parametrize("name, fixture", [("CHAOST2", "chaos_dir"), ("CMR", "cmr_dir")])
def test_real_datasets_pass(name, fixture, request):
    data_dir = request.getfixturevalue(fixture)
    report = vf.verify_dataset(data_dir, load_spec(name))
    assert report.ok, report.format()
    assert report.warnings == []
    assert len(report.checked_ids) == len(load_spec(name).expected_ids)


def test_real_dataset_command(chaos_dir, capsys):
    assert vf.main([str(chaos_dir), "--dataset", "CHAOST2", "--headers-only"]) == 0
    assert "20 scan(s) checked, 0 error(s), 0 warning(s): OK" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ synthetic
@pytest.fixture
def spec():
    return dataclasses.replace(load_spec("CHAOST2"), expected_ids=(1, 2, 3))


@pytest.fixture
def dataset(tmp_path, spec) -> Path:
    """Three small, valid CHAOS-like scans with their classmap_1.json."""
    rng = np.random.default_rng(0)
    for scan_id in (1, 2, 3):
        image = rng.random((6, 256, 256)) * 800
        label = np.zeros((6, 256, 256))
        for class_id in (1, 2, 3, 4):
            label[1:5, 40 * class_id:40 * class_id + 20, 100:140] = class_id
        write_volume(spec.image_path(tmp_path, scan_id), image, GEOMETRY)
        write_volume(spec.label_path(tmp_path, scan_id), label, GEOMETRY)
    write_classmaps(tmp_path, spec, build_classmaps(tmp_path, spec, [1]))
    return tmp_path


def _label(data_dir, spec, scan_id=2):
    return spec.label_path(data_dir, scan_id)


def test_clean_synthetic_dataset_passes(dataset, spec):
    report = vf.verify_dataset(dataset, spec)
    assert report.ok and report.warnings == [], report.format()
    assert report.checked_ids == (1, 2, 3)


def _corrupt(data_dir: Path, spec, problem: str) -> str:
    """Apply one corruption; returns the message expected in the report."""
    folder = spec.image_folder(data_dir)
    image2, label2 = spec.image_path(data_dir, 2), spec.label_path(data_dir, 2)
    if problem == "missing label":
        label2.unlink()
        return f"{image2}: has no label; expected {label2}"
    if problem == "missing image":
        image2.unlink()
        return f"{label2}: has no image; expected {image2}"
    if problem == "shape mismatch":
        write_volume(label2, np.zeros((5, 256, 256)), GEOMETRY)
        return f"{label2}: shape (z, y, x) (5, 256, 256) differs from its image's (6, 256, 256) (image_2.nii.gz)"
    if problem == "wrong label values":
        label = np.zeros((6, 256, 256))
        label[2, :10, :10] = 7
        label[3, :10, :10] = 200
        write_volume(label2, label, GEOMETRY)
        return f"{label2}: label values [7, 200] are not CHAOST2 values [0, 1, 2, 3, 4]"
    if problem == "fractional labels":
        label = np.zeros((6, 256, 256))
        label[2, :10, :10] = 0.5
        write_volume(label2, label, GEOMETRY)
        return f"{label2}: non-integer label values [0.5]"
    if problem == "NaN":
        image = np.ones((6, 256, 256))
        image[0, 0, 0] = np.nan
        image[0, 0, 1] = np.inf
        write_volume(image2, image, GEOMETRY)
        return f"{image2}: 1 NaN and 1 infinite value(s)"
    if problem == "constant image":
        write_volume(image2, np.full((6, 256, 256), 3.0), GEOMETRY)
        return f"{image2}: constant image (every voxel 3)"
    if problem == "geometry mismatch":
        write_volume(label2, np.zeros((6, 256, 256)),
                     dataclasses.replace(GEOMETRY, origin=(-150.0, 170.0, -70.0)))
        return f"{label2}: geometry spacing (1.25, 1.25, 7.7) mm, origin (-150, 170, -70)"
    if problem == "in-plane size":
        write_volume(image2, np.ones((6, 200, 256)), GEOMETRY)
        write_volume(label2, np.zeros((6, 200, 256)), GEOMETRY)
        return f"{image2}: in-plane size 200x256, expected 256x256"
    if problem == "too few slices":
        write_volume(image2, np.ones((2, 256, 256)), GEOMETRY)
        write_volume(label2, np.zeros((2, 256, 256)), GEOMETRY)
        return f"{image2}: 2 slices; a scan needs 3 to 1000"
    if problem == "unreadable":
        image2.write_bytes(b"not a nifti file")
        return f"cannot read the header of CHAOST2 image {image2}"
    if problem == "uncompressed":
        image2.rename(folder / "image_2.nii")
        return f"{folder / 'image_2.nii'}: stored as .nii"
    if problem == "extra id":
        write_volume(spec.image_path(data_dir, 9), np.ones((6, 256, 256)), GEOMETRY)
        write_volume(spec.label_path(data_dir, 9), np.zeros((6, 256, 256)), GEOMETRY)
        return f"{spec.image_path(data_dir, 9)}: id 9 is not one of the CHAOST2 ids [1, 2, 3]"
    if problem == "missing id":
        image2.unlink()
        label2.unlink()
        return f"{folder}: scan 2 is missing"
    if problem == "stale classmap":
        classmap = json.loads((folder / "classmap_1.json").read_text())
        del classmap["LIVER"]["3"]
        (folder / "classmap_1.json").write_text(json.dumps(classmap))
        return f"{folder / 'classmap_1.json'}: class LIVER lacks scan(s) [3]; the index is stale"
    if problem == "classmap of another dataset":
        classmap = json.loads((folder / "classmap_1.json").read_text())
        classmap["LIVER"]["7"] = [1]
        (folder / "classmap_1.json").write_text(json.dumps(classmap))
        return f"{folder / 'classmap_1.json'}: class LIVER lists scan(s) ['7'] that do not exist"
    raise AssertionError(problem)


@pytest.mark.parametrize("problem", ["missing label", "missing image", "shape mismatch", "wrong label values",
                                     "fractional labels", "NaN", "constant image", "geometry mismatch",
                                     "in-plane size", "too few slices", "unreadable", "uncompressed",
                                     "extra id", "missing id", "stale classmap",
                                     "classmap of another dataset"])
def test_each_corruption_is_reported_precisely(dataset, spec, problem):
    expected = _corrupt(dataset, spec, problem)
    report = vf.verify_dataset(dataset, spec)
    assert not report.ok
    assert any(expected in e for e in report.errors), "\n".join(report.errors)
    assert len(report.errors) == 1, report.format()          # one problem, one message


@pytest.mark.parametrize("problem", ["missing label", "wrong label values", "NaN"])
def test_command_prints_the_problem_and_exits_1(dataset, spec, problem, monkeypatch, capsys):
    expected = _corrupt(dataset, spec, problem)
    monkeypatch.setattr(vf, "load_spec", lambda name, data_dir=None: spec)      # the name main() calls
    assert vf.main([str(dataset), "--dataset", "CHAOST2"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("ERROR: ") and expected in line for line in out)
    assert out[-1].endswith(", 1 error(s), 0 warning(s): FAILED")


def test_warnings_do_not_fail(dataset, spec):
    folder = spec.image_folder(dataset)
    label = np.zeros((6, 256, 256))
    label[2, :10, :10] = 1
    write_volume(spec.label_path(dataset, 3), label, GEOMETRY)
    (folder / ".image_3.abc.partial.nii.gz").write_bytes(b"")
    (folder / "classmap_1.json").unlink()
    report = vf.verify_dataset(dataset, spec)
    assert report.ok, report.format()
    assert any(f"{spec.label_path(dataset, 3)}: evaluated class(es) RK, LK, SPLEEN absent" in w
               for w in report.warnings)
    assert any("leftover temporary file" in w for w in report.warnings)
    assert any("no classmap_1.json" in w for w in report.warnings)


def test_ids_restrict_the_check(dataset, spec):
    spec_all = load_spec("CHAOST2")                          # expects the 20 CHAOS ids
    report = vf.verify_dataset(dataset, spec_all)
    assert sum("is missing" in e for e in report.errors) == 17
    assert vf.verify_dataset(dataset, spec_all, ids=[1, 3]).ok


def test_missing_folders(tmp_path, spec):
    report = vf.verify_dataset(tmp_path / "nowhere", spec)
    assert report.errors == [f"{tmp_path / 'nowhere'}: dataset folder not found"]
    report = vf.verify_dataset(tmp_path, spec)
    assert report.errors[0].startswith(f"{tmp_path / 'chaos_MR_T2_normalized'}: image folder not found")


# ------------------------------------------------------------------------------- the description itself
MISLEADING = {
    "label id above 255": ("labels", {"labels": {"BG": 0, "C1": 257, "C2": 2}}, "the id of 'C1' is 257"),
    "scan twice in folds": ("folds", {"folds": [[1, 2, 2], [3, 4]]}, "fold 0 lists scan 2 twice"),
    "image_dir elsewhere": ("image_dir", {"image_dir": "../OTHER/images"}, "leaves the dataset folder"),
}


def _mislead(root: Path, changes: dict) -> Path:
    description = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**description, **changes}))
    return root / "dataset.json"


@pytest.mark.parametrize("case", MISLEADING)
def test_command_refuses_a_misleading_description(tmp_path, case, capsys):
    field, changes, problem = MISLEADING[case]
    root = write_dataset(tmp_path / "toy", ids=(1, 2, 3, 4), with_supervoxels=False)
    path = _mislead(root, changes)
    assert vf.main([str(root), "--dataset", "TOY"]) == 1
    captured = capsys.readouterr()
    assert f"error: {path}: {field}: " in captured.err and problem in captured.err, captured.err
    assert "OK" not in captured.out


def test_training_refuses_a_scan_twice_in_folds_before_any_run_folder(tmp_path):
    root = write_dataset(tmp_path / "toy", ids=(1, 2, 3, 4), with_supervoxels=False)
    path = _mislead(root, {"folds": [[1, 2, 2], [3, 4]]})
    result = subprocess.run([sys.executable, "training.py", "-l", "WARNING", "with", "adnet", "dataset=TOY",
                             f"data_dir={root}", f"log_dir={tmp_path / 'runs'}"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{path}: folds: fold 0 lists scan 2 twice" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
