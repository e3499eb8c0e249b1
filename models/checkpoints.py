"""Loading trained models for evaluation: our snapshots, plain state dicts, and reference checkpoints
(Q-Net, ADNet; models/reference_checkpoints.py).

`find_checkpoint` implements the rule validation.py uses when `evaluation.checkpoint` is null: the
last snapshot (most episodes) of the newest COMPLETED training run of the same experiment
(<log_dir>/train/<exp_name>/<run id>/snapshots/<episodes>.pth); unfinished runs are refused by name.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from data.io import UserError

log = logging.getLogger(__name__)
_SNAPSHOT_RE = re.compile(r"^(\d+)\.pth$")


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


def snapshots_of(run_dir: Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "snapshots"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT_RE.match(p.name))]
    return sorted(found)


def run_status(run_dir: Path) -> str:
    """Sacred's status of a run folder (COMPLETED, RUNNING, FAILED, INTERRUPTED, ...), from run.json;
    UNKNOWN when run.json is missing or unreadable."""
    try:
        status = json.loads((Path(run_dir) / "run.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return "UNKNOWN"
    return str(status) if status else "UNKNOWN"


def find_checkpoint(log_dir: str | Path, exp_name: str) -> Path:
    """Last snapshot of the newest COMPLETED training run of `exp_name`.

    A run that was killed (still RUNNING in run.json), FAILED or INTERRUPTED is never picked
    silently: its snapshots may be from before a divergence or from half a schedule. When only such
    runs have snapshots, the error names the newest one and the snapshot to pass explicitly."""
    base = Path(log_dir) / "train" / exp_name
    runs = sorted((int(p.name), p) for p in base.glob("*") if p.is_dir() and p.name.isdigit()) \
        if base.is_dir() else []
    unfinished = []
    for _, run in reversed(runs):
        snaps = snapshots_of(run)
        if not snaps:
            continue
        status = run_status(run)
        if status == "COMPLETED":
            return snaps[-1][1]
        unfinished.append((run, status, snaps[-1][1]))
    if unfinished:
        run, status, snapshot = unfinished[0]
        raise CheckpointError(
            f"no finished training run to evaluate under {base}: the newest run with snapshots, {run}, is "
            f"{status} (killed, failed or still running){f' and {len(unfinished) - 1} other unfinished run(s)' if len(unfinished) > 1 else ''}. "
            f"Finish it with `python training.py with <the same configs> train.resume={run}`, or evaluate one "
            f"of its snapshots knowingly with evaluation.checkpoint={snapshot}")
    raise CheckpointError(
        f"no checkpoint to evaluate: no snapshot under {base}/<run>/snapshots/. Train first "
        f"(python training.py with <the same named configs and keys>), pass "
        f"evaluation.checkpoint=<path to a .pth snapshot>, or evaluation.checkpoint=untrained to "
        f"evaluate the model before training")


ACCEPTED_FILES = ("files that hold only tensors and plain data (dicts, lists, numbers, strings), as torch.save "
                  "writes them for snapshots of training.py, plain state dicts, torchvision weights and the "
                  "Q-Net / ADNet reference checkpoints")


def _numpy_rng_globals() -> list:
    """What torch needs, beyond tensors and plain data, to rebuild the uint32 array that
    np.random.get_state() put into format-1 training snapshots (models/trainer.py): numpy's array
    constructor under both module names numpy has used (numpy.core in 1.x, numpy._core in 2.x, so a
    snapshot written with either loads), ndarray, dtype, and the uint32 dtype class (the only dtype
    whose state may be set). Nothing that can call arbitrary code."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [(_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _refused_object(err: pickle.UnpicklingError) -> str | None:
    """The Python global or class that torch's weights-only unpickler refused, from its message;
    None when the message names none (then the file is corrupt rather than refused)."""
    message = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"but got <class '([\w.]+)'>", message)
    return found.group(1) if found else None


def _short_reason(err: Exception) -> str:
    """torch's own reason in one sentence, without its advice to load with weights_only=False."""
    message = str(err).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", message)
    if detail:
        message = detail.group(1)
    first = re.split(r"(?<=[a-z])\. ", message.splitlines()[0] if message else "", maxsplit=1)[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def load_checkpoint_file(path: str | Path, what: str = "checkpoint", missing_hint: str = ""):
    """The content of a .pth file, read with torch.load(weights_only=True), for every file a user may
    receive: evaluated checkpoints, resume points, --checkpoint of scripts/segment.py, encoder weights.

    A full unpickle would run any code a crafted file carries, so only tensors and plain data are
    accepted (plus numpy's uint32 array of format-1 snapshots, see _numpy_rng_globals). Each failure
    is one CheckpointError that names the file: missing, truncated or corrupt, or refused because it
    holds other Python objects. `what` names the file's role in these messages."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}" + (f". {missing_hint}" if missing_hint else ""))
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused_object(err)
        if refused is not None:
            raise CheckpointError(
                f"refusing to unpickle the {what} {path}: besides tensors and plain data it holds the Python "
                f"object {refused}, and loading such a file could run arbitrary code. Accepted are "
                f"{ACCEPTED_FILES}") from None
        raise CheckpointError(_unreadable(path, what, err)) from None
    except Exception as err:  # noqa: BLE001 - zip, I/O and unpickling errors all mean an unusable file
        raise CheckpointError(_unreadable(path, what, err)) from None


def _unreadable(path: Path, what: str, err: Exception) -> str:
    return (f"cannot read {what} {path}: the file is truncated or corrupt ({_short_reason(err)}), for example "
            f"from an interrupted copy or download. Copy it again from its source; a snapshot of a training "
            f"run can also be replaced by an earlier one of <run>/snapshots/ (to evaluate or resume from)")


def read_state_dict(path: str | Path) -> dict:
    """The model state dict in a checkpoint file: our snapshot ({"model": ...}) or a plain state dict."""
    obj = load_checkpoint_file(path, missing_hint="Check evaluation.checkpoint (a snapshot is written to "
                                                  "<run>/snapshots/<episodes>.pth during training)")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise CheckpointError(f"{path} is not a model checkpoint (expected a state dict or a snapshot with a "
                          f"'model' entry)")


def load_model_state(model: torch.nn.Module, state: dict, source: str | Path = "checkpoint") -> None:
    """Strict load that lists missing and unexpected keys instead of ignoring them."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                   if own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with the wrong shape (e.g. {'; '.join(wrong_shape[:2])})")
        raise CheckpointError(f"{source} does not fit this model: " + ", ".join(parts)
                              + ". Was it trained with another method or encoder layout?")
    model.load_state_dict(state)


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load our snapshot, a plain state dict of our model, or a checkpoint written by the reference
    Q-Net / ADNet training code (renamed by models/reference_checkpoints.py; detected from its keys)."""
    from models.reference_checkpoints import detect_format, load_reference_state   # imports this module
    state = read_state_dict(path)
    fmt = detect_format(state)
    if fmt is None:
        load_model_state(model, state, source=path)
        log.info("loaded checkpoint %s", path)
    else:
        load_reference_state(model, state, fmt, source=path)
