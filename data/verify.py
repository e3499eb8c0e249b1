"""Integrity check of a preprocessed dataset folder, in the spirit of nnU-Net's --verify_dataset_integrity.

    python -m data.verify DATA_DIR --dataset NAME [--ids ID ...] [--headers-only]

DATA_DIR is the dataset folder (e.g. data/CHAOST2); the scans are in its `<image_dir>/` as
image_<id>.nii.gz / label_<id>.nii.gz. Each problem is printed on one line naming the file, then a
summary; the exit code is 1 if there is any error.

Errors (the dataset cannot be used as it is):
- the dataset's description (its dataset.json, or the built-in configs/datasets/*.yaml) says something
  impossible or misleading (label ids outside 0-255 or named twice, a scan twice in `folds`, an
  `image_dir` outside the dataset folder, text where a number belongs, ...: data.core.specs checks it
  when the spec is loaded): printed as `error: <file>: <field>: ...`, exit code 1, no scan read;
- the folder or its image folder is missing; a scan stored as .nii instead of .nii.gz;
- an image without its label or a label without its image;
- an expected scan id missing, or an unexpected one present (`spec.expected_ids`; with --ids only
  those scans are checked and others are ignored);
- a file that is unreadable or not 3-D; image and label shapes differ; their spacing, origin or
  direction differ by more than 1e-4 (relative, 1e-4 absolute near zero);
- in-plane size other than the spec's `preprocessing.size` (256 x 256 for CHAOST2, CMR, SABS);
  without a preprocessing block, in-plane sizes that differ between scans (the loaders need one size);
- fewer than 3 slices (the adjacent-slice episode samplers of ADNet / Q-Net and the 3-part support
  protocol need at least 3) or more than 1000 (no abdominal or cardiac scan here comes near; more
  suggests a wrongly stacked series, and a 1000 x 256 x 256 float64 volume already takes 0.5 GB);
- a truncated file, or NaN or infinite values in image or label (every file is read with
  `data.core.io.read_volume`, which checks both: SimpleITK alone zero-fills a short file and turns NaN
  into 0); a constant image (the per-volume z-score divides by its standard deviation);
- label values that are not integers or not among the dataset's raw label values;
- pseudolabel files, when present (`<DATA_DIR>/supervoxels_*/` and `superpixels_*/`, one
  superpix-MIDDLE_<id>.nii.gz per scan): unreadable or truncated, NaN/inf, a shape or geometry other
  than the image's (files without geometry -- unit spacing, zero origin, identity direction, as the
  published reference pseudolabels -- are accepted when the shape matches), ids that are not
  non-negative integers;
- a classmap_<MIN>.json whose classes or scan ids do not match the dataset (stale index).

Warnings (usable, but check):
- an evaluated class absent from a scan (its Dice is undefined for that scan);
- no classmap_1.json (evaluation needs it; `python -m data.classmap` writes it);
- leftover temporary `.partial` files of an interrupted write.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from data.core.cli import add_logging_arguments, run_cli
from data.core.io import DataError, Geometry, read_geometry, read_volume
from data.core.specs import load_spec, pseudolabel_command

MIN_SLICES = 3
MAX_SLICES = 1000
GEOMETRY_RTOL = 1e-4
GEOMETRY_ATOL = 1e-4


def expected_in_plane(spec) -> tuple[int, int] | None:
    """The in-plane size the spec's own preprocessing produces, or None when it declares none."""
    prep = spec.preprocessing
    return None if prep is None else (prep.size, prep.size)


_FILE_RE = re.compile(r"^(image|label)_(\d+)\.(nii\.gz|nii)$")
_CLASSMAP_RE = re.compile(r"^classmap_(\d+)\.json$")
PSEUDOLABEL_FOLDERS = ("supervoxels_*", "superpixels_*")
NO_GEOMETRY = Geometry((1.0, 1.0, 1.0))   # what the published reference pseudolabels carry


@dataclass
class Report:
    """Outcome of `verify_dataset`: one message per problem, each naming the file."""

    data_dir: Path
    dataset: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked_ids: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, message: str) -> None:
        self.errors.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (f"{self.dataset} at {self.data_dir}: {len(self.checked_ids)} scan(s) checked, "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s): {verdict}")

    def format(self) -> str:
        lines = [f"ERROR: {e}" for e in self.errors] + [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines + [self.summary()])


def allowed_label_values(spec) -> list[int]:
    if spec.raw_label_values is not None:
        return sorted(spec.raw_label_values)
    return sorted(spec.labels.values())


def _list_scan_files(folder: Path, report: Report) -> tuple[dict[int, Path], dict[int, Path], set[int]]:
    """Image and label files by id, and the ids with an (already reported) uncompressed .nii file."""
    images, labels, uncompressed = {}, {}, set()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") and ".partial" in path.name:
            report.warn(f"{path}: leftover temporary file of an interrupted write; delete it")
            continue
        m = _FILE_RE.match(path.name)
        if not m:
            continue
        kind, scan_id, ext = m.group(1), int(m.group(2)), m.group(3)
        if ext == "nii":
            report.error(f"{path}: stored as .nii; the loaders read {kind}_{scan_id}.nii.gz "
                         f"(compress it, e.g. with SimpleITK or `gzip -k`, keeping the .nii.gz name)")
            uncompressed.add(scan_id)
            continue
        (images if kind == "image" else labels)[scan_id] = path
    return images, labels, uncompressed


def _check_pairs_and_ids(spec, folder: Path, images: dict, labels: dict, uncompressed: set, ids,
                         report: Report) -> list[int]:
    expected = tuple(ids) if ids is not None else spec.expected_ids
    present = sorted(set(images) | set(labels) | uncompressed)
    if expected is not None:
        missing = [i for i in expected if i not in present]
        for i in missing:
            report.error(f"{folder}: scan {i} is missing (no image_{i}.nii.gz / label_{i}.nii.gz); "
                         f"{spec.name} expects ids {list(expected)}")
        if ids is None:
            for i in (i for i in present if i not in expected):
                report.error(f"{folder / f'image_{i}.nii.gz'}: id {i} is not one of the {spec.name} ids "
                             f"{list(expected)}; it would change the cross-validation folds. Remove it, "
                             f"or describe your dataset with a dataset.json")
        present = [i for i in present if i in expected]
    checked = []
    for i in present:
        if i in uncompressed:
            continue
        if i in images and i not in labels:
            report.error(f"{images[i]}: has no label; expected {folder / f'label_{i}.nii.gz'}")
        elif i in labels and i not in images:
            report.error(f"{labels[i]}: has no image; expected {folder / f'image_{i}.nii.gz'} "
                         f"(an interrupted prepare run leaves this; re-run it)")
        else:
            checked.append(i)
    return checked


def _describe(geometry: Geometry) -> str:
    return f"{geometry.describe()}, direction {tuple(round(d, 4) for d in geometry.direction)}"


def _check_headers(spec, image: Path, label: Path, report: Report):
    try:
        shape, geometry = read_geometry(image, what=f"{spec.name} image")
        label_shape, label_geometry = read_geometry(label, what=f"{spec.name} label")
    except DataError as err:
        report.error(str(err))
        return None
    ok = True
    if shape != label_shape:
        report.error(f"{label}: shape (z, y, x) {label_shape} differs from its image's {shape} ({image.name})")
        ok = False
    elif not geometry.matches(label_geometry, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL):
        report.error(f"{label}: geometry {_describe(label_geometry)} differs from its image's "
                     f"{_describe(geometry)}")
        ok = False
    expected_plane = expected_in_plane(spec)
    if expected_plane is not None and tuple(shape[1:]) != expected_plane:
        report.error(f"{image}: in-plane size {shape[1]}x{shape[2]}, expected "
                     f"{expected_plane[0]}x{expected_plane[1]}; re-run the {spec.name} preprocessing")
        ok = False
    if not MIN_SLICES <= shape[0] <= MAX_SLICES:
        report.error(f"{image}: {shape[0]} slices; a scan needs {MIN_SLICES} to {MAX_SLICES} "
                     f"(is the volume stacked along the right axis?)")
        ok = False
    return (shape, geometry) if ok else None


def _check_image(spec, path: Path, report: Report) -> None:
    try:
        image, _ = read_volume(path, what=f"{spec.name} image")
    except DataError as err:
        report.error(str(err))
        return
    if image.min() == image.max():
        report.error(f"{path}: constant image (every voxel {image.min():g}); it cannot be normalised")


def _check_label(spec, path: Path, report: Report) -> set[int] | None:
    """Check the label's values; returns the set of class ids present."""
    try:
        label, _ = read_volume(path, what=f"{spec.name} label")
    except DataError as err:
        report.error(str(err))
        return None
    values = np.unique(label)
    non_integer = [v for v in values.tolist() if v != round(v)]
    if non_integer:
        report.error(f"{path}: non-integer label values {non_integer[:5]} (a label resampled with "
                     f"linear interpolation?)")
        return None
    allowed = allowed_label_values(spec)
    unknown = [int(v) for v in values.tolist() if int(v) not in allowed]
    if unknown:
        report.error(f"{path}: label values {unknown[:10]} are not {spec.name} values {allowed}")
        return None
    table = spec.raw_label_values or {v: v for v in spec.labels.values()}
    return {table[int(v)] for v in values.tolist()}


def _pseudolabel_folders(data_dir: Path) -> list[Path]:
    return sorted(f for pattern in PSEUDOLABEL_FOLDERS for f in data_dir.glob(pattern) if f.is_dir())


def _check_pseudolabel(spec, path: Path, scan_id: int, image: Path, image_header, read_arrays: bool,
                       report: Report) -> None:
    """A pseudolabel file must be readable, on its image's grid and hold non-negative integer ids."""
    try:
        shape, geometry = read_geometry(path, what="pseudolabel volume")
        problem = _grid_problem(shape, geometry, image, image_header)
        if problem is None and read_arrays:
            problem = _id_problem(read_volume(path, what="pseudolabel volume")[0])
    except DataError as err:
        report.error(str(err))
        return
    if problem is not None:
        command = pseudolabel_command(path.parent.parent, spec.name, path.parent.name)
        report.error(f"{path}: {problem}; regenerate it with `{command} --ids {scan_id} --overwrite`")


def _grid_problem(shape, geometry: Geometry, image: Path, image_header) -> str | None:
    """Why a pseudolabel is not on its image's grid, or None. A file without geometry (as the
    published reference pseudolabels) is accepted when its shape matches: the loaders use only it."""
    image_shape, image_geometry = image_header
    if shape != image_shape:
        return f"shape (z, y, x) {shape} differs from its image's {image_shape} ({image.name})"
    if not any(geometry.matches(g, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL) for g in (image_geometry, NO_GEOMETRY)):
        return f"geometry {_describe(geometry)} differs from its image's {_describe(image_geometry)} ({image.name})"
    return None


def _id_problem(ids: np.ndarray) -> str | None:
    """Why pseudolabel values are not segment ids (non-negative integers), or None."""
    if np.issubdtype(ids.dtype, np.floating):
        fractional = np.unique(ids[ids != np.round(ids)])
        if fractional.size:
            return (f"non-integer ids {fractional[:5].tolist()} (pseudolabels are integer segment ids; "
                    f"a file resampled with linear interpolation?)")
    if ids.size and ids.min() < 0:
        return f"negative ids (smallest {ids.min():g}); pseudolabel ids are >= 0"
    return None


def _check_classmaps(spec, folder: Path, checked: Sequence[int], known: set[int], report: Report) -> None:
    """Each classmap must list every checked scan, and no scan that is neither present nor expected.

    (Scans already reported as missing or incomplete are not reported again.)
    """
    paths = sorted((p for p in folder.iterdir() if _CLASSMAP_RE.match(p.name)), key=lambda p: p.name)
    if not any(p.name == "classmap_1.json" for p in paths):
        report.warn(f"{folder}: no classmap_1.json (evaluation needs it); write it with "
                    f"`python -m data.classmap {folder.parent} --dataset {spec.name} --min-fg 1`")
    names = [n for n, _ in sorted(spec.labels.items(), key=lambda kv: kv[1])]
    for path in paths:
        try:
            classmap = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            report.error(f"{path}: not valid JSON ({err}); re-create it with python -m data.classmap")
            continue
        if not isinstance(classmap, dict) or list(classmap) != names:
            got = list(classmap)[:20] if isinstance(classmap, dict) else type(classmap).__name__
            report.error(f"{path}: classes {got} are not the {spec.name} classes {names}; re-create it "
                         f"with python -m data.classmap")
            continue
        for name, per_scan in classmap.items():
            keys = set(per_scan) if isinstance(per_scan, dict) else set()
            absent = [i for i in checked if str(i) not in keys]
            unknown = sorted(k for k in keys if not (k.isdigit() and int(k) in known))
            if absent or unknown:
                problem = (f"lacks scan(s) {absent[:10]}" if absent else "") + (" and " if absent and unknown else "") \
                    + (f"lists scan(s) {unknown[:10]} that do not exist" if unknown else "")
                report.error(f"{path}: class {name} {problem}; the index is stale, re-create it with "
                             f"python -m data.classmap")
                break


def verify_dataset(data_dir: str | Path, spec, ids: Sequence[int] | None = None,
                   read_arrays: bool = True) -> Report:
    """Check the dataset in `data_dir` against `spec`; see the module docstring for the checks.

    `ids`: check only these scans (missing ones are errors, other files are ignored); default: the
    spec's expected ids, or every scan present when the spec has none. `read_arrays=False` checks
    headers only (no values, no truncation, no NaN, no class presence, no pseudolabel ids).
    """
    data_dir = Path(data_dir)
    report = Report(data_dir, spec.name)
    if not data_dir.is_dir():
        report.error(f"{data_dir}: dataset folder not found")
        return report
    folder = spec.image_folder(data_dir)
    if not folder.is_dir():
        report.error(f"{folder}: image folder not found; {spec.name} keeps its scans in "
                     f"<DATA_DIR>/{spec.image_dir}/ (is DATA_DIR the dataset folder?)")
        return report
    images, labels, uncompressed = _list_scan_files(folder, report)
    if not images and not labels and not uncompressed:
        report.error(f"{folder}: no image_<id>.nii.gz / label_<id>.nii.gz files")
        return report
    candidates = _check_pairs_and_ids(spec, folder, images, labels, uncompressed, ids, report)
    report.checked_ids = tuple(candidates)
    planes = {}
    pseudolabel_folders = _pseudolabel_folders(data_dir)
    for scan_id in candidates:
        header = _check_headers(spec, images[scan_id], labels[scan_id], report)
        if header is None:
            continue
        planes[scan_id] = header[0][1:]
        for pseudolabel in (f / f"superpix-MIDDLE_{scan_id}.nii.gz" for f in pseudolabel_folders):
            if pseudolabel.is_file():
                _check_pseudolabel(spec, pseudolabel, scan_id, images[scan_id], header, read_arrays, report)
        if not read_arrays:
            continue
        _check_image(spec, images[scan_id], report)
        present = _check_label(spec, labels[scan_id], report)
        if present is not None:
            absent = [c for c in spec.eval_labels if c not in present]
            if absent:
                report.warn(f"{labels[scan_id]}: evaluated class(es) "
                            f"{', '.join(spec.label_name(c) for c in absent)} absent from this scan")
    if expected_in_plane(spec) is None and len(set(planes.values())) > 1:
        report.error(f"{folder}: in-plane sizes differ between scans ("
                     + ", ".join(f"{i}: {p[0]}x{p[1]}" for i, p in list(planes.items())[:10])
                     + "); training and evaluation need one size: re-run the preprocessing so that every scan has it")
    known = set(images) | set(labels) | uncompressed | set(spec.expected_ids or ())
    _check_classmaps(spec, folder, candidates, known, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m data.verify",
        description="Check a preprocessed dataset folder: pairs, expected ids, shapes, geometry, "
                    "truncated files, label values, NaN/inf, sizes, class presence, pseudolabels. "
                    "Exit code 1 on any error.")
    parser.add_argument("data_dir", type=Path, help="dataset folder, e.g. data/CHAOST2")
    parser.add_argument("--dataset", required=True,
                        help="dataset name (CHAOST2, SABS, CMR) or one described by DATA_DIR/dataset.json")
    parser.add_argument("--ids", type=int, nargs="+", metavar="ID",
                        help="check only these scan ids (default: the dataset's expected ids)")
    parser.add_argument("--headers-only", action="store_true",
                        help="read headers only: skip value, truncation, NaN and class-presence checks")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        spec = load_spec(args.dataset, args.data_dir)
        report = verify_dataset(args.data_dir, spec, ids=args.ids, read_arrays=not args.headers_only)
        print(report.format())
        return 0 if report.ok else 1

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
