"""Loading trained models for evaluation: our snapshots, plain state dicts, and reference checkpoints
(Q-Net, ADNet; models/engine/reference_checkpoints.py).

`find_checkpoint` implements the rule validation.py uses when `evaluation.checkpoint` is null: the
last snapshot (most episodes) of the newest COMPLETED training run of the same experiment and
configuration
(<log_dir>/train/<exp_name>/<run id>/snapshots/<episodes>.pth); unfinished runs are refused by name.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from data.core.checkpoint_files import load_checkpoint_file
from data.core.errors import CheckpointError, ConfigError
from data.core.run_folder import TRAIN, RunFolder, config_differences, config_fingerprint, experiment_folder, run_folders
from models.engine.builders import build_model
from models.engine.experiment import Experiment, upgrade_config
from models.engine.reference_checkpoints import detect_format, load_reference_state

log = logging.getLogger(__name__)


def find_checkpoint(log_dir: str | Path, exp_name: str, config: dict | None = None) -> Path:
    """Last snapshot of the newest COMPLETED training run of `exp_name`; with `config`, of the newest
    such run trained with that configuration (the same training fingerprint,
    data.core.run_folder.config_fingerprint): a run trained otherwise is named in the error, with the
    keys that differ, and never evaluated silently.

    A run that was killed (still RUNNING), FAILED or INTERRUPTED is never picked silently: its
    snapshots may be from before a divergence or from half a schedule. When only such runs have
    snapshots, the error names the newest one and the snapshot to pass explicitly."""
    base = experiment_folder(log_dir, TRAIN, exp_name)
    fingerprint = None if config is None else config_fingerprint(config, TRAIN)
    unfinished, other_config = [], []
    for run in reversed(run_folders(base)):
        snapshot = run.last_snapshot()
        if snapshot is None:
            continue
        status = run.status()
        same = fingerprint is None or run.fingerprint(TRAIN, upgrade_config) in (fingerprint, None)  # None: no record
        if status != "COMPLETED":
            unfinished.append((run, status, snapshot, same))
        elif not same:
            other_config.append((run, snapshot))
        else:
            return snapshot
    if other_config:
        run, snapshot = other_config[0]
        raise CheckpointError(
            f"no finished training run of this configuration under {base}: the newest finished run, {run}, was "
            f"trained with another one ({config_differences(run.config(), config, TRAIN)}). Give the same keys "
            f"as its training, train this configuration first, or evaluate that run's snapshot knowingly "
            f"with evaluation.checkpoint={snapshot}")
    if unfinished:
        run, status, snapshot, same = unfinished[0]
        finish = f"Finish it with `python training.py with <the configs it was started with> train.resume={run}`"
        if not same:
            finish = (f"It was trained with another configuration than this one "
                      f"({config_differences(run.config(), config, TRAIN)}). " + finish)
        raise CheckpointError(
            f"no finished training run to evaluate under {base}: the newest run with snapshots, {run}, is "
            f"{status} (killed, failed or still running){f' and {len(unfinished) - 1} other unfinished run(s)' if len(unfinished) > 1 else ''}. "
            f"{finish}, or evaluate one of its snapshots knowingly with evaluation.checkpoint={snapshot}")
    raise CheckpointError(
        f"no checkpoint to evaluate: no snapshot under {base}/<run>/{RunFolder(base).snapshot_dir.name}/. Train "
        f"first (python training.py with <the same named configs and keys>), pass "
        f"evaluation.checkpoint=<path to a .pth snapshot>, or evaluation.checkpoint=untrained to "
        f"evaluate the model before training")


def read_checkpoint(path: str | Path) -> tuple[dict, dict | None]:
    """The one reader of a checkpoint to evaluate or segment with: its model state dict, and the
    config stored with it (our snapshots) or None (a plain state dict, a reference checkpoint). A run
    folder stands for its last snapshot."""
    path = Path(path)
    if path.is_dir():
        snapshot = RunFolder(path).last_snapshot()
        if snapshot is None:
            raise CheckpointError(f"{path} holds no snapshot: pass a run folder with snapshots, or a .pth file")
        path = snapshot
    obj = load_checkpoint_file(path, missing_hint="Check evaluation.checkpoint (a snapshot is written to "
                                                  "<run>/snapshots/<episodes>.pth during training)")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        stored = obj.get("config")
        return obj["model"], stored if isinstance(stored, dict) else None
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        raise CheckpointError(f"{path} has a config but no 'model' state dict")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
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


def load_state(model: torch.nn.Module, state: dict, source: str | Path) -> None:
    """Load our state dict strictly, or a reference Q-Net / ADNet / RPT / GMRD checkpoint's, renamed by its
    head's key table (detected from its keys)."""
    fmt = detect_format(state)
    if fmt is None:
        load_model_state(model, state, source=source)
        log.info("loaded checkpoint %s", source)
    else:
        load_reference_state(model, state, fmt, source=source)


def trained_model(exp: Experiment, state: dict, source: str | Path) -> torch.nn.Module:
    """The model `exp` describes (no pretrained weights read) with `state` loaded (load_state)."""
    model = build_model(exp.encoder, exp.head, load_weights=False)
    load_state(model, state, source)
    return model


def stored_experiment(stored: dict | None, path: str | Path) -> Experiment:
    """The experiment a snapshot at `path` was trained with, from its stored config (read_checkpoint),
    upgraded to the current keys; a file without one is refused (the model it holds would be unknown)."""
    if stored is None:
        raise CheckpointError(f"{path} has no experiment config: it was not written by training.py (a plain state "
                              f"dict or a reference checkpoint), so the method, encoder and training data are "
                              f"unknown. Use a snapshot from <run>/snapshots/<episodes>.pth")
    try:
        return Experiment.from_config(upgrade_config(stored))
    except ConfigError as err:
        raise CheckpointError(f"{path}: its experiment config cannot be read: {err}") from None


def open_trained_model(checkpoint: str | Path, exp: Experiment | None = None) -> tuple[torch.nn.Module, Experiment]:
    """The one entry point to a trained model (a snapshot, a run folder's last snapshot, a plain or a
    reference state dict), as nnU-Net's initialize_from_trained_model_folder: the model and the
    experiment it is evaluated under. With `exp` (validation.py) the model is the one `exp` describes;
    without (scripts.segment) the one the snapshot's own stored experiment describes."""
    state, stored = read_checkpoint(checkpoint)
    if exp is None:
        exp = stored_experiment(stored, checkpoint)
    return trained_model(exp, state, checkpoint), exp
