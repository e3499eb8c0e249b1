"""The prepare-command runner: read raw pairs, prepare them with data/pipeline.py, write and index a dataset.

Used by data/prepare_chaos.py, prepare_cmr.py, prepare_sabs.py and convert_nnunet.py. A command
finds its raw scans and hands `run_prepare` a `PrepareJob`: one `process` function per scan (which
reads the raw files and calls `data.pipeline.prepare_scan` with the dataset's `preprocessing`
block) plus what to write. The runner then

- skips scans already written (unless --overwrite) and refuses to mix scans prepared with other
  options in one folder;
- writes each image/label pair atomically (`write_pair`);
- keeps the provenance sidecar `preprocessing.json` (`SIDECAR_NAME`) beside the scans: the command,
  its parameters, the package versions and, per scan, the sources and the pipeline's record (raw
  geometry, intensity rule, resampled grid, crop offsets) and warnings;
- rebuilds the class-slice index (data/classmap.py) and, on request, checks the folder
  (data/verify.py).

Raw NIfTI inputs (`read_nifti_pair`) must pair up exactly (shape; geometry within 1e-4); like every
file they are read with `data.core.io.read_volume`, which refuses truncated files and NaN/inf voxels.
Label values are checked against the dataset's table (`check_label_values`) before any work.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from data.classmap import build_classmaps, write_classmaps
from data.core.io import DataError, Geometry, atomic_path, read_volume, write_json, write_volume
from data.core.specs import DatasetSpec
from data.pipeline import COMPAT_MODES, ProcessedCase
from data.verify import verify_dataset

log = logging.getLogger(__name__)

SIDECAR_NAME = "preprocessing.json"
SIDECAR_FORMAT = 1


# --------------------------------------------------------------------------------------- raw input
def read_nifti_pair(image_path: Path, label_path: Path, dataset: str) -> tuple[np.ndarray, np.ndarray, Geometry, list[str]]:
    """Read a raw image and its label, checking that they describe the same grid.

    Returns the (z, y, x) image and label arrays, the image geometry and warnings. Shapes must be
    equal and spacing, origin and direction agree within 1e-4 (relative; 1e-4 absolute near zero).
    Differences below that (float noise in the headers) are reported as a warning and the image
    geometry is used for both, as the reference does by copying it.
    """
    image, geometry = read_volume(image_path, what=f"{dataset} image")
    label, label_geometry = read_volume(label_path, what=f"{dataset} label")
    if image.shape != label.shape:
        raise DataError(f"{label_path}: shape (z, y, x) {label.shape} differs from its image "
                        f"{image_path.name} {image.shape}; are they the same case?")
    if not geometry.matches(label_geometry, rtol=1e-4, atol=1e-4):
        raise DataError(f"{label_path}: {label_geometry.describe()}, direction "
                        f"{tuple(round(d, 4) for d in label_geometry.direction)} differs from its image "
                        f"{image_path.name}: {geometry.describe()}, direction "
                        f"{tuple(round(d, 4) for d in geometry.direction)}; are they the same case?")
    warnings = []
    if label_geometry != geometry:
        warnings.append(f"{label_path}: header geometry differs from {image_path.name} by float noise "
                        f"(below 1e-4); the image geometry is used for both")
    return image, label, geometry, warnings


def check_label_values(label: np.ndarray, allowed: Sequence[int], path: Path) -> np.ndarray:
    """The sorted label values, after checking they are finite integers among `allowed`."""
    if not np.isfinite(label).all():
        raise DataError(f"{path}: label contains NaN or infinite values")
    values = np.unique(label)
    non_integer = [v for v in values.tolist() if v != round(v)]
    if non_integer:
        raise DataError(f"{path}: non-integer label values {non_integer[:5]}; expected {list(allowed)}")
    unexpected = [int(v) for v in values.tolist() if int(v) not in set(allowed)]
    if unexpected:
        raise DataError(f"{path}: unexpected label values {unexpected[:10]}; allowed values are "
                        f"{list(allowed)}. Is this a label file of this dataset?")
    return values


# --------------------------------------------------------------------------------------- writing
def write_pair(image_path: Path, label_path: Path, image: np.ndarray, label: np.ndarray,
               geometry: Geometry) -> None:
    """Write image and label with identical geometry, so that no half-finished pair can appear.

    Both are written to temporary names first. Only when both are complete is the old image (on
    --overwrite) removed, the label renamed into place, and the image renamed last: an interrupted
    run may leave a label without its image (which the next run redoes and `verify` reports), but
    never an image without its label or an old image beside a new label. Loaders discover scans by
    their image file.
    """
    if image.shape != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} shapes differ")
    with atomic_path(image_path) as tmp_image, atomic_path(label_path) as tmp_label:
        write_volume(tmp_label, label, geometry)
        write_volume(tmp_image, image, geometry)
        Path(image_path).unlink(missing_ok=True)
    # leaving the with-block renames the label (inner context) and then the image


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape the voxels, for the sidecar."""
    versions = {"python": platform.python_version()}
    for dist in ("numpy", "SimpleITK", "scipy", "pydicom", "opencv-python-headless"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def read_sidecar(folder: Path) -> dict | None:
    """The `preprocessing.json` of an image folder, or None when there is none."""
    path = Path(folder) / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete it and re-run with --overwrite") from None


# --------------------------------------------------------------------------------------- the runner
def add_common_arguments(parser: argparse.ArgumentParser, id_help: str) -> None:
    parser.add_argument("--ids", type=int, nargs="+", metavar="ID", help=id_help)
    parser.add_argument("--overwrite", action="store_true",
                        help="re-create scans whose image and label already exist (default: skip them)")
    parser.add_argument("--compat", choices=COMPAT_MODES, default="reference",
                        help="reference (default): reproduce the published preprocessing voxel for "
                             "voxel (+1 resampled size with its trailing zero slice, integer truncation, "
                             "float64 files); clean: only samples inside the input (no empty trailing "
                             "slice), float32 interpolation, float32 images and integer labels. The "
                             "origin is corrected for crops in both modes.")
    parser.add_argument("--verify", action="store_true",
                        help="check the dataset folder with data.verify afterwards (exit code 1 on errors)")


@dataclass
class PrepareJob:
    """What a prepare command hands to `run_prepare`."""

    spec: DatasetSpec
    out_dir: Path                                   # dataset folder (holds spec.image_dir)
    sources: Mapping[int, object]                   # output id -> whatever `process` needs
    process: Callable[[int, object], ProcessedCase]  # its record carries "sources" (provenance)
    tool: str
    parameters: dict
    min_fgs: tuple[int, ...]
    overwrite: bool = False
    verify: bool = False
    verify_ids: tuple[int, ...] | None = None       # None: the spec's expected ids


def _check_parameters(folder: Path, sidecar: dict | None, parameters: dict, redo: Iterable[int]) -> None:
    """Refuse to mix scans prepared with different options in one folder."""
    if not sidecar or sidecar.get("parameters") == parameters:
        return
    kept = sorted(set(int(i) for i in sidecar.get("cases", {})) - set(redo))
    if kept:
        old = sidecar.get("parameters") or {}
        diff = ", ".join(f"{k}={old.get(k)!r} (this run: {parameters.get(k)!r})"
                         for k in sorted(set(old) | set(parameters)) if old.get(k) != parameters.get(k))
        raise DataError(f"{folder} holds scans {kept[:10]} prepared with other options: {diff}. "
                        f"Re-run with the same options, or re-create those scans too with --overwrite.")


def run_prepare(job: PrepareJob) -> int:
    """Process, write and index the scans of `job`; returns the exit code (0 ok, 1 verify errors)."""
    spec = job.spec
    folder = spec.image_folder(job.out_dir)
    ids = sorted(job.sources)
    done = [i for i in ids if spec.image_path(job.out_dir, i).is_file() and spec.label_path(job.out_dir, i).is_file()]
    todo = ids if job.overwrite else [i for i in ids if i not in done]
    sidecar = read_sidecar(folder)
    _check_parameters(folder, sidecar, job.parameters, todo)
    if done and not job.overwrite:
        log.info(f"{len(done)} of {len(ids)} scans already prepared in {folder}; skipping them "
              f"(--overwrite re-creates them)")
    warnings: list[str] = []
    for scan_id in tqdm(todo, desc=f"prepare {spec.name}", unit="scan"):
        case = job.process(scan_id, job.sources[scan_id])
        write_pair(spec.image_path(job.out_dir, scan_id), spec.label_path(job.out_dir, scan_id),
                   case.image, case.label, case.geometry)
        for w in case.warnings:
            log.warning(w)
        warnings += case.warnings
        sidecar = sidecar if sidecar and sidecar.get("parameters") == job.parameters else {"cases": {}}
        sidecar.update({"format": SIDECAR_FORMAT, "dataset": spec.name, "tool": job.tool,
                        "parameters": job.parameters, "versions": package_versions()})
        sidecar["cases"][str(scan_id)] = {**case.record, "warnings": case.warnings}
        sidecar["cases"] = {k: sidecar["cases"][k] for k in sorted(sidecar["cases"], key=int)}
        write_json(folder / SIDECAR_NAME, sidecar)

    # The index covers every scan in the folder; it is rebuilt each time (cheap: labels only), so
    # that a run interrupted after a scan but before this point cannot leave it stale, and
    # rewritten only where its content changes.
    rule = job.parameters.get("classmap_rule", "reference")
    written = write_classmaps(job.out_dir, spec, build_classmaps(job.out_dir, spec, job.min_fgs, rule=rule),
                              only_changed=True)
    if written:
        log.info(f"class-slice index ({rule} rule): " + ", ".join(p.name for p in written))
    print(f"{len(todo)} scan(s) written, {len(ids) - len(todo)} skipped, {len(warnings)} warning(s); "
          f"output in {folder}")
    if not job.verify:
        return 0
    report = verify_dataset(job.out_dir, spec, ids=job.verify_ids)
    print(report.format())
    return 0 if report.ok else 1
