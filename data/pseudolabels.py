"""Generate the self-supervision pseudolabels of a dataset folder, one file per scan.

    python -m data.pseudolabels DATA_DIR --dataset NAME [--kind supervoxels|superpixels]
        [--min-size N] [--ids 1 2 3] [--overwrite] [--reference-ids] [--workers N]
        [--spacing pixdim|header] [--sort legacy|stable|quicksort]

Kinds (both read only the images; labels are not needed):

- ``supervoxels`` (default; ADNet, Q-Net): 3-D Felzenszwalb supervoxels (`data/supervoxels.py`),
  minimum size = the dataset's ``n_sv`` default (5000 CHAOST2, 1000 CMR), written to
  ``DATA_DIR/supervoxels_<min_size>/superpix-MIDDLE_<id>.nii.gz``.
- ``superpixels`` (SSL-ALPNet, DSPNet): 2-D Felzenszwalb superpixels per slice
  (`data/superpixels.py`), minimum size 400, body threshold = the dataset's
  ``superpixel_threshold`` default + 1e-4, written to
  ``DATA_DIR/superpixels_<min_size>/superpix-MIDDLE_<id>.nii.gz``; ``--reference-ids`` keeps the
  reference's id quirks.

Outputs are int32 with the image's geometry (spacing, origin, direction; the published
reference files carry none), written atomically; existing outputs are skipped unless
``--overwrite``.

Voxel spacing of the supervoxels. The reference did not use the header's float spacing: it parsed
the NIfTI ``pixdim[1..3]`` metadata strings, which ITK prints with 6 significant digits (7.7
rather than 7.699999809...). The edge weights depend on it and the greedy merge is sensitive to
ties, so ``--spacing pixdim`` (default) uses those strings, exactly as the reference, and
``--spacing header`` the header's float values. With the default spacing and the default
``--sort legacy`` the published CHAOST2 and CMR supervoxels are regenerated bit for bit (ids
included); with the header floats, the adjusted Rand index against them drops to 0.74 on some
CHAOS scans.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from data.core.cli import add_logging_arguments, run_cli
from data.core.io import ConfigError, DataError, Geometry, read_volume, write_volume
from data.core.specs import DatasetSpec, load_spec
from data.superpixels import reference_threshold, superpixels_2d
from data.supervoxels import SORT_KINDS, supervoxels_3d

KINDS = ("supervoxels", "superpixels")
SPACING_SOURCES = ("pixdim", "header")
SUPERPIXEL_MIN_SIZE = 400


@dataclass(frozen=True)
class Job:
    """One scan to process (picklable, for worker processes)."""

    scan_id: int
    image_path: Path
    output_path: Path
    kind: str
    min_size: int
    threshold: float | None     # superpixels only
    reference_ids: bool         # superpixels only
    spacing: str                # supervoxels only
    sort: str                   # supervoxels only


# ------------------------------------------------------------------------------------ spacing
def header_spacing_zyx(geometry: Geometry, path: Path) -> tuple[float, float, float]:
    """The image's (z, y, x) spacing from its header floats; `DataError` if unusable."""
    spacing = tuple(float(s) for s in reversed(geometry.spacing))
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{path} has no usable voxel spacing ({geometry.spacing}); the supervoxel "
                        f"edge weights need positive (x, y, z) spacing in the NIfTI header (pixdim)")
    return spacing


def pixdim_spacing_zyx(path: Path, geometry: Geometry) -> tuple[float, float, float]:
    """(z, y, x) spacing parsed from the NIfTI pixdim metadata strings, as the reference did.

    ITK prints pixdim with 6 significant digits, so this is the header float rounded to 6
    digits (7.7 for 7.699999809). Files without the metadata get that rounding of the header.
    """
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOn()
    reader.ReadImageInformation()
    header = header_spacing_zyx(geometry, path)
    keys = ("pixdim[3]", "pixdim[2]", "pixdim[1]")  # z, y, x
    if all(reader.HasMetaDataKey(k) for k in keys):
        try:
            spacing = tuple(float(reader.GetMetaData(k)) for k in keys)
        except ValueError:
            raise DataError(f"{path}: unreadable pixdim metadata "
                            f"{[reader.GetMetaData(k) for k in keys]}") from None
    else:
        spacing = tuple(float(f"{s:.6g}") for s in header)
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{path} has no usable voxel spacing (pixdim {spacing}); the supervoxel "
                        f"edge weights need positive spacing")
    return spacing


# ------------------------------------------------------------------------------------ one scan
def pseudolabel_path(data_dir: str | Path, kind: str, scan_id: int, min_size: int) -> Path:
    if kind == "supervoxels":
        return DatasetSpec.supervoxel_path(data_dir, scan_id, min_size)
    return DatasetSpec.superpixel_path(data_dir, scan_id, min_size)


def compute_pseudolabels(job: Job) -> tuple[np.ndarray, Geometry]:
    """Read the job's image and compute its (z, y, x) int32 pseudolabels; raises `DataError`."""
    image, geometry = read_volume(job.image_path, what="image")
    try:
        if job.kind == "supervoxels":
            if job.spacing == "pixdim":
                spacing = pixdim_spacing_zyx(job.image_path, geometry)
            else:
                spacing = header_spacing_zyx(geometry, job.image_path)
            labels = supervoxels_3d(image, spacing, job.min_size, sort=job.sort)
        else:
            labels = superpixels_2d(image, job.threshold, min_size=job.min_size,
                                    reference_ids=job.reference_ids)
    except ValueError as err:
        raise DataError(f"{job.image_path}: {err}") from None
    return labels, geometry


def run_job(job: Job) -> Path:
    """Compute and write one scan's pseudolabels; errors name the scan."""
    try:
        labels, geometry = compute_pseudolabels(job)
        return write_volume(job.output_path, labels, geometry)
    except DataError as err:
        raise DataError(f"scan {job.scan_id}: {err}") from None
    except Exception as err:  # a bug or a system error: keep its type and traceback, add the scan
        err.add_note(f"while making the {job.kind} of scan {job.scan_id} ({job.image_path})")
        raise


# ------------------------------------------------------------------------------------ dataset
def _select_ids(spec: DatasetSpec, data_dir: Path, ids) -> tuple[int, ...]:
    available = spec.scan_ids(data_dir, require_labels=False)
    if ids is None:
        return available
    ids = tuple(int(i) for i in ids)
    missing = [i for i in ids if i not in available]
    if missing:
        raise DataError(f"scan id(s) {missing} not found in {spec.image_folder(data_dir)} "
                        f"(available: {list(available)})")
    return tuple(dict.fromkeys(ids))


def _check_images(spec: DatasetSpec, data_dir: Path, ids, kind: str, spacing: str) -> None:
    """Read every image before any work, so that an unusable one (truncated, NaN/inf, not 3-D, no
    spacing) stops the run before any output is written; one more read is small next to computing
    a scan's pseudolabels."""
    for scan_id in ids:
        path = spec.image_path(data_dir, scan_id)
        _, geometry = read_volume(path, what=f"image of scan {scan_id}")
        if kind == "supervoxels":
            if spacing == "pixdim":
                pixdim_spacing_zyx(path, geometry)
            else:
                header_spacing_zyx(geometry, path)


def _default_min_size(spec: DatasetSpec, kind: str) -> int:
    if kind == "superpixels":
        return SUPERPIXEL_MIN_SIZE
    if "n_sv" not in spec.defaults:
        raise DataError(f"the {spec.name} dataset description has no defaults.n_sv; pass --min-size")
    return int(spec.defaults["n_sv"])


def _superpixel_threshold(spec: DatasetSpec) -> float:
    if "superpixel_threshold" not in spec.defaults:
        raise DataError(f"the {spec.name} dataset description has no defaults.superpixel_threshold "
                        f"(the body-mask level of the 2-D superpixels); add it")
    return reference_threshold(float(spec.defaults["superpixel_threshold"]))


def generate_pseudolabels(data_dir: str | Path, dataset: str, kind: str = "supervoxels",
                          min_size: int | None = None, ids=None, overwrite: bool = False, *,
                          reference_ids: bool = False, spacing: str = "pixdim", sort: str = "legacy",
                          workers: int = 1, progress: bool = True, summary: bool = True) -> list[Path]:
    """Write the pseudolabels of the scans of `data_dir`; returns the paths written.

    Args:
        data_dir: the dataset folder (holding `<image_dir>/image_<id>.nii.gz`).
        dataset: a built-in dataset name, or any name when `data_dir` has a dataset.json.
        kind: "supervoxels" (3-D, ADNet / Q-Net) or "superpixels" (2-D, SSL-ALPNet).
        min_size: minimum segment size; default n_sv of the spec (supervoxels) or 400.
        ids: scan ids to process (default: every image in the folder).
        overwrite: recompute existing outputs (default: skip them).
        reference_ids: superpixels only, reproduce the reference's id quirks.
        spacing: supervoxels only, "pixdim" (the reference's parsed metadata strings) or "header".
        sort: supervoxels only, edge sort of `felzenszwalb_3d` ("legacy" reproduces the reference).
        workers: scans processed in parallel (processes).
        progress: show a progress bar; summary: print the one-line summary.

    Raises `DataError` (naming the folder, file or scan) for a missing folder, an unknown
    dataset, a bad image or an image without foreground. Outputs are written atomically, so a
    failure never leaves a partial file; outputs finished before it are kept.
    """
    start = time.perf_counter()
    data_dir = Path(data_dir)
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if spacing not in SPACING_SOURCES:
        raise ConfigError(f"spacing must be one of {SPACING_SOURCES}, got {spacing!r}")
    if sort not in SORT_KINDS:
        raise ConfigError(f"sort must be one of {SORT_KINDS}, got {sort!r}")
    if int(workers) < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if reference_ids and kind != "superpixels":
        raise ConfigError("reference ids (--reference-ids) apply to superpixels only; the "
                         "supervoxel ids always follow the reference")
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    spec = load_spec(dataset, data_dir)
    min_size = _default_min_size(spec, kind) if min_size is None else int(min_size)
    if min_size < 1:
        raise ConfigError(f"min_size must be >= 1, got {min_size}")
    threshold = _superpixel_threshold(spec) if kind == "superpixels" else None
    selected = _select_ids(spec, data_dir, ids)

    jobs = [Job(i, spec.image_path(data_dir, i), pseudolabel_path(data_dir, kind, i, min_size), kind,
                min_size, threshold, reference_ids, spacing, sort) for i in selected]
    todo = [j for j in jobs if overwrite or not j.output_path.is_file()]
    _check_images(spec, data_dir, [j.scan_id for j in todo], kind, spacing)

    written: list[Path] = []
    bar = tqdm(total=len(todo), desc=f"{spec.name} {kind}", unit="scan", disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            for job in todo:
                written.append(run_job(job))
                bar.update()
        else:
            written = _run_parallel(todo, int(workers), bar)
    finally:
        bar.close()
    if summary:
        folder = pseudolabel_path(data_dir, kind, 0, min_size).parent
        print(f"{spec.name} {kind} (min size {min_size}): {len(written)} written, "
              f"{len(jobs) - len(todo)} skipped (already there), "
              f"{time.perf_counter() - start:.1f} s -> {folder}")
    return written


def _run_parallel(jobs: list[Job], workers: int, bar) -> list[Path]:
    """Run the jobs in worker processes; on the first failure cancel the rest and re-raise it."""
    written = []
    context = multiprocessing.get_context("spawn")  # no fork of a process holding ITK threads
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        pending = {pool.submit(run_job, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                written.append(future.result())
                bar.update()
    return sorted(written)


# ------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.pseudolabels", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="dataset folder (e.g. data/CHAOST2)")
    parser.add_argument("--dataset", required=True,
                        help="dataset name (CHAOST2, CMR, SABS, ... or the name in DATA_DIR/dataset.json)")
    parser.add_argument("--kind", choices=KINDS, default="supervoxels",
                        help="3-D supervoxels (ADNet/Q-Net, default) or 2-D superpixels (SSL-ALPNet)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="minimum segment size (default: the dataset's n_sv for supervoxels, "
                             f"{SUPERPIXEL_MIN_SIZE} for superpixels)")
    parser.add_argument("--ids", type=int, nargs="+", default=None, help="only these scan ids")
    parser.add_argument("--overwrite", action="store_true", help="recompute existing outputs")
    parser.add_argument("--reference-ids", action="store_true",
                        help="superpixels: keep the reference's id quirks (segment 0 dropped, max -> max+1)")
    parser.add_argument("--workers", type=int, default=1, help="scans processed in parallel")
    parser.add_argument("--spacing", choices=SPACING_SOURCES, default="pixdim",
                        help="supervoxels: voxel spacing from the pixdim strings as the reference "
                             "(default) or from the header floats")
    parser.add_argument("--sort", choices=SORT_KINDS, default="legacy",
                        help="supervoxels: edge sort; legacy = NumPy<1.25 argsort order, "
                             "as the reference (default)")
    add_logging_arguments(parser)       # -q also hides the progress bar
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        generate_pseudolabels(args.data_dir, args.dataset, args.kind, args.min_size, args.ids,
                              args.overwrite, reference_ids=args.reference_ids, spacing=args.spacing,
                              sort=args.sort, workers=args.workers, progress=args.log_level != "WARNING")
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    sys.exit(main())
