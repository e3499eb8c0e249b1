"""Bad input through the real commands: each case is refused with a message that names the file or
key, a non-zero exit code, and no file written or changed (checksums of the whole tree before and
after). The checkpoint cases (malicious pickles, truncated snapshots, encoder weights) are in
tests/test_checkpoint_safety.py and the volume cases (truncated and NaN scans) in
tests/test_strict_reads.py; this file holds the run, config, output-name and report cases.
"""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.core.io import DataError, read_volume, safe_child_path, write_volume
from tests.conftest import PROJECT_ROOT
from tests.helpers import tree_state, write_dataset

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`

TINY = ["train.batch_episodes=1", "train.print_every=1", "train.checkpoint_every=1", "train.snapshot_every=2", "evaluation.n_overlays=0"]


def run(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, *script.split(), *args]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


def train(log_dir, data_dir, *updates) -> subprocess.CompletedProcess:
    return run("training.py", "-l", "WARNING", "with", "demo", f"data_dir={data_dir}", f"log_dir={log_dir}", *TINY,
               *updates)


def validate(log_dir, data_dir, *updates) -> subprocess.CompletedProcess:
    return run("validation.py", "-l", "WARNING", "with", "demo", f"data_dir={data_dir}", f"log_dir={log_dir}",
               "evaluation.n_overlays=0", "evaluation.save_predictions=False", *updates)


def refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The error text of a refused command, after checking it failed cleanly and says each fragment."""
    assert result.returncode != 0, result.stdout[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


@pytest.fixture(scope="module")
def finished_run(phantom_dir, tmp_path_factory):
    """A completed 2-episode ADNet run on the phantoms (resume point and snapshot at episode 2)."""
    log_dir = tmp_path_factory.mktemp("finished") / "runs"
    result = train(log_dir, phantom_dir, "train.n_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return next((log_dir / "train").glob("*/1"))


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run, in a log_dir of its own: (log_dir, run folder)."""
    log_dir = tmp_path / "runs"
    copy = log_dir / finished_run.relative_to(finished_run.parents[2])
    shutil.copytree(finished_run, copy)
    return log_dir, copy


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize("update, message", [
    ("eval_fold=1.5", "eval_fold must be a whole number"),
    ("seed=-1", "seed must be a whole number >= 0"),
    ("test_labels=[]", "test_labels must be a non-empty list"),
    ("evaluation.amp=fp16", "evaluation.amp must be one of"),
])
def test_bad_run_values_are_refused_before_anything_is_written(phantom_dir, tmp_path, update, message):
    before = tree_state(tmp_path)
    refused(train(tmp_path / "runs", phantom_dir, update), message)
    refused(validate(tmp_path / "runs", phantom_dir, update), message)
    assert tree_state(tmp_path) == before


def test_a_nan_in_a_config_file_is_refused_before_any_run_folder_exists(phantom_dir, tmp_path):
    """`head.scaler: .nan` passed the config check and trained to Dice 0; every number is checked for
    finiteness (and its range) before Sacred records anything."""
    own = tmp_path / "my.yaml"
    own.write_text("head:\n  scaler: .nan\n")
    before = tree_state(tmp_path)
    refused(train(tmp_path / "runs", phantom_dir, str(own)), "head.scaler must be a finite number, got nan")
    assert tree_state(tmp_path) == before and not (tmp_path / "runs").exists()


def test_an_exp_name_that_leaves_log_dir_is_refused(phantom_dir, tmp_path):
    log_dir = tmp_path / "logs" / "runs"
    before = tree_state(tmp_path)
    refused(train(log_dir, phantom_dir, "exp_name=../../x"), "exp_name must be a simple name", "'../../x'")
    assert tree_state(tmp_path) == before and not (tmp_path / "logs").exists()


def test_dataset_name_must_match_the_dataset_json(tmp_path):
    root = write_dataset(tmp_path / "toy")                          # its dataset.json says TOY
    before = tree_state(tmp_path)
    refused(run("training.py", "with", "adnet", "dataset=FOO", f"data_dir={root}", f"log_dir={tmp_path / 'runs'}"),
            "dataset=FOO", "describes the dataset 'TOY'", "set dataset=TOY")
    assert tree_state(tmp_path) == before


# ----------------------------------------------------------------------------- data files
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_voxel(path):
    array, geometry = read_volume(path)
    array = array.astype(np.float32)
    array[0, 0, 0] = np.nan
    write_volume(path, array, geometry)


def _narrower(path):
    array, geometry = read_volume(path)
    write_volume(path, array[:, :, :-4], geometry)


def _constant(path):
    array, geometry = read_volume(path)
    write_volume(path, np.full_like(array, 3), geometry)


# fold 0 of the six phantoms holds scans 1 and 2 (evaluated) and trains on 3-6
@pytest.mark.parametrize("command, file, corrupt, message", [
    ("train", "image_4.nii.gz", _truncate, "truncated"),
    ("test", "image_1.nii.gz", _truncate, "truncated"),
    ("test", "label_2.nii.gz", _nan_voxel, "1 NaN and 0 infinite value(s)"),
    ("train", "image_5.nii.gz", _narrower, "in-plane size"),
    ("test", "image_2.nii.gz", _constant, "constant"),
])
def test_a_scan_that_cannot_be_used_is_refused_before_anything_is_written(phantom_dir, tmp_path, command, file,
                                                                          corrupt, message):
    data_dir = tmp_path / "SYNTH"
    shutil.copytree(phantom_dir, data_dir)
    path = data_dir / "synth_normalized" / file
    corrupt(path)
    before = tree_state(tmp_path)
    if command == "train":
        result = train(tmp_path / "runs", data_dir, "train.n_steps=2")
    else:
        result = validate(tmp_path / "runs", data_dir, "evaluation.checkpoint=untrained")
    refused(result, str(path), message)
    assert tree_state(tmp_path) == before


def test_pseudolabels_that_cannot_be_read_are_refused_before_training(phantom_dir, tmp_path):
    data_dir = tmp_path / "SYNTH"
    shutil.copytree(phantom_dir, data_dir)
    path = next((data_dir).glob("supervoxels_*")) / "superpix-MIDDLE_3.nii.gz"
    _truncate(path)
    before = tree_state(tmp_path)
    refused(train(tmp_path / "runs", data_dir, "train.n_steps=2"), str(path), "truncated")
    assert tree_state(tmp_path) == before


# ----------------------------------------------------------------------------- resume
def test_resume_with_another_configuration_leaves_the_run_as_it_was(phantom_dir, run_copy):
    log_dir, run_dir = run_copy
    before = tree_state(log_dir)
    refused(train(log_dir, phantom_dir, "train.n_steps=2", "optim.lr=0.5", f"train.resume={run_dir}"),
            "cannot resume", "optim.lr: 0.001 -> 0.5", str(run_dir))
    assert tree_state(log_dir) == before
    assert json.loads((run_dir / "run.json").read_text())["status"] == "COMPLETED"


def test_resume_from_a_truncated_resume_point_names_the_file(phantom_dir, run_copy):
    log_dir, run_dir = run_copy
    last = run_dir / "snapshots" / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = tree_state(log_dir)
    refused(train(log_dir, phantom_dir, "train.n_steps=2", f"train.resume={run_dir}"), str(last), "truncated")
    assert tree_state(log_dir) == before


def test_resume_of_a_missing_folder_is_refused(phantom_dir, tmp_path):
    before = tree_state(tmp_path)
    refused(train(tmp_path / "runs", phantom_dir, f"train.resume={tmp_path / 'nope'}"),
            "train.resume", "does not exist")
    assert tree_state(tmp_path) == before


def test_a_second_resume_of_a_busy_folder_is_refused(phantom_dir, run_copy):
    from data.core.run_folder import RunFolder
    log_dir, run_dir = run_copy
    RunFolder(run_dir).lock()               # this process trains into it
    try:
        before = tree_state(log_dir)
        refused(train(log_dir, phantom_dir, "train.n_steps=2", f"train.resume={run_dir}"),
                "being trained by another process", str(run_dir))
        assert tree_state(log_dir) == before
    finally:
        RunFolder(run_dir).unlock()


def test_resume_restores_the_metrics_of_its_resume_point_and_removes_stale_partials(phantom_dir, run_copy):
    log_dir, run_dir = run_copy
    metrics_path = run_dir / "metrics.json"
    complete = json.loads(metrics_path.read_text())
    assert complete["loss.total"]["steps"] == [1, 2]
    lost = {k: {f: v[f][:1] for f in ("steps", "values", "timestamps")} for k, v in complete.items()}
    metrics_path.write_text(json.dumps(lost))                        # killed before Sacred's heartbeat
    stale = run_dir / "snapshots" / ".last.abc123.partial.pth"
    stale.write_bytes(b"half a snapshot")
    result = train(log_dir, phantom_dir, "train.n_steps=2", f"train.resume={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    restored = json.loads(metrics_path.read_text())
    assert restored["loss.total"]["steps"] == [1, 2]
    assert restored["loss.total"]["values"] == complete["loss.total"]["values"]
    assert not stale.exists()


# ----------------------------------------------------------------------------- divergence
def test_a_diverging_run_stops_and_keeps_only_finite_snapshots(phantom_dir, tmp_path):
    log_dir = tmp_path / "runs"
    result = train(log_dir, phantom_dir, "train.n_steps=6", "train.snapshot_every=1", "optim.lr=1e12",
                   "train.batch_episodes=1")
    refused(result, "training diverged", "NaN or infinite", "optim.lr")
    run_dir = next((log_dir / "train").glob("*/1"))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "FAILED"
    snapshots = sorted((run_dir / "snapshots").glob("*.pth"))
    for path in snapshots:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path
    last = torch.load(run_dir / "snapshots" / "last.pth", weights_only=True) if (run_dir / "snapshots" / "last.pth").exists() else None
    assert last is None or last["episodes"] < 6

    # the failed run is never evaluated by default
    before = tree_state(tmp_path)
    refused(validate(log_dir, phantom_dir), "no finished training run", str(run_dir), "FAILED")
    assert tree_state(tmp_path) == before


def test_the_default_checkpoint_is_never_from_a_killed_run(phantom_dir, run_copy):
    log_dir, run_dir = run_copy
    run_json = run_dir / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "status": "RUNNING"}))   # as kill -9 leaves it
    before = tree_state(log_dir)
    err = refused(validate(log_dir, phantom_dir), "no finished training run", "RUNNING",
                  f"evaluation.checkpoint={run_dir / 'snapshots' / '2.pth'}")
    assert "train.resume=" in err
    assert tree_state(log_dir) == before


# ----------------------------------------------------------------------------- full disk
def test_a_full_disk_while_writing_a_snapshot_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """The advice names what is on disk: the resume point to continue from, or, when the very first
    resume point could not be written, that there is nothing to resume."""
    from data.core.run_folder import RunFolder
    from models.engine import trainer
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = RunFolder(tmp_path / "run")
    real_save = torch.save

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(trainer.SnapshotWriteError) as first:
        trainer.save_snapshot(run.resume_file, model, optimizer, 1, {"seed": 1}, run=run)
    assert f"Nothing was written to {run.resume_file}" in str(first.value)
    assert "start the training again" in str(first.value) and "train.resume=" not in str(first.value)
    assert not run.resume_file.exists()

    monkeypatch.setattr(torch, "save", real_save)
    trainer.save_snapshot(run.resume_file, model, optimizer, 1, {"seed": 1}, run=run)
    before = tree_state(tmp_path)
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(trainer.SnapshotWriteError, match=r"no space left on the device.*last\.pth") as later:
        trainer.save_snapshot(run.snapshot_file(2), model, optimizer, 2, {"seed": 1}, run=run)
    assert f"continue from its resume point {run.resume_file} with train.resume={run.path}" in str(later.value)
    assert run.resume_file.is_file() and tree_state(tmp_path) == before


# ----------------------------------------------------------------------------- names and reports
def test_a_label_name_that_would_leave_the_output_folder_is_refused_at_load(tmp_path):
    root = write_dataset(tmp_path / "toy")
    description = json.loads((root / "dataset.json").read_text())
    description["labels"] = {"BG": 0, "../../escaped": 1, "C2": 2}
    (root / "dataset.json").write_text(json.dumps(description))
    before = tree_state(tmp_path)
    refused(run("validation.py", "with", "adnet", "dataset=TOY", f"data_dir={root}", f"log_dir={tmp_path / 'runs'}",
                "evaluation.checkpoint=untrained", "encoder.weights=none"),
            "label name '../../escaped'", "cannot be used in file names", str(root / "dataset.json"))
    assert tree_state(tmp_path) == before


@pytest.mark.parametrize("name", ["../x.nii.gz", "/tmp/x.nii.gz", "..", "a/../../b.png", ""])
def test_output_names_stay_inside_their_folder(tmp_path, name):
    with pytest.raises(DataError, match="would leave its folder"):
        safe_child_path(tmp_path / "out", name)
    assert safe_child_path(tmp_path / "out", "scan_1_LIVER.nii.gz") == tmp_path / "out" / "scan_1_LIVER.nii.gz"


def test_collect_results_names_a_truncated_results_file(tmp_path, capsys):
    from scripts import collect_results
    from tests.test_workflow import fake_run
    folder = fake_run(tmp_path / "runs", fold=0)
    fake_run(tmp_path / "runs", fold=1)
    text = (folder / "results.json").read_text()
    (folder / "results.json").write_text(text[: len(text) // 2])
    before = tree_state(tmp_path)
    assert collect_results.main([str(tmp_path / "runs"), "--out", str(tmp_path / "table")]) != 0
    err = capsys.readouterr().err
    assert str(folder / "results.json") in err and "truncated or not valid JSON" in err
    assert tree_state(tmp_path) == before


# ----------------------------------------------------------------------------- unwritable folders, full disk
def _fail_writes_under(monkeypatch, folder, code, only=""):
    """Every folder creation and file write below `folder` (whose name contains `only`) fails with
    OSError `code`, as a read-only mount (EROFS), a folder without write permission (EACCES) or a full
    disk (ENOSPC) makes them fail, and the folder looks so to the checks made before writing
    (statvfs's read-only flag, os.access, the free space). The suite may run as root, which ignores
    permission bits, so the failure is injected where the project and Sacred create folders and write
    files."""
    import builtins
    import os
    import shutil
    from collections import namedtuple
    folder = str(folder)
    real_open, real_mkdir, real_makedirs = builtins.open, os.mkdir, os.makedirs
    real_statvfs, real_access, real_usage = os.statvfs, os.access, shutil.disk_usage

    def below(path) -> bool:
        path = os.path.abspath(os.fspath(path))
        return path.startswith(folder) and only in os.path.basename(path)

    if not only:
        def statvfs(path):
            flags = real_statvfs(path)
            if below(path) and code == errno.EROFS:
                return namedtuple("statvfs", ["f_flag"])(flags.f_flag | os.ST_RDONLY)
            return flags

        def access(path, mode, *args, **kwargs):
            return False if below(path) and code == errno.EACCES else real_access(path, mode, *args, **kwargs)

        def disk_usage(path):
            usage = real_usage(path)
            return usage._replace(free=0) if below(path) and code == errno.ENOSPC else usage

        monkeypatch.setattr(os, "statvfs", statvfs)
        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(shutil, "disk_usage", disk_usage)

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+") and below(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if below(path) and not os.path.isdir(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    def makedirs(path, *args, **kwargs):
        if below(path) and not os.path.isdir(path):
            fail(path)
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "makedirs", makedirs)


def _validation_in_process(log_dir, data_dir):
    """validation.py's experiment run in this process (Sacred's own run path, with the project's error
    handling), as `python validation.py with demo ...` runs it."""
    import importlib
    validation = importlib.import_module("validation")
    return validation.ex.run(named_configs=["demo"], config_updates={
        "data_dir": str(data_dir), "log_dir": str(log_dir), "evaluation": {
            "checkpoint": "untrained", "n_overlays": 0, "save_predictions": False}})


@pytest.mark.parametrize("code, says", [(errno.EROFS, "the file system is read-only"),
                                        (errno.EACCES, "permission denied"),
                                        (errno.ENOSPC, "no space left on the device")])
def test_an_unwritable_log_folder_or_a_full_disk_is_one_error_paragraph(phantom_dir, tmp_path, monkeypatch,
                                                                        code, says):
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    before = tree_state(tmp_path)
    _fail_writes_under(monkeypatch, log_dir, code)
    with pytest.raises(SystemExit) as exit_:
        _validation_in_process(log_dir, phantom_dir)
    message = str(exit_.value.code)
    assert message.startswith("error: cannot write ") and says in message and str(log_dir) in message
    assert "\n" not in message and "Traceback" not in message
    assert tree_state(tmp_path) == before


def test_a_disk_that_fills_during_an_evaluation_is_one_error_paragraph(phantom_dir, tmp_path, monkeypatch,
                                                                      capfd):
    """The run has started (its folder exists) when the results cannot be written: the same error
    paragraph, Sacred records the run as failed as far as it can, no traceback."""
    log_dir = tmp_path / "runs"
    _fail_writes_under(monkeypatch, log_dir, errno.ENOSPC, only="results")
    with pytest.raises(SystemExit) as exit_:
        _validation_in_process(log_dir, phantom_dir)
    message = str(exit_.value.code)
    assert message.startswith("error: cannot write ") and "no space left on the device" in message
    assert "results" in message and "Traceback" not in capfd.readouterr().err
    assert not list(log_dir.rglob("results*"))


def test_a_full_disk_while_a_script_writes_is_one_error_paragraph(tmp_path, monkeypatch, capsys):
    """The scripts (data.core.cli.run_cli) say the same as the experiments: here collect_results writing
    its tables onto a full disk."""
    from scripts import collect_results
    from tests.test_workflow import fake_run
    log_dir = tmp_path / "runs"
    fake_run(log_dir)
    out = tmp_path / "tables"
    _fail_writes_under(monkeypatch, out, errno.ENOSPC)
    assert collect_results.main([str(log_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and "no space left" in err and "Traceback" not in err
    assert not out.exists()
