"""Loading trained models for evaluation: our snapshots, plain state dicts, and reference checkpoints
(Q-Net, ADNet; models/engine/reference_checkpoints.py).

`find_checkpoint` implements the rule validation.py uses when `evaluation.checkpoint` is null: the
last snapshot (most episodes) of the newest COMPLETED training run of the same experiment
(<log_dir>/train/<exp_name>/<run id>/snapshots/<episodes>.pth); unfinished runs are refused by name.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from data.core.errors import CheckpointError
from data.core.checkpoint_files import load_checkpoint_file
from models.engine.reference_checkpoints import detect_format, load_reference_state

log = logging.getLogger(__name__)
_SNAPSHOT_RE = re.compile(r"^(\d+)\.pth$")


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


def run_folders(base: str | Path) -> list[Path]:
    """The numbered run folders Sacred wrote under `base` (<log_dir>/<train|test>/<exp_name>), oldest first."""
    base = Path(base)
    if not base.is_dir():
        return []
    return [p for _, p in sorted((int(p.name), p) for p in base.iterdir() if p.is_dir() and p.name.isdigit())]


def find_checkpoint(log_dir: str | Path, exp_name: str) -> Path:
    """Last snapshot of the newest COMPLETED training run of `exp_name`.

    A run that was killed (still RUNNING in run.json), FAILED or INTERRUPTED is never picked
    silently: its snapshots may be from before a divergence or from half a schedule. When only such
    runs have snapshots, the error names the newest one and the snapshot to pass explicitly."""
    base = Path(log_dir) / "train" / exp_name
    unfinished = []
    for run in reversed(run_folders(base)):
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
    Q-Net / ADNet training code (renamed by models/engine/reference_checkpoints.py; detected from its keys)."""
    state = read_state_dict(path)
    fmt = detect_format(state)
    if fmt is None:
        load_model_state(model, state, source=path)
        log.info("loaded checkpoint %s", path)
    else:
        load_reference_state(model, state, fmt, source=path)
