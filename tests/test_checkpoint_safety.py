"""No code runs from a checkpoint or config file a user receives.

Every command that takes a checkpoint or weights path reads it with torch.load(weights_only=True)
(models.engine.checkpoints.load_checkpoint_file); a crafted .pth whose pickle would run code is refused
with a message, and its payload never runs (a marker file it would create never appears). Also:
truncated files, partial encoder weights, a snapshot given as encoder weights, snapshots of format
1 (numpy's RNG state as an ndarray), and Sacred's `with <file>.pickle` / jsonpickle configs.
"""
import json
import os
import pickle
import random
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.engine.checkpoints import CheckpointError, load_checkpoint, load_checkpoint_file, read_state_dict
from models.encoder import PretrainedWeightsError, ResNetEncoder
from models.engine.trainer import SNAPSHOT_FORMAT, restore, save_snapshot
from tests.conftest import PROJECT_ROOT
from tests.helpers import tree_state

REFUSED = "refusing to unpickle"


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def malicious_checkpoint(path, marker):
    """A torch.save'd snapshot-like dict: a real state dict plus an entry that runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": torch.nn.Linear(2, 1).state_dict(), "config": {}, "extra": Payload(marker)}, path)
    return path


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    return malicious_checkpoint(tmp_path / "evil.pth", marker), marker


def _command(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _demo(script, phantom_dir, log_dir, *updates):
    return _command(script, "-l", "WARNING", "with", "demo", f"data_dir={phantom_dir}", f"log_dir={log_dir}",
                    *updates)


def _refused_unchanged(tmp_path, command, path, marker):
    """Run `command` (a callable) and check it refused `path` and wrote or changed nothing under tmp_path."""
    before = tree_state(tmp_path)
    out = command()
    _assert_refused(out, path, marker)
    assert tree_state(tmp_path) == before
    return out


def _assert_refused(out, path, marker):
    assert out.returncode != 0
    assert REFUSED in out.stderr and "could run arbitrary code" in out.stderr and str(path) in out.stderr, \
        out.stderr[-3000:]
    assert not marker.exists()


# ----------------------------------------------------------------------------- crafted pickles
def test_the_payload_is_live(tmp_path):
    """The control: a full unpickle of the crafted file does run its payload."""
    marker = tmp_path / "control"
    path = malicious_checkpoint(tmp_path / "control.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_loader_refuses_and_names_the_global(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match=r"refusing to unpickle the checkpoint .*evil\.pth.*posix\.system.*"
                                              r"could run arbitrary code.*Accepted are files that hold only tensors"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_validation_refuses_evaluation_checkpoint(evil, phantom_dir, tmp_path):
    path, marker = evil
    _refused_unchanged(tmp_path, lambda: _demo("validation.py", phantom_dir, tmp_path / "runs",
                                               f"evaluation.checkpoint={path}"), path, marker)


def test_validation_refuses_the_newest_run_snapshot(phantom_dir, tmp_path):
    marker = tmp_path / "PWNED"
    run = tmp_path / "runs" / "train" / "evil_exp" / "1"
    path = malicious_checkpoint(run / "snapshots" / "5.pth", marker)
    (run / "run.json").write_text(json.dumps({"status": "COMPLETED"}))
    _refused_unchanged(tmp_path, lambda: _demo("validation.py", phantom_dir, tmp_path / "runs", "exp_name=evil_exp"),
                       path, marker)


def test_training_refuses_a_resume_point(phantom_dir, tmp_path):
    marker = tmp_path / "PWNED"
    run = tmp_path / "runs" / "train" / "evil_exp" / "1"
    path = malicious_checkpoint(run / "snapshots" / "last.pth", marker)
    _refused_unchanged(tmp_path, lambda: _demo("training.py", phantom_dir, tmp_path / "runs", "exp_name=evil_exp",
                                               "train.n_steps=2", f"train.resume={run}"), path, marker)


def test_training_refuses_encoder_weights(evil, phantom_dir, tmp_path):
    path, marker = evil
    out = _refused_unchanged(tmp_path, lambda: _demo("training.py", phantom_dir, tmp_path / "runs", "train.n_steps=2",
                                                     f"encoder.weights={path}"), path, marker)
    assert "encoder.weights" in out.stderr


def test_segment_refuses_checkpoint(evil, tmp_path):
    path, marker = evil
    _refused_unchanged(tmp_path, lambda: _command(
        "-m", "scripts.segment", "--checkpoint", str(path), "--support-image", "s.nii.gz", "--support-label",
        "l.nii.gz", "--class-id", "1", "--query", "q.nii.gz", "--out", str(tmp_path / "out")), path, marker)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- Sacred config files
def test_pickle_config_file_is_refused_unread(tmp_path):
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.pickle"
    config.write_bytes(pickle.dumps({"seed": Payload(marker)}))
    out = _command("training.py", "print_config", "with", str(config), timeout=120)
    assert out.returncode != 0
    assert f"refusing to load the config file {config}" in out.stderr and "can run arbitrary code" in out.stderr
    assert "Only YAML (.yaml, .yml) and JSON (.json) config files are accepted" in out.stderr
    assert not marker.exists()


def test_json_config_file_is_plain_json(tmp_path):
    """Sacred decodes JSON configs with jsonpickle, whose py/reduce calls any function; ours is plain JSON."""
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.json"
    config.write_text(json.dumps({"seed": {"py/reduce": [{"py/function": "os.system"},
                                                         {"py/tuple": [f"touch {marker}"]}]}}))
    out = _command("training.py", "print_config", "with", str(config), timeout=120)
    assert out.returncode != 0 and not marker.exists()
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"train": {"n_steps": 7}}))
    out = _command("training.py", "print_config", "with", str(plain), timeout=120)
    assert out.returncode == 0 and "n_steps = 7" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------- truncated snapshots
def _tiny_training_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


CFG = {"seed": 1, "train": {"resume": None, "n_steps": 4}}


def test_truncated_snapshot_is_named_for_evaluation_and_resume(tmp_path):
    model, optimizer = _tiny_training_state()
    run = tmp_path / "run"
    full = save_snapshot(run / "snapshots" / "last.pth", model, optimizer, 2, CFG)
    data = full.read_bytes()
    full.write_bytes(data[:len(data) // 2])
    message = rf"cannot read .*{re.escape(str(full))}: the file is truncated or corrupt .*interrupted copy.*Copy it again"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(model, full)
    with pytest.raises(CheckpointError, match=rf"cannot read resume point {re.escape(str(full))}: the file is truncated"):
        restore(run, model, optimizer, CFG)


def test_missing_resume_point(tmp_path):
    model, optimizer = _tiny_training_state()
    with pytest.raises(CheckpointError, match=r"resume point not found: .*last\.pth"):
        restore(tmp_path, model, optimizer, CFG)


# ----------------------------------------------------------------------------- snapshot formats
def _draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def _seed():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)


def _scramble():
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)


def test_snapshot_loads_weights_only_and_restores_rng(tmp_path):
    model, optimizer = _tiny_training_state()
    _seed()
    np.random.randn()                                      # numpy caches a gaussian: has_gauss = 1
    save_snapshot(tmp_path / "snapshots" / "last.pth", model, optimizer, 2, CFG)
    expected = _draws()
    state = torch.load(tmp_path / "snapshots" / "last.pth", weights_only=True)     # no allowlist needed
    assert state["format"] == SNAPSHOT_FORMAT == 2 and state["rng"]["numpy"]["has_gauss"] == 1
    _scramble()
    assert restore(tmp_path, model, optimizer, CFG)[0] == 2             # (episodes, metrics)
    assert _draws() == expected


def test_format_1_snapshot_still_loads_safely(tmp_path):
    """A resume point exactly as the code before format 2 wrote it: numpy's state as an ndarray."""
    model, optimizer = _tiny_training_state()
    _seed()
    old = {"format": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "episodes": 2,
           "config": CFG, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                  "torch": torch.get_rng_state()}}
    path = tmp_path / "snapshots" / "last.pth"
    path.parent.mkdir()
    torch.save(old, path)
    expected = _draws()
    with pytest.raises(pickle.UnpicklingError):             # plain weights_only refuses the ndarray ...
        torch.load(path, weights_only=True)
    assert torch.equal(read_state_dict(path)["weight"], model.weight)          # ... our loader rebuilds it
    allowed = {str(g) for g in torch.serialization.get_safe_globals()}
    assert not any("numpy" in g for g in allowed)           # a scoped allowlist, not a global one
    _scramble()
    fresh = torch.nn.Linear(4, 2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert restore(tmp_path, fresh, fresh_optimizer, CFG)[0] == 2
    assert torch.equal(fresh.weight, model.weight)
    assert _draws() == expected


# ----------------------------------------------------------------------------- encoder weights
@pytest.fixture(scope="module")
def resnet50_like(tmp_path_factory):
    """ResNet-101 trunk weights cut to ResNet-50's depth (layer3 with blocks 0-5, as ResNet-50 has)."""
    from models.tv import resnet101
    torch.manual_seed(0)
    state = {k: v for k, v in resnet101(weights=None).state_dict().items()
             if not (k.startswith("layer3.") and int(k.split(".")[1]) >= 6)}
    path = tmp_path_factory.mktemp("weights") / "resnet50ish.pth"
    torch.save(state, path)
    return path


def test_partial_encoder_weights_are_an_error(resnet50_like):
    encoder = ResNetEncoder("deeplab_r101")
    total = sum(1 for k in encoder.backbone.state_dict() if not k.endswith("num_batches_tracked"))
    left = sum(1 for k in encoder.backbone.state_dict()
               if k.startswith("layer3.") and int(k.split(".")[1]) >= 6 and not k.endswith("num_batches_tracked"))
    with pytest.raises(PretrainedWeightsError,
                       match=rf"fits only part of the ResNet-101 encoder: {total - left} of its {total} backbone "
                             rf"tensors matched, and {left} would stay at their random initialisation "
                             rf"\(layer3\.6\.conv1\.weight.*encoder\.allow_partial=True"):
        encoder.load_pretrained(resnet50_like)


def test_partial_encoder_weights_with_allow_partial(resnet50_like, tmp_path):
    from models.engine.builders import build_model
    from models.engine.experiment import Experiment
    from tests.helpers import full_config
    exp = Experiment.from_config(full_config("adnet", "SYNTH", tmp_path / "SYNTH", tmp_path / "runs",
                                             **{"encoder.weights": str(resnet50_like), "encoder.allow_partial": True}))
    model = build_model(exp.encoder, exp.head)
    expected = torch.load(resnet50_like, weights_only=True)["layer3.5.conv2.weight"]
    assert torch.equal(model.encoder.backbone["layer3"][5].conv2.weight, expected)


def test_training_snapshot_as_encoder_weights(tmp_path):
    model, optimizer = _tiny_training_state()
    path = save_snapshot(tmp_path / "run" / "snapshots" / "4.pth", model, optimizer, 4, CFG)
    shown, run = re.escape(str(path)), re.escape(str(tmp_path / "run"))
    with pytest.raises(PretrainedWeightsError, match=rf"{shown} is a training snapshot of this project.*"
                                                     rf"evaluation\.checkpoint={shown}.*train\.resume=.*\({run}\)"):
        ResNetEncoder("deeplab_r101").load_pretrained(path)
