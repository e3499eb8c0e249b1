"""Small datasets written by the tests themselves."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data.core.io import Geometry, write_volume

GEOMETRY = Geometry((1.25, 1.25, 7.7), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def blob_scan(rng: np.random.Generator, shape=(8, 32, 32), n_classes=2):
    """Image with one bright box per class on a noisy body, and its label."""
    Z, H, W = shape
    image = rng.normal(100, 5, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for c in range(1, n_classes + 1):
        z0 = rng.integers(1, 3)
        y0, x0 = rng.integers(2, H // 2), rng.integers(2, W // 2)
        sl = (slice(z0, Z - 1), slice(y0, y0 + H // 3), slice(x0 + (c - 1) * 3, x0 + (c - 1) * 3 + W // 3))
        label[sl] = c
        image[sl] += 60 * c
    return image, label


def write_dataset(root: Path, ids=(1, 2, 3, 4, 5, 6, 7), shape=(8, 32, 32), n_classes=2, seed=0,
                  with_supervoxels: bool = True, raw_values=None) -> Path:
    """A generic dataset folder (dataset.json + image/label/supervoxels) with box-shaped organs.

    Supervoxels are the label plus a split of the background into quadrants, so every id spans
    several slices.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = {"BG": 0, **{f"C{c}": c for c in range(1, n_classes + 1)}}
    desc = {"name": "TOY", "modality": "MR", "image_dir": "images", "labels": labels,
            "defaults": {"n_sv": 100}}
    if raw_values:
        desc["raw_label_values"] = {str(k): v for k, v in raw_values.items()}
    (root / "dataset.json").write_text(json.dumps(desc))
    inverse = {v: k for k, v in (raw_values or {}).items()}
    for i in ids:
        image, label = blob_scan(rng, shape, n_classes)
        raw = np.vectorize(lambda v: inverse.get(v, v))(label) if raw_values else label
        write_volume(root / "images" / f"image_{i}.nii.gz", image, GEOMETRY)
        write_volume(root / "images" / f"label_{i}.nii.gz", raw.astype(np.float64), GEOMETRY)
        if with_supervoxels:
            Z, H, W = shape
            quadrant = (np.arange(H)[:, None] >= H // 2) * 2 + (np.arange(W)[None, :] >= W // 2) + 1
            sv = np.where(label > 0, label + 10, np.broadcast_to(quadrant, shape)).astype(np.int32)
            write_volume(root / "supervoxels_100" / f"superpix-MIDDLE_{i}.nii.gz", sv, GEOMETRY)
    return root


def full_config(method: str, dataset: str, data_dir, log_dir, setting: int = 1, **updates) -> dict:
    """A complete experiment config on the CPU; `updates` use dotted keys (``**{"train.n_steps": 2}``)."""
    from configs.experiment import build_config
    return build_config(method, dataset, data_dir, log_dir, setting, {"device": "cpu", **updates})


def tree_state(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` by relative path (folders too, as ''): two equal states
    mean nothing was written, changed or removed in between."""
    import hashlib
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(root.rglob("*"))}
