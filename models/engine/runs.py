"""What the engine keeps in a run folder besides Sacred's records: provenance.json (git commit and
dirty state, package versions, device, seed, checkpoint evaluated), the run lock (one process
trains into a folder at a time), the metrics a resume restores, and the clean-up of interrupted
writes.
"""
from __future__ import annotations

import fcntl
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from data.core.errors import UserError
from data.core.io import atomic_path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "skimage", "SimpleITK", "nibabel", "cv2", "sacred",
            "numba")


LOCK_FILE = "train.lock"
_held_locks: dict[Path, int] = {}


class RunBusyError(UserError):
    """Another process trains into the same run folder."""


def lock_run(run_dir: str | Path) -> None:
    """Hold an exclusive lock on a training run folder while this process trains into it.

    An advisory flock on <run>/train.lock: the operating system drops it when the process ends,
    however it ends (kill -9 included), so a stale lock file never blocks a later resume."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_locks:
        return
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunBusyError(f"{run_dir} is being trained by another process right now (it holds {path}); "
                           f"wait for that process to end, or stop it, before resuming this run") from None
    _held_locks[run_dir] = fd


def unlock_run(run_dir: str | Path) -> None:
    fd = _held_locks.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def restore_metrics(run_dir: Path, saved: dict | None, episodes: int) -> dict:
    """Make run_dir/metrics.json hold exactly the metrics logged up to the resume point, and return them.

    Sacred flushes metrics on its heartbeat, so a killed run's metrics.json may lack the last
    entries before its resume point, and hold entries after it (trained again on resume). The
    resume point carries the metrics logged up to it (`saved`); a resume point written before it
    did (None) keeps what metrics.json has up to `episodes`."""
    path = Path(run_dir) / "metrics.json"
    if saved is None:
        truncate_metrics(run_dir, episodes)
        return json.loads(path.read_text()) if path.is_file() else {}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return json.loads(json.dumps(saved))


def remove_partial_files(folder: Path) -> list[Path]:
    """Delete the temporary files a killed atomic write left in `folder` (data.core.io.atomic_path names
    them .<name>.<random>.partial<suffix>); returns what was removed."""
    stale = [p for p in Path(folder).glob(".*.partial*") if p.is_file()] if Path(folder).is_dir() else []
    for p in stale:
        p.unlink()
    return stale


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop metric entries with step > after_step from run_dir/metrics.json (atomically)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return
    metrics = json.loads(path.read_text())
    for entry in metrics.values():
        keep = [i for i, s in enumerate(entry["steps"]) if s <= after_step]
        for key in ("values", "steps", "timestamps"):
            entry[key] = [entry[key][i] for i in keep]
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except ImportError:
            versions[name] = "not installed"
    return versions


def device_description(device) -> str:
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def provenance(cfg: dict, device, **extra) -> dict:
    status = _git("status", "--porcelain")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "command": " ".join(sys.argv),
        "packages": package_versions(),
        "device": device_description(device),
        "seed": cfg.get("seed"),
        "config": cfg,
        **extra,
    }


def write_provenance(run_dir: Path | None, cfg: dict, device, name: str = "provenance.json", **extra) -> None:
    if run_dir is None:
        return
    path = Path(run_dir) / name
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(provenance(cfg, device, **extra), indent=2, default=str))
