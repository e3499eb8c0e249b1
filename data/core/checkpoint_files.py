"""Reading .pth files safely: every checkpoint or weights file a user may receive.

`torch.load(weights_only=True)` only: a full unpickle would run any code a crafted file carries.
Used by the encoder (pretrained weights) and by the engine (snapshots, resume points, reference
checkpoints, scripts/segment.py).

A file must also be whole and finite, or no number is computed from it:
- the archive's own checksums first: torch.save writes a zip archive with a CRC-32 per member, which
  torch.load does not check (bytes overwritten inside a tensor would load silently); a legacy non-zip
  file has none, and is read with a warning saying so;
- the tensor digest a snapshot of training.py carries (`tensor_digest`, written by
  models.engine.trainer.save_snapshot over the model, optimizer and RNG tensors): a file without one
  (a plain state dict, torchvision weights, a reference checkpoint, older snapshots) is checked by
  the archive's checksums alone;
- every floating-point tensor (model weights, optimizer state) is finite: the error names the tensor.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data.core.errors import CheckpointError

log = logging.getLogger(__name__)

# the key of a snapshot's tensor digest: {"sha256": <hex>, "tensors": <count>}
DIGEST_KEY = "digest"
_ZIP_MAGIC = b"PK\x03\x04"         # a zip archive's first local header: every torch.save file since torch 1.6
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
    accepted (plus numpy's uint32 array of format-1 snapshots, see _numpy_rng_globals). The file must
    be whole (its zip members' CRC-32s, and the tensor digest where it carries one) and every
    floating-point tensor finite. Each failure is one CheckpointError that names the file: missing,
    truncated, damaged or corrupt, refused because it holds other Python objects, or holding NaN/inf
    (naming the tensor). `what` names the file's role in these messages."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}" + (f". {missing_hint}" if missing_hint else ""))
    is_zip = _check_archive(path, what)
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
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
    if not is_zip:
        log.warning("%s %s is a legacy (non-zip) torch file: it carries no checksums, so only its "
                    "tensors' finiteness could be checked", what, path)
    _check_digest(obj, path, what)
    _check_finite(obj, path, what)
    return obj


# ----------------------------------------------------------------------------- integrity
def named_tensors(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts, lists and tuples, with its dotted path (dict keys as text); a
    sparse or otherwise non-strided tensor as its dense equivalent (no checkpoint of ours holds one)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj if obj.layout == torch.strided else obj.to_dense()
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def tensor_digest(state: dict) -> dict:
    """The digest a snapshot carries under DIGEST_KEY: sha256 over every tensor of `state` (except the
    digest itself), each as its dotted name, dtype, shape and bytes, in sorted name order; a tensor on
    the GPU is hashed from its copy on the CPU."""
    tensors = sorted(named_tensors({k: v for k, v in state.items() if k != DIGEST_KEY}), key=lambda nt: nt[0])
    digest = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach()
        header = f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data.numpy().data)
    return {"sha256": digest.hexdigest(), "tensors": len(tensors)}


def _check_archive(path: Path, what: str) -> bool:
    """Check the CRC-32 of every member of the zip archive torch.save writes (torch.load does not):
    a damaged member is refused by name. False for a legacy non-zip file (nothing to check here)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                return False
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # noqa: BLE001 - a missing directory (truncated), I/O or format error
        raise CheckpointError(_unreadable(path, what, err)) from None
    if bad is not None:
        raise CheckpointError(
            f"{what} {path} is damaged: the bytes of its part '{bad.split('/', 1)[-1]}' no longer match the "
            f"checksum (CRC-32) "
            f"written with them, so some of its values changed after it was written (a faulty copy, "
            f"download or disk). {_what_to_do(path)}")
    return True


def _check_digest(obj, path: Path, what: str) -> None:
    """A snapshot's tensors must hash to the digest written with them (a file without one: nothing to do)."""
    stored = obj.get(DIGEST_KEY) if isinstance(obj, dict) else None
    if not (isinstance(stored, dict) and isinstance(stored.get("sha256"), str)):
        return
    actual = tensor_digest(obj)
    if actual["sha256"] != stored["sha256"]:
        raise CheckpointError(
            f"{what} {path} is damaged: its tensors do not match the digest (sha256) written with them "
            f"({actual['tensors']} tensors read, {stored.get('tensors', '?')} written), so some of its values "
            f"changed after it was written. {_what_to_do(path)}")


def _check_finite(obj, path: Path, what: str) -> None:
    """Every floating-point tensor is finite, or the file is refused naming the first tensor that is not."""
    bad = [(name, tensor) for name, tensor in named_tensors(obj) if not _finite(tensor)]
    if not bad:
        return
    name, tensor = bad[0]
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    counts = ", ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
    where = f"'{name}'"
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):       # a snapshot: say which part
        for part, role in (("model", "model weight"), ("optimizer", "optimizer state")):
            if name.startswith(part + "."):
                where = f"the {role} '{name[len(part) + 1:]}'"
    more = f"; {len(bad) - 1} more tensor(s) hold non-finite values" if len(bad) > 1 else ""
    raise CheckpointError(
        f"{what} {path} holds non-finite values in {where} ({counts} of its {tensor.numel()} values{more}). "
        f"No result can come from it (training here never saves NaN or inf weights): it was damaged, or "
        f"written by a run that diverged elsewhere. {_what_to_do(path)}")


def _finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or inf (integer and bool tensors always do). Its minimum and maximum
    in one pass (NaN propagates through both, inf shows in one): ten times faster on the CPU than
    isfinite(tensor).all(), which matters for the 330 MB of a ResNet-101 resume point."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(tensor.detach().reshape(-1))
        return bool(torch.isfinite(low) & torch.isfinite(high))
    except (RuntimeError, NotImplementedError):     # complex and rarer dtypes have no aminmax
        return bool(torch.isfinite(tensor).all())


def _what_to_do(path: Path) -> str:
    if path.parent.name == "snapshots":
        return (f"Use an earlier snapshot of {path.parent}/ instead (to evaluate, or to resume from in place of "
                f"last.pth), or copy the file again from its source")
    return ("Copy the file again from its source; a snapshot of a training run can also be replaced by an earlier "
            "one of <run>/snapshots/ (to evaluate or resume from)")


def _unreadable(path: Path, what: str, err: Exception) -> str:
    return (f"cannot read {what} {path}: the file is truncated or corrupt ({_short_reason(err)}), for example "
            f"from an interrupted copy or download. Copy it again from its source; a snapshot of a training "
            f"run can also be replaced by an earlier one of <run>/snapshots/ (to evaluate or resume from)")
