"""A run killed with SIGKILL and resumed ends with bit-identical weights to an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import PROJECT_ROOT

UPDATES = ["train.n_steps=6", "train.checkpoint_every=2", "train.snapshot_every=6", "train.print_every=2",
           "evaluation.n_overlays=0"]


def _args(log_dir, data_dir, *extra):
    return [sys.executable, "training.py", "-l", "WARNING", "with", "demo", f"data_dir={data_dir}",
            f"log_dir={log_dir}", *UPDATES, *extra]


def _episodes_at_resume_point(run_dir):
    path = run_dir / "snapshots" / "last.pth"
    if not path.is_file():
        return 0
    return torch.load(path, map_location="cpu", weights_only=True)["episodes"]


def test_kill_and_resume_is_bit_identical(phantom_dir, tmp_path):
    straight = subprocess.run(_args(tmp_path / "a", phantom_dir), cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = subprocess.Popen(_args(tmp_path / "b", phantom_dir), cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run_dir = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        runs = list((tmp_path / "b" / "train").glob("*/1"))
        if runs and 2 <= _episodes_at_resume_point(runs[0]) <= 4:
            run_dir = runs[0]
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert run_dir is not None, "the run ended before it could be killed"
    killed_at = _episodes_at_resume_point(run_dir)
    assert not (run_dir / "snapshots" / "6.pth").exists()

    resumed = subprocess.run(_args(tmp_path / "b", phantom_dir, f"train.resume={run_dir}"), cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["1"]       # same run folder

    a = torch.load(next((tmp_path / "a" / "train").glob("*/1")) / "snapshots" / "6.pth", weights_only=True)
    b = torch.load(run_dir / "snapshots" / "6.pth", weights_only=True)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"{key} differs after resuming at episode {killed_at}"
    steps = json.loads((run_dir / "metrics.json").read_text())["loss.total"]["steps"]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_resume_refuses_a_different_configuration(tmp_path):
    from models.engine.trainer import check_resumable
    saved = {"optim": {"lr": 0.001}, "train": {"resume": None, "num_workers": 0}}
    check_resumable(saved, {"optim": {"lr": 0.001}, "train": {"resume": "x", "num_workers": 4}}, tmp_path)
    with pytest.raises(ValueError, match=r"optim.lr: 0.001 -> 0.5"):
        check_resumable(saved, {"optim": {"lr": 0.5}, "train": {"resume": "x", "num_workers": 0}}, tmp_path)
