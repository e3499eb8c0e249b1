"""ADNet end to end on synthetic phantoms through the real commands: train, then validate."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.core.io import read_volume
from models.engine.checkpoints import open_trained_model
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`


def _run(script, *updates, log_dir, data_dir):
    args = [sys.executable, script, "-l", "WARNING", "with", "demo", f"data_dir={data_dir}", f"log_dir={log_dir}",
            "evaluation.batch_size=4", "train.batch_episodes=1", *updates]
    out = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_train_then_validate_writes_everything(phantom_dir, tmp_path):
    log_dir = tmp_path / "runs"
    _run("training.py", "train.n_steps=3", "train.print_every=1", log_dir=log_dir, data_dir=phantom_dir)
    run = next((log_dir / "train").glob("*/1"))
    for name in ("config.json", "metrics.json", "provenance.json", "curves.png", "snapshots/3.pth",
                 "snapshots/last.pth"):
        assert (run / name).is_file(), name
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["seed"] == 2021 and "torch" in prov["packages"] and prov["config"]["method"] == "adnet"
    assert prov["fingerprint"].startswith("train-")

    # the run folder opens as a trained model: its last snapshot, under the experiment it was trained with
    model, exp = open_trained_model(run)
    snapshot = torch.load(run / "snapshots" / "3.pth", weights_only=True)["model"]
    assert exp.method == "adnet" and exp.train.n_steps == 3
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())

    # validation evaluates only a training of its own configuration: without train.n_steps=3 it names the
    # run and the key that differs, and evaluates nothing
    other = subprocess.run([sys.executable, "validation.py", "with", "demo", f"data_dir={phantom_dir}",
                            f"log_dir={log_dir}"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and str(run) in other.stderr and "train.n_steps: 3 -> 1000" in other.stderr, \
        other.stderr
    assert not (log_dir / "test").exists()

    out = _run("validation.py", "train.n_steps=3", log_dir=log_dir, data_dir=phantom_dir)
    assert "LIVER" in out and "mean" in out and "slices/s" in out
    test = next((log_dir / "test").glob("*/1"))
    results = json.loads((test / "results.json").read_text())
    assert results["checkpoint"].endswith("snapshots/3.pth")      # the rule: last snapshot of the newest run
    assert set(results["classes"]) == {"LIVER", "RK", "LK", "SPLEEN"}
    assert np.isfinite(results["mean_dice"]) and 0 <= results["mean_dice"] <= 1
    assert len((test / "results.csv").read_text().splitlines()) == 1 + 4 * len(results["query_scans"])
    pred, geometry = read_volume(next((test / "predictions").glob("*LIVER*")))
    image, image_geometry = read_volume(phantom_dir / "synth_normalized" / f"image_{results['query_scans'][0]}.nii.gz")
    assert pred.shape == image.shape and geometry.matches(image_geometry)
    assert len(list((test / "overlays").glob("*.png"))) == 4


def test_validation_without_a_training_run_says_what_to_do(phantom_dir, tmp_path):
    args = [sys.executable, "validation.py", "with", "demo", f"data_dir={phantom_dir}", f"log_dir={tmp_path}"]
    out = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no checkpoint to evaluate" in out.stderr


@pytest.mark.parametrize("update, message", [
    ("data_dir=/nonexistent/SYNTH", "data directory not found"),
    ("evaluation.checkpoint=/nonexistent/model.pth", "checkpoint not found"),
])
def test_bad_paths_are_clear_errors(phantom_dir, tmp_path, update, message):
    args = [sys.executable, "validation.py", "with", "demo", f"data_dir={phantom_dir}", f"log_dir={tmp_path}", update]
    out = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and message in out.stderr
