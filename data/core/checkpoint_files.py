"""Reading .pth files safely: every checkpoint or weights file a user may receive.

`torch.load(weights_only=True)` only: a full unpickle would run any code a crafted file carries.
Used by the encoder (pretrained weights) and by the engine (snapshots, resume points, reference
checkpoints, scripts/segment.py).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch

from data.core.errors import CheckpointError

ACCEPTED_FILES = ("files that hold only tensors and plain data (dicts, lists, numbers, strings), as torch.save "
                  "writes them for snapshots of training.py, plain state dicts, torchvision weights and the "
                  "Q-Net / ADNet reference checkpoints")


def _numpy_rng_globals() -> list:
    """What torch needs, beyond tensors and plain data, to rebuild the uint32 array that
    np.random.get_state() put into format-1 training snapshots (models/engine/trainer.py): numpy's array
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
