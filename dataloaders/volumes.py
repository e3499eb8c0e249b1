"""Scans in memory: each volume is read once, normalised, checked and cached.

Images are z-scored per volume on load (mean and std over the whole volume, background included),
as every reference does for MR; `normalize="dataset"` uses one mean/std for all scans (SSL-ALPNet's
CT rule). Labels are mapped from raw file values to class ids (CMR 200/500/600 -> 1/2/3) on load,
so training and evaluation see the same ids.

Every file is read with `data.core.io.read_volume`, which refuses truncated files and NaN/inf voxels.
Episodes stack slices of different scans, so a scan whose in-plane size differs from the others is
refused when it is loaded (the sizes come from the headers, read once).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.core.io import DataError, Geometry, read_geometry, read_volume
from data.core.specs import DatasetSpec, pseudolabel_command


@dataclass
class Scan:
    """One scan: z-scored image and class-id label, both (z, y, x)."""

    scan_id: int
    image: np.ndarray            # float32
    label: np.ndarray | None     # uint8 class ids
    geometry: Geometry
    path: Path

    @property
    def n_slices(self) -> int:
        return self.image.shape[0]

    def slices_with(self, label_id: int) -> np.ndarray:
        """Sorted indices of the slices where `label_id` occurs (at least one pixel)."""
        if self.label is None:
            raise DataError(f"scan {self.scan_id} has no label loaded")
        return np.flatnonzero((self.label == label_id).any(axis=(1, 2)))


def zscore(volume: np.ndarray, mean: float | None = None, std: float | None = None,
           source: str = "the volume",
           fix: str = "re-run the preprocessing for this scan, or remove it from the dataset") -> np.ndarray:
    """(volume - mean) / std, with the volume's own statistics by default; `source` names the scan
    and `fix` says what to do in the error raised when that is impossible (a constant or non-finite
    volume)."""
    volume = volume.astype(np.float32, copy=False)
    mean = float(volume.mean(dtype=np.float64)) if mean is None else mean
    std = float(volume.std(dtype=np.float64)) if std is None else std
    if not np.isfinite(std) or std <= 0:
        raise DataError(f"cannot z-score {source}: {_why_no_spread(volume, mean, std)}; {fix}")
    return ((volume - mean) / std).astype(np.float32)


def _why_no_spread(volume: np.ndarray, mean: float, std: float) -> str:
    n_bad = int(volume.size - np.isfinite(volume).sum())
    if n_bad:
        return f"{n_bad} of its {volume.size} voxels are NaN or infinite"
    if volume.size and volume.min() == volume.max():
        return f"it is constant (every voxel {volume.flat[0]:g}), so its standard deviation is 0"
    return f"the normalisation statistics are unusable (mean {mean:g}, std {std:g})"


class VolumeStore:
    """Reads, validates and caches the scans of one dataset folder."""

    def __init__(self, spec: DatasetSpec, data_dir: str | Path, normalize: str = "volume",
                 stats_ids: tuple[int, ...] | None = None):
        if normalize not in ("volume", "dataset"):
            raise ValueError(f"normalize must be 'volume' or 'dataset', got {normalize!r}")
        self.spec = spec
        self.data_dir = Path(data_dir)
        self.normalize = normalize
        self.ids = spec.scan_ids(self.data_dir)
        self._stats_ids = stats_ids
        self._stats: tuple[float, float] | None = None
        self._scans: dict[int, Scan] = {}
        self._pseudo: dict[tuple, np.ndarray] = {}
        self._in_plane: dict[int, tuple[int, int]] | None = None

    def _require_id(self, scan_id: int) -> None:
        if scan_id not in self.ids:
            raise DataError(f"scan {scan_id} is not in {self.spec.image_folder(self.data_dir)} "
                            f"(found ids {list(self.ids)})")

    def _raw_image(self, scan_id: int) -> tuple[np.ndarray, Geometry, Path]:
        path = self.spec.image_path(self.data_dir, scan_id)
        image, geometry = read_volume(path, what=f"{self.spec.name} image")
        return image, geometry, path

    def _in_plane_sizes(self) -> dict[int, tuple[int, int]]:
        """(y, x) size of every image from its header (cheap: no voxels are read), read once.

        An unreadable header is left out here; loading that scan reports it.
        """
        if self._in_plane is None:
            self._in_plane = {}
            for i in self.ids:
                try:
                    shape, _ = read_geometry(self.spec.image_path(self.data_dir, i))
                except DataError:
                    continue
                self._in_plane[i] = shape[1:]
        return self._in_plane

    def _check_in_plane(self, scan_id: int) -> None:
        """Refuse a scan whose in-plane size is rarer among the other scans than another size.

        Episodes and evaluation batches stack slices of different scans; without this check a
        mismatch surfaces episodes later as numpy's "all input arrays must have the same shape".
        """
        sizes = self._in_plane_sizes()
        others = Counter(size for i, size in sizes.items() if i != scan_id)
        if scan_id not in sizes or not others or others[sizes[scan_id]] == max(others.values()):
            return
        y, x = sizes[scan_id]
        seen = ", ".join(f"{h}x{w} ({n} scan(s))" for (h, w), n in others.most_common())
        raise DataError(f"{self.spec.image_path(self.data_dir, scan_id)}: in-plane size {y}x{x} (y x) differs "
                        f"from the other scans of {self.spec.image_folder(self.data_dir)}: {seen}. Every scan "
                        f"needs the same in-plane size; re-run the preprocessing so that they all have it.")

    def dataset_stats(self) -> tuple[float, float]:
        """Mean and std over every voxel of the statistics scans (dataset normalisation)."""
        if self._stats is None:
            ids = self._stats_ids or self.ids
            total, total_sq, count = 0.0, 0.0, 0
            for i in ids:
                image = self._raw_image(i)[0].astype(np.float64)
                total += image.sum()
                total_sq += np.square(image).sum()
                count += image.size
            mean = total / count
            self._stats = (mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0))))
        return self._stats

    def scan(self, scan_id: int) -> Scan:
        if scan_id in self._scans:
            return self._scans[scan_id]
        self._require_id(scan_id)
        self._check_in_plane(scan_id)
        image, geometry, path = self._raw_image(scan_id)
        label_path = self.spec.label_path(self.data_dir, scan_id)
        raw_label, label_geometry = read_volume(label_path, what=f"{self.spec.name} label")
        if raw_label.shape != image.shape:
            raise DataError(f"{label_path.name} has shape {raw_label.shape} (z, y, x) but "
                            f"{path.name} has {image.shape}; image and label must be on the same grid")
        label = self.spec.map_labels(raw_label, source=str(label_path))
        source = f"{self.spec.name} image {path}"
        if self.normalize == "volume":
            image = zscore(image, source=source)
        else:
            image = zscore(image, *self.dataset_stats(), source=source)
        scan = Scan(scan_id, image, label, geometry, path)
        self._scans[scan_id] = scan
        return scan

    def pseudolabels(self, scan_id: int, folder: str) -> np.ndarray:
        """Supervoxel / superpixel ids of a scan from `<data_dir>/<folder>/superpix-MIDDLE_<id>`."""
        key = (scan_id, folder)
        if key not in self._pseudo:
            self._require_id(scan_id)
            path = self.data_dir / folder / f"superpix-MIDDLE_{scan_id}.nii.gz"
            if not path.is_file():
                raise DataError(f"pseudolabel file not found: {path}. Generate it with "
                                f"`{pseudolabel_command(self.data_dir, self.spec.name, folder)}` "
                                f"(see data/README.md).")
            pseudo, _ = read_volume(path, what="pseudolabel volume")
            shape = self.scan(scan_id).image.shape
            if pseudo.shape != shape:
                raise DataError(f"{path} has shape {pseudo.shape} but image_{scan_id} has {shape}")
            self._pseudo[key] = pseudo.astype(np.int32)
        return self._pseudo[key]

    def preload(self, ids) -> None:
        for i in ids:
            self.scan(i)
