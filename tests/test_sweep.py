"""scripts.sweep: a table of cells trained and evaluated through submitit's LocalExecutor, re-runs that
do only what is left (a killed job's training resumes, bit-identical to the same training typed by
hand), the full paper plan, bad input.

The cells are as small as a real run gets: random encoder weights, 2 training episodes (a resume point
after each), one test class (LIVER) on the six 12 x 64 x 64 phantoms, no overlays or predictions.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from launch.runners import CellFailed, run_local
from scripts import sweep
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`

UPDATES = ["encoder.weights=none", "train.n_steps=2", "train.snapshot_every=2", "train.checkpoint_every=1",
           "train.print_every=1", "evaluation.n_overlays=0", "evaluation.save_predictions=False", "device=cpu"]
ADNET_FOLD0 = "adnet_SYNTH_setting1_labels1_fold0"


def _argv(log_dir, data_dir, methods, folds):
    return ["--methods", *methods, "--datasets", "SYNTH", "--folds", *map(str, folds), "--label-groups", "1",
            "--data-dir", str(data_dir), "--log-dir", str(log_dir), "--executor", "submitit-local", *UPDATES]


@pytest.fixture(scope="module")
def phantoms(phantom_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data") / "SYNTH"
    shutil.copytree(phantom_dir, root)
    return root


def _resume_point_written(run_dir) -> bool:
    return (run_dir / "snapshots" / "last.pth").is_file() and not (run_dir / "snapshots" / "2.pth").exists()


def _run_killing_the_first_job(argv, run_dir, cell_log) -> int:
    """Run the sweep; SIGKILL the first cell's job process once its training wrote its first resume
    point (as a pre-emption would). Returns the sweep's exit status."""
    first: dict = {}
    thread = threading.Thread(target=lambda: first.setdefault("status", sweep.main(argv)), daemon=True)
    thread.start()
    deadline, killed = time.time() + 600, False
    while time.time() < deadline and thread.is_alive() and not killed:
        if _resume_point_written(run_dir):
            os.kill(int(re.search(r"job process (\d+)", cell_log.read_text()).group(1)), signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    thread.join(900)
    assert killed, "the training ended before it could be killed"
    return first["status"]


def test_a_sweep_resumes_a_killed_job_collects_the_table_and_then_has_nothing_to_do(phantoms, tmp_path, capsys,
                                                                                   monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))     # the sweep exports the project to its jobs
    log_dir = tmp_path / "runs"
    argv = _argv(log_dir, phantoms, ["adnet", "qnet"], [0])
    run_dir, cell_log = log_dir / "train" / ADNET_FOLD0 / "1", log_dir / "sweep" / "logs" / f"{ADNET_FOLD0}.log"

    # adnet runs first: its job is killed while it trains; the sweep goes on (qnet), then reports it
    assert _run_killing_the_first_job(argv, run_dir, cell_log) == 1
    err = capsys.readouterr().err                 # failures go through the logging channel
    assert "error: failed: adnet SYNTH setting 1 labels 1 fold 0" in err and str(cell_log) in err
    assert torch.load(run_dir / "snapshots" / "last.pth", weights_only=True)["episodes"] == 1
    assert not (run_dir / "snapshots" / "2.pth").exists()

    # re-run: the killed training continues in its run folder, the other cell is done
    assert sweep.main(argv) == 0
    out, err = capsys.readouterr()
    assert f"{ADNET_FOLD0}  to resume" in out and "2 cells: 1 done, 1 to resume" in out
    assert err.count("missing adnet folds [1, 2, 3, 4]; qnet folds [1, 2, 3, 4]") == 1      # once per table
    assert f"train.resume={run_dir}" in cell_log.read_text()
    table = (log_dir / "tables" / "SYNTH_setting1" / "table.md").read_text()
    assert "| Method | LIVER | Mean |" in table
    assert re.search(r"\| adnet \| \d+\.\d\d \(1/5\) \| \d+\.\d\d\* \|", table), table
    assert re.search(r"\| qnet \| \d+\.\d\d \(1/5\) \| \d+\.\d\d\* \|", table), table
    folds = (log_dir / "tables" / "SYNTH_setting1" / "folds.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] + line.split(",")[2] for line in folds) == ["adnet0", "qnet0"]

    # and again: nothing left to do, the same table (with a column for the papers' numbers: none for SYNTH)
    assert sweep.main([*argv, "--published"]) == 0
    out = capsys.readouterr().out
    assert "2 cells: 2 done" in out and "running" not in out and "| adnet |" in out
    assert "| LIVER | LIVER pub. | Mean | Mean pub. | Published |" in out and "none found" in out
    for kind in ("train", "test"):
        assert [p.name for p in (log_dir / kind / ADNET_FOLD0).iterdir() if p.is_dir()] == ["1"]

    # the resumed weights are those of the cell's training typed by hand, uninterrupted
    typed = [sys.executable, "training.py", "with", "adnet", "dataset=SYNTH", f"data_dir={phantoms}", "setting=1",
             "eval_fold=0", "test_labels=[1]", f"log_dir={tmp_path / 'typed'}", *UPDATES]
    done = subprocess.run(typed, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    straight = torch.load(tmp_path / "typed" / "train" / ADNET_FOLD0 / "1" / "snapshots" / "2.pth", weights_only=True)
    resumed = torch.load(run_dir / "snapshots" / "2.pth", weights_only=True)
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][key]), f"{key} differs after the resumed sweep"
    steps = json.loads((run_dir / "metrics.json").read_text())["loss.total"]["steps"]
    assert steps == [1, 2]            # the metrics of the resume point, then those after it, once each

    # a changed configuration: the finished cells are stale (trained again into new runs), not done; a dry
    # run writes nothing (no lock file either)
    before = sorted(str(p) for p in log_dir.rglob("*"))
    assert sweep.main([*_argv(log_dir, phantoms, ["adnet"], [0]), "train.n_steps=3", "--dry-run"]) == 0
    assert sorted(str(p) for p in log_dir.rglob("*")) == before
    out = capsys.readouterr().out
    assert f"{ADNET_FOLD0}  stale" in out and "1 cells: 1 stale" in out and "done" not in out
    for snapshots in tmp_path.glob("*/train/*/*/snapshots"):     # 0.35 GB each: not kept by pytest's tmp dirs
        shutil.rmtree(snapshots)


def test_dry_run_plans_the_full_paper_table(tmp_path, capsys):
    argv = ["--methods", "adnet", "qnet", "alpnet", "dspnet", "--datasets", "CHAOST2", "SABS", "CMR",
            "--settings", "1", "2", "--log-dir", str(tmp_path / "runs"), "--dry-run", "train.n_steps=1000"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    planned = re.findall(r"^.*?\s([\w-]+_fold\d)\s+to train$", out, flags=re.M)
    groups = {"CHAOST2": {1: ["1-2-3-4"], 2: ["2-3", "1-4"]}, "SABS": {1: ["1-2-3-6"], 2: ["2-3", "1-6"]},
              "CMR": {1: ["1-2-3"], 2: ["1-2-3"]}}
    expected = [f"{m}_{d}_setting{s}_labels{g}_fold{k}" for m in ("adnet", "qnet", "alpnet", "dspnet")
                for d, by_setting in groups.items() for s, gs in by_setting.items() for g in gs for k in range(5)]
    assert len(expected) == 160 and sorted(planned) == sorted(expected)
    assert "160 cells: 160 to train" in out
    assert "dataset=CHAOST2 data_dir=./data/CHAOST2 setting=1 eval_fold=0 test_labels=[1,2,3,4]" in out
    assert not (tmp_path / "runs").exists()                                   # nothing ran, nothing written


def test_a_dry_run_works_on_a_read_only_log_folder_and_a_real_run_is_refused(tmp_path, capsys, monkeypatch):
    """--dry-run only reads, so it plans on a read-only (or full) log folder; the sweep itself says before
    the first cell that it cannot write there. Nothing is written either way."""
    from tests.test_bad_inputs import _fail_writes_under
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    _fail_writes_under(monkeypatch, log_dir, errno.EROFS)
    argv = ["--methods", "adnet", "--datasets", "SYNTH", "--folds", "0", "--log-dir", str(log_dir),
            "train.n_steps=2", "encoder.weights=none"]
    assert sweep.main([*argv, "--dry-run"]) == 0
    assert "1 cells: 1 to train" in capsys.readouterr().out
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the sweep cannot start") and f"cannot write the sweep's log folder (--log-dir) " \
        f"{log_dir}: the file system is read-only" in err
    assert list(log_dir.iterdir()) == []


def test_dry_run_plans_k_shot_and_cross_domain_evaluations_of_one_training(tmp_path, capsys):
    argv = ["--methods", "adnet", "--datasets", "CHAOST2", "--folds", "0", "--shots", "1", "3",
            "--eval-datasets", "SABS", "--log-dir", str(tmp_path / "runs"), "--dry-run"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    for cell in ("adnet CHAOST2 setting 1 labels 1,2,3,4 fold 0  ", "adnet CHAOST2 setting 1 labels 1,2,3,4 fold 0 3-shot",
                 "adnet CHAOST2 -> SABS setting 1 labels 1,2,3,4 fold 0  ",
                 "adnet CHAOST2 -> SABS setting 1 labels 1,2,3,4 fold 0 3-shot"):
        assert cell in out, out
    assert "4 cells: 4 to train" in out and out.count("adnet_CHAOST2_setting1_labels1-2-3-4_fold0") == 4
    from launch.sweep import Cell, Sweep, eval_command
    words = eval_command(Sweep("runs", {}), Cell("adnet", "CHAOST2", 1, (1, 2, 3, 4), 0, 3, "SABS"))
    assert words[-3:] == ["evaluation.n_shot=3", "eval_dataset=SABS", "eval_data_dir=./data/SABS"]
    assert not (tmp_path / "runs").exists()
    # the cells of one training share its exp_name, but each has its own log file and Slurm job record
    cells = [Cell("adnet", "CHAOST2", 1, (1, 2, 3, 4), 0, k, d) for k in (1, 3) for d in (None, "SABS")]
    logs = [Sweep("runs", {}).log_path(c).name for c in cells]
    assert logs == ["adnet_CHAOST2_setting1_labels1-2-3-4_fold0.log", "adnet_CHAOST2_setting1_labels1-2-3-4_fold0_to_SABS.log",
                    "adnet_CHAOST2_setting1_labels1-2-3-4_fold0_3shot.log",
                    "adnet_CHAOST2_setting1_labels1-2-3-4_fold0_3shot_to_SABS.log"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "adnett", "--datasets", "CHAOST2"], "unknown method 'adnett'; available: adnet"),
    (["--methods", "adnet", "--datasets", "CHAOS"], "unknown dataset 'CHAOS'"),
    (["--methods", "adnet", "--datasets", "CMR", "--folds", "5"], "fold 5 is out of range for CMR"),
    (["--methods", "adnet", "--datasets", "SABS", "--label-groups", "2,2"], "not a group of distinct class ids"),
    (["--methods", "adnet", "--datasets", "SABS", "--label-groups", "2,99"], "--label-groups"),
    (["--methods", "adnet", "--datasets", "CMR", "eval_fold=3"], "use --folds"),
    (["--methods", "adnet", "--datasets", "CMR", "train.n_stpes=3"], "did you mean 'train.n_steps'"),
    (["--methods", "adnet", "--datasets", "CMR", "trian.n_steps=3"], "unknown config key 'trian' (did you mean 'train'?)"),
    (["--methods", "adnet", "--datasets", "CMR", "seed.x=3"], "'seed' is a value, not a section"),
    (["--methods", "adnet", "--datasets", "CMR", "protocol_nope"], "methods and datasets are chosen with --methods"),
])
def test_bad_input_is_refused_with_the_fix(argv, message, tmp_path, capsys):
    assert sweep.main([*argv, "--log-dir", str(tmp_path / "runs"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_the_sweep_checks_every_cell_before_the_first_starts(phantoms, tmp_path, capsys):
    """A missing data folder, missing pretrained weights and a GPU that is not there: one error naming
    all of them, before any cell runs (nothing is written)."""
    log_dir = tmp_path / "runs"
    argv = ["--methods", "adnet", "--datasets", "SYNTH", "CMR", "--folds", "0", "--label-groups", "1",
            "--data-dir", f"SYNTH={phantoms}", f"CMR={tmp_path / 'no_cmr'}", "--log-dir", str(log_dir),
            "--gpus", "7", "train.n_steps=2", "encoder.weights=" + str(tmp_path / "missing.pth")]
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the sweep cannot start; nothing was run:"), err
    assert str(tmp_path / "no_cmr") in err and "missing.pth" in err and "--gpus 7: no such GPU" in err
    assert not log_dir.exists()


def test_slurm_without_submitit_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)          # import submitit now raises ImportError
    argv = ["--methods", "adnet", "--datasets", "CMR", "--log-dir", str(tmp_path / "runs"), "--executor", "slurm"]
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert "--executor slurm needs submitit" in err and "pip install submitit==1.5.2" in err
    assert not (tmp_path / "runs").exists()


def test_slurm_submits_one_array_and_a_rerun_leaves_queued_cells_alone(tmp_path, capsys, monkeypatch):
    """Against stand-ins for sbatch and squeue (nothing runs): the job array's sbatch options, the job
    ids printed and recorded, and a re-run that finds the jobs still queued and submits nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", 'echo "Submitted batch job 4242"'), ("squeue", 'printf "4242_0\\n4242_1\\n"'),
                       ("srun", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    log_dir = tmp_path / "runs"
    argv = ["--methods", "adnet", "--datasets", "CMR", "--folds", "0", "1", "--log-dir", str(log_dir),
            "--executor", "slurm", "--partition", "gpu", "--time", "90", "--array-parallelism", "2",
            "--sbatch", "account=lab", "--", "train.n_steps=1000"]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted: 4242_0 4242_1" in out and "re-run the same command" in out
    script = next((log_dir / "sweep" / "submitit").glob("*submission.sh")).read_text()
    for option in ("--partition=gpu", "--time=90", "--array=0-1%2", "--account=lab", "--gpus-per-node=1"):
        assert f"#SBATCH {option}" in script, option
    assert json.loads((log_dir / "sweep" / "slurm_jobs.json").read_text()) == {
        "adnet_CMR_setting1_labels1-2-3_fold0": "4242_0", "adnet_CMR_setting1_labels1-2-3_fold1": "4242_1"}

    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "queued (Slurm job 4242_0)" in out and "2 cells: 2 queued" in out and "submitted" not in out


@dataclass(frozen=True)
class _Job:
    """Stands in for a CellJob in the local executor: records the GPU it was given."""
    name: str
    gpu: str | None = None
    fail: bool = False

    @property
    def cell(self):
        return self

    def describe(self) -> str:
        return self.name

    def __call__(self) -> str:
        time.sleep(0.05)
        if self.fail:
            raise CellFailed(f"{self.name} failed, see its log")
        return f"{self.name} on {self.gpu}"


def test_the_local_executor_gives_each_job_one_gpu_and_reports_failures():
    jobs = [_Job(f"cell{i}", fail=i == 2) for i in range(5)]
    outcomes = run_local(jobs, ["0", "1"])
    assert sorted(o.job.name for o in outcomes) == [f"cell{i}" for i in range(5)]
    assert {o.job.gpu for o in outcomes} == {"0", "1"}
    assert [o.message for o in outcomes if not o.ok] == ["cell2 failed, see its log"]
    assert [o.job.gpu for o in run_local(jobs[:2], [])] == [None, None]          # on the CPU, one after the other


def test_a_cell_claimed_by_another_sweep_is_left_to_it(tmp_path):
    """Two sweeps started together: the cell one of them claimed is `running` for the other, whose job
    leaves it alone (nothing trained twice); the claim goes with the process that held it."""
    from launch.runners import CellJob
    from launch.sweep import Cell, Sweep, claim, plan_state
    other = Sweep("runs", {"SYNTH": "data/SYNTH"}, ("train.n_steps=2",), cwd=str(tmp_path))
    cell = Cell("adnet", "SYNTH", 1, (1,), 0)
    with claim(other, cell) as mine:
        assert mine
        assert plan_state(other, cell).state == "running"
        assert "claimed by another sweep process" in CellJob(other, cell)()
        with claim(other, cell) as second:
            assert not second
    assert plan_state(other, cell).state == "to train"
    assert not (tmp_path / "runs" / "train").exists()
