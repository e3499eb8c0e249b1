"""Class-slice index: `classmap_<MIN>.json`, which slices of which scan show which class.

    python -m data.classmap DATA_DIR --dataset NAME --min-fg 1 100 400 [--rule reference|sum|count]

Format (as shipped with the Q-Net data): a JSON object whose keys are the class names of the dataset
in label-id order, background included; each maps every scan id (a string, in ascending integer
order) to the ascending list of 0-based z indices of the (z, y, x) label array. Every class has an
entry, possibly empty, for every scan. Evaluation reads `classmap_1.json`; SSL-ALPNet's training on
manual labels reads `classmap_<min_fg>.json`.

Inclusion rules. Slice z is listed under class c when c occurs in the slice (at least one voxel)
and the dataset's second test passes:

- `sum` (the CHAOS and CMR notebooks of SSL-ALPNet / Q-Net): the *sum of the label ids* over the
  whole slice is at least MIN. It is not a pixel count of c: a slice with one kidney voxel passes
  MIN=400 if the liver fills it, and "BG" lists exactly the slices holding any foreground. For CMR
  the sum is taken after mapping the raw 200/500/600 to 1/2/3. This reproduces the shipped CHAOS
  classmap_{1,100,400} and CMR classmap_{1,200} exactly.
- `count` (the SABS notebook; the rule the others presumably intended): at least MIN voxels of
  class c in the slice.
- `reference` (default): the rule the reference used for that dataset: `count` for SABS, `sum`
  for every other dataset.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from data.core.cli import add_logging_arguments, run_cli
from data.core.io import DataError, atomic_path, read_volume
from data.core.specs import load_spec

RULES = ("reference", "sum", "count")


def resolve_rule(rule: str, spec) -> str:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "reference":
        return "count" if spec.name.upper() == "SABS" else "sum"
    return rule


def slice_class_counts(class_ids: np.ndarray, n_classes: int) -> np.ndarray:
    """(z, n_classes) voxel counts per slice of a (z, y, x) array of class ids."""
    z = class_ids.shape[0]
    flat = class_ids.reshape(z, -1).astype(np.int64) + (np.arange(z, dtype=np.int64) * n_classes)[:, None]
    return np.bincount(flat.ravel(), minlength=z * n_classes).reshape(z, n_classes)


def slices_per_class(class_ids: np.ndarray, n_classes: int, min_fgs: Sequence[int],
                     rule: str) -> dict[int, list[list[int]]]:
    """{min_fg: [slice list of class 0, of class 1, ...]} for one scan, all thresholds in one pass."""
    if rule not in ("sum", "count"):
        raise ValueError(f"rule must be 'sum' or 'count' here, got {rule!r}")
    counts = slice_class_counts(class_ids, n_classes)
    present = counts > 0
    slice_sum = counts @ np.arange(n_classes)
    out = {}
    for min_fg in min_fgs:
        if rule == "sum":
            keep = present & (slice_sum >= min_fg)[:, None]
        else:
            keep = present & (counts >= min_fg)
        out[int(min_fg)] = [np.flatnonzero(keep[:, c]).tolist() for c in range(n_classes)]
    return out


def build_classmaps(data_dir: str | Path, spec, min_fgs: Iterable[int], rule: str = "reference",
                    ids: Sequence[int] | None = None) -> dict[int, dict]:
    """{min_fg: classmap} for the labels in `data_dir` (every scan, or `ids`), reading each label once."""
    min_fgs = tuple(int(m) for m in min_fgs)
    if not min_fgs:
        raise ValueError("give at least one --min-fg value")
    rule = resolve_rule(rule, spec)
    ids = tuple(sorted(ids)) if ids is not None else spec.scan_ids(data_dir)
    names = [name for name, _ in sorted(spec.labels.items(), key=lambda kv: kv[1])]
    n_classes = max(spec.labels.values()) + 1
    maps = {m: {name: {} for name in names} for m in min_fgs}
    for scan_id in ids:
        path = spec.label_path(data_dir, scan_id)
        raw, _ = read_volume(path, what=f"{spec.name} label")
        per_class = slices_per_class(spec.map_labels(raw, source=str(path)), n_classes, min_fgs, rule)
        for m in min_fgs:
            for name in names:
                maps[m][name][str(scan_id)] = per_class[m][spec.labels[name]]
    return maps


def classmap_path(data_dir: str | Path, spec, min_fg: int) -> Path:
    return spec.image_folder(data_dir) / f"classmap_{int(min_fg)}.json"


def classmap_text(classmap: dict) -> str:
    """The file content, in the shipped files' format (json.dumps defaults, no trailing newline)."""
    return json.dumps(classmap)


def write_classmaps(data_dir: str | Path, spec, maps: dict[int, dict], only_changed: bool = False) -> list[Path]:
    """Write `classmap_<min_fg>.json` into the image folder (atomically); returns the paths written.

    `only_changed`: leave files whose content is already right untouched.
    """
    paths = []
    for min_fg, classmap in maps.items():
        path = classmap_path(data_dir, spec, min_fg)
        text = classmap_text(classmap)
        if only_changed and path.is_file() and path.read_text() == text:
            continue
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m data.classmap",
        description="Write the class-slice index classmap_<MIN>.json of a preprocessed dataset "
                    "(which slices of each scan contain each class).",
        epilog="Rules: 'sum' lists a slice under class c if c occurs and the sum of the label ids in "
               "the slice is >= MIN (CHAOS/CMR reference notebooks; reproduces the shipped JSONs); "
               "'count' if at least MIN voxels are c (SABS notebook); 'reference' picks the "
               "dataset's reference rule (count for SABS, sum otherwise).")
    parser.add_argument("data_dir", type=Path, help="dataset folder, e.g. data/CHAOST2 (holds the image folder)")
    parser.add_argument("--dataset", required=True, help="dataset name (CHAOST2, SABS, CMR) or one with a dataset.json in DATA_DIR")
    parser.add_argument("--min-fg", type=int, nargs="+", default=[1], metavar="MIN",
                        help="thresholds; one JSON per value (default: 1)")
    parser.add_argument("--rule", choices=RULES, default="reference", help="inclusion rule (default: reference)")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        spec = load_spec(args.dataset, args.data_dir)
        if any(m < 0 for m in args.min_fg):
            raise DataError(f"--min-fg values must be >= 0, got {args.min_fg}")
        maps = build_classmaps(args.data_dir, spec, args.min_fg, rule=args.rule)
        for path in write_classmaps(args.data_dir, spec, maps):
            print(f"wrote {path}")
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
