"""The provenance of a run (git commit and dirty state, package versions, device, seed, the evaluated
checkpoint, and the fingerprint of the configuration that decides its numbers), written into its run
folder (data.core.run_folder owns the layout, the lock, the metrics and the snapshots).
"""
from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

from data.core.run_folder import RunFolder, config_fingerprint

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "torchvision", "numpy", "scipy", "skimage", "SimpleITK", "nibabel", "cv2", "sacred",
            "numba")


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


def provenance(cfg: dict, device, kind: str, **extra) -> dict:
    status = _git("status", "--porcelain")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "command": " ".join(sys.argv),
        "packages": package_versions(),
        "device": device_description(device),
        "seed": cfg.get("seed"),
        "fingerprint": config_fingerprint(cfg, kind),
        "config": cfg,
        **extra,
    }


def write_provenance(run_dir: Path | None, cfg: dict, device, kind: str, **extra) -> None:
    """Record in run_dir where the run came from (kind: train or test, which fingerprint it gets)."""
    if run_dir is None:
        return
    RunFolder(run_dir).write_provenance(provenance(cfg, device, kind, **extra))
