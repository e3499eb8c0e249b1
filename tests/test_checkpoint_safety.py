"""No code runs from a checkpoint or config file a user receives.

Every command that takes a checkpoint or weights path reads it with torch.load(weights_only=True)
(models.engine.checkpoints.load_checkpoint_file); a crafted .pth whose pickle would run code is refused
with a message, and its payload never runs (a marker file it would create never appears). Also:
truncated files, partial encoder weights, a snapshot given as encoder weights, snapshots of format
1 (numpy's RNG state as an ndarray), and Sacred's `with <file>.pickle` / jsonpickle configs.

No silent wrong number from a damaged file: bytes overwritten inside a tensor (the zip member's CRC-32,
and a snapshot's tensor digest), a NaN weight, a NaN optimizer state or NaN encoder weights are refused
with the file and the tensor named; good snapshots, snapshots without a digest and legacy non-zip
files still load.
"""
import json
import os
import pickle
import random
import re
import shlex
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from data.core.checkpoint_files import DIGEST_KEY, tensor_digest
from models.engine.builders import check_encoder_weights
from models.engine.checkpoints import (
    CheckpointError,
    load_checkpoint_file,
    load_state,
    open_trained_model,
    read_checkpoint,
)
from models.engine.experiment import EncoderConfig
from models.encoder import PretrainedWeightsError, ResNetEncoder
from models.engine.trainer import SNAPSHOT_FORMAT, restore, save_snapshot
from tests.conftest import PROJECT_ROOT
from tests.helpers import tree_state

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`

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
                    "train.batch_episodes=1", *updates)     # the demo's 4 episodes per step would exceed n_steps=2


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
def _tiny_training_state(n_in=4, n_out=2):
    torch.manual_seed(0)
    model = torch.nn.Linear(n_in, n_out)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, n_in)).sum().backward()
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
        load_state(model, read_checkpoint(full)[0], full)
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
    assert torch.equal(read_checkpoint(path)[0]["weight"], model.weight)          # ... our loader rebuilds it
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


# ----------------------------------------------------------------------------- damaged files
def _overwrite_inside_a_tensor(path, size=4096):
    """Overwrite `size` bytes (at most all) in the middle of the largest tensor's data, in place, as a
    faulty disk or copy would: the archive stays a valid zip, only that member's CRC-32 is now wrong.
    Returns the member's name."""
    with zipfile.ZipFile(path) as archive:
        member = max((m for m in archive.infolist() if "/data/" in m.filename), key=lambda m: m.file_size)
    assert member.compress_type == zipfile.ZIP_STORED        # torch.save stores tensors uncompressed
    with open(path, "r+b") as f:
        f.seek(member.header_offset)
        name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
        size = min(size, member.file_size)
        f.seek(member.header_offset + 30 + name_length + extra_length + (member.file_size - size) // 2)
        f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return member.filename


@pytest.mark.parametrize("kind", ["snapshot", "plain state dict"])
def test_bytes_overwritten_inside_a_tensor_are_refused(tmp_path, kind):
    model, optimizer = _tiny_training_state(64, 32)                # an 8 KB weight: 4 KB overwritten in it
    run = tmp_path / "run"
    if kind == "snapshot":                                        # with its digest: the CRC still comes first
        path = save_snapshot(run / "snapshots" / "6.pth", model, optimizer, 6, CFG)
    else:                                                         # no digest: the CRC alone
        path = run / "snapshots" / "6.pth"
        path.parent.mkdir(parents=True)
        torch.save(model.state_dict(), path)
    member = _overwrite_inside_a_tensor(path).split("/", 1)[1]              # data/<n>, inside the archive's folder
    loaded = torch.load(path, weights_only=True)                  # the control: torch alone loads it silently
    weights = loaded["model"]["weight"] if kind == "snapshot" else loaded["weight"]
    assert not torch.equal(weights, model.weight)
    damaged = rf"checkpoint {re.escape(str(path))} is damaged: the bytes of its part '{member}' no longer match " \
              rf"the checksum \(CRC-32\).*Use an earlier snapshot of {re.escape(str(path.parent))}/"
    with pytest.raises(CheckpointError, match=damaged):
        read_checkpoint(path)
    if kind == "snapshot":
        path.rename(run / "snapshots" / "last.pth")
        with pytest.raises(CheckpointError, match=r"resume point .*last\.pth is damaged: .*CRC-32"):
            restore(run, model, optimizer, CFG)


def test_changed_tensors_in_a_valid_archive_fail_the_digest(tmp_path):
    """A snapshot rewritten with one value changed has valid CRCs: its digest alone tells."""
    model, optimizer = _tiny_training_state()
    path = save_snapshot(tmp_path / "snapshots" / "2.pth", model, optimizer, 2, CFG)
    state = torch.load(path, weights_only=True)
    state["model"]["weight"][0, 0] += 1e-3
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(path))} is damaged: its tensors do not "
                                              rf"match the digest \(sha256\) written with them"):
        read_checkpoint(path)


def test_a_good_snapshot_loads_and_its_digest_verifies(tmp_path):
    model, optimizer = _tiny_training_state()
    path = save_snapshot(tmp_path / "snapshots" / "2.pth", model, optimizer, 2, CFG)
    state = load_checkpoint_file(path)
    n_tensors = 2 + 2 + 2           # weight and bias, their momentum buffers, the numpy and torch RNG states
    assert state[DIGEST_KEY] == tensor_digest(state) and state[DIGEST_KEY]["tensors"] == n_tensors
    assert tensor_digest(state) == tensor_digest({**state, DIGEST_KEY: None})          # the digest is not hashed
    changed = {**state, "model": {**state["model"], "bias": state["model"]["bias"].clone()}}
    changed["model"]["bias"][0] = torch.nextafter(changed["model"]["bias"][0], torch.tensor(1.0))
    assert tensor_digest(changed) != state[DIGEST_KEY]                                 # one ulp changes it
    assert torch.equal(read_checkpoint(path)[0]["weight"], model.weight)


def test_files_without_a_digest_still_load(tmp_path, caplog):
    """Snapshots written before the digest, and legacy (non-zip) files, which carry no checksums."""
    model, optimizer = _tiny_training_state()
    run = tmp_path / "run"
    path = save_snapshot(run / "snapshots" / "last.pth", model, optimizer, 2, CFG)
    state = torch.load(path, weights_only=True)
    del state[DIGEST_KEY]
    torch.save(state, path)
    assert torch.equal(read_checkpoint(path)[0]["weight"], model.weight)
    assert restore(run, model, optimizer, CFG)[0] == 2
    legacy = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)[0]["bias"], model.bias)
    assert "legacy (non-zip) torch file: it carries no checksums" in caplog.text


def _nan_snapshot(path, n_nan=1):
    model, optimizer = _tiny_training_state()
    with torch.no_grad():
        model.weight.view(-1)[:n_nan] = float("nan")
    return save_snapshot(path, model, optimizer, 4, CFG)


def test_a_nan_weight_is_refused_by_the_segment_loader(tmp_path):
    path = _nan_snapshot(tmp_path / "run" / "snapshots" / "4.pth", n_nan=3)
    message = rf"checkpoint {re.escape(str(path))} holds non-finite values in the model weight 'weight' " \
              rf"\(3 NaN of its 8 values\).*Use an earlier snapshot of {re.escape(str(path.parent))}/"
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):            # what scripts.segment --checkpoint calls
        open_trained_model(path)


def test_validation_refuses_a_nan_snapshot(phantom_dir, tmp_path):
    path = _nan_snapshot(tmp_path / "given" / "4.pth")
    log_dir = tmp_path / "runs"
    out = _demo("validation.py", phantom_dir, log_dir, f"evaluation.checkpoint={path}")
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "non-finite values in the model weight 'weight' (1 NaN" \
        in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and not log_dir.exists()


def test_a_resume_point_with_nan_optimizer_state_is_refused(tmp_path):
    model, optimizer = _tiny_training_state()
    optimizer.state[model.bias]["momentum_buffer"][1] = float("inf")
    run = tmp_path / "run"
    path = save_snapshot(run / "snapshots" / "last.pth", model, optimizer, 2, CFG)
    fresh = torch.nn.Linear(4, 2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    before = fresh.weight.detach().clone()
    with pytest.raises(CheckpointError, match=rf"resume point {re.escape(str(path))} holds non-finite values in the "
                                              rf"optimizer state 'state\.1\.momentum_buffer' \(1 inf of its 2 "
                                              rf"values\)"):
        restore(run, fresh, fresh_optimizer, CFG)
    assert torch.equal(fresh.weight, before) and not fresh_optimizer.state       # nothing was loaded


def test_encoder_weights_with_nan_are_refused_before_training(tmp_path):
    weight = torch.randn(64, 64, 1, 1)
    weight[3, 5, 0, 0] = float("nan")
    path = tmp_path / "weights.pth"
    torch.save({"layer1.0.conv1.weight": weight}, path)
    encoder = EncoderConfig(layout="deeplab_r101", weights=str(path), allow_partial=True, bn_statistics="batch")
    with pytest.raises(PretrainedWeightsError, match=rf"encoder\.weights: pretrained weights {re.escape(str(path))} "
                                                     rf"holds non-finite values in 'layer1\.0\.conv1\.weight' "
                                                     rf"\(1 NaN of its 4096 values\)"):
        check_encoder_weights(encoder)
