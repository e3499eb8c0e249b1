"""Run folders: where runs go, resuming into an existing one, and what each records (provenance).

A run folder is Sacred's FileStorageObserver layout, <log_dir>/<train|test>/<exp_name>/<run id>/,
holding config.json, run.json, cout.txt, metrics.json, plus ours: provenance.json (git commit and
dirty state, package versions, device, seed, checkpoint evaluated), snapshots/ (training),
results and overlays (evaluation).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from sacred.observers import FileStorageObserver

from data.io import atomic_path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "skimage", "SimpleITK", "nibabel", "cv2", "sacred",
            "numba")


class ResumableFileStorageObserver(FileStorageObserver):
    """A FileStorageObserver that can continue an existing run folder instead of making a new one.

    Sacred appends to cout.txt and metrics.json, so a resumed run keeps one history; metrics
    recorded after the snapshot it resumes from are dropped first (`truncate_metrics`), since those
    steps are trained again.
    """

    def __init__(self, basedir, resume_dir: str | Path | None = None, **kwargs):
        super().__init__(basedir, **kwargs)
        self.resume_dir = Path(resume_dir) if resume_dir else None

    def _make_run_dir(self, _id):
        if self.resume_dir is None:
            return super()._make_run_dir(_id)
        if not self.resume_dir.is_dir():
            raise FileNotFoundError(f"train.resume: run folder {self.resume_dir} does not exist")
        self.dir = str(self.resume_dir)


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
