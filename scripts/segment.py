"""One-shot segmentation of new scans: one annotated support scan, any number of query scans.

    python -m scripts.segment --checkpoint runs/train/<exp>/<run>/snapshots/<episodes>.pth \\
        --support-image S.nii.gz --support-label SL.nii.gz --class-id 1 \\
        --query Q1.nii.gz [Q2.nii.gz ...] [--query-label QL1.nii.gz ...] --out OUT_DIR \\
        [--device auto] [--amp off] [--n-part 3] [--label-value V] [--extent-fraction 0.1] \\
        [--dataset-json PATH] [--normalize config|volume]

Writes each query's mask (NIfTI, in the query's own geometry), a PNG overlay and volumes_<CLASS>.csv
into OUT_DIR, and prints the organ volumes. The rules (preparation, protocol, extent estimation,
mapping back, label values) are in models/engine/segmentation.py and the README (Segment a new scan).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from data.core.cli import add_logging_arguments, run_cli
from models.engine.segmentation import (
    DEFAULT_EXTENT_FRACTION,
    ChunkPredictor,
    SegmentationJob,
    format_table,
    scan_name,
    segment_scans,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.segment",
        description="One-shot segmentation of new scans with a trained checkpoint: one support scan with its "
                    "label, one class, any number of query scans in any orientation and spacing. Writes each "
                    "mask as NIfTI in the query's own geometry, a PNG overlay and the organ volumes.",
        epilog="Rules (extent estimation, mapping back, label values): see the docstring of "
               "models/engine/segmentation.py and the README (Segment a new scan).")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a snapshot written by training.py, or a training run folder (its last snapshot)")
    parser.add_argument("--support-image", required=True, type=Path, help="the annotated scan (3-D)")
    parser.add_argument("--support-label", required=True, type=Path, help="its label (same grid)")
    parser.add_argument("--class-id", required=True, type=int, help="class to segment, an id of the training "
                                                                    "dataset's label table")
    parser.add_argument("--query", required=True, type=Path, nargs="+", help="scans to segment (3-D)")
    parser.add_argument("--query-label", type=Path, nargs="+",
                        help="labels of the queries, in the same order (optional): the organ extent comes from "
                             "them, as in evaluation, and Dice is reported")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("off", "bf16", "auto"),
                        help="encoder precision (default: the checkpoint config's evaluation.amp, off = fp32 as the "
                             "references; bf16/auto are faster and move Dice by about 1e-4)")
    parser.add_argument("--n-part", type=int, help="support slices / query chunks (default: the checkpoint "
                                                   "config's evaluation.n_part)")
    parser.add_argument("--label-value", type=float, help="value of the class in the label files (default: the "
                                                          "class id, or its raw code for e.g. CMR)")
    parser.add_argument("--extent-fraction", type=float, default=DEFAULT_EXTENT_FRACTION,
                        help="without a query label: slices whose first-pass area is at least this fraction of the "
                             f"largest form the organ extent (default {DEFAULT_EXTENT_FRACTION})")
    parser.add_argument("--dataset-json", type=Path, help="the training dataset's dataset.json, when the "
                                                          "checkpoint's data_dir is gone (datasets of your own)")
    parser.add_argument("--normalize", choices=("config", "volume"), default="config",
                        help="config (default): z-score as in training; volume: per-scan z-score even for a model "
                             "trained with data.normalize=dataset")
    add_logging_arguments(parser)
    return parser


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    if args.query_label is not None and len(args.query_label) != len(args.query):
        parser.error(f"--query-label takes one label per --query: {len(args.query)} queries, "
                     f"{len(args.query_label)} labels")
    if args.n_part is not None and args.n_part < 1:
        parser.error(f"--n-part must be >= 1, got {args.n_part}")
    if not 0 < args.extent_fraction <= 1:
        parser.error(f"--extent-fraction must be in (0, 1], got {args.extent_fraction}")
    names = [scan_name(q) for q in args.query]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        parser.error(f"queries with the same file name {duplicates} would overwrite each other's outputs")


def main(argv: Sequence[str] | None = None, predictor: ChunkPredictor | None = None) -> int:
    """The command; `predictor` replaces the checkpoint's model (tests)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)

    def body() -> int:
        options = {k: v for k, v in vars(args).items() if k != "log_level"}
        segmentation = segment_scans(SegmentationJob(**options), predictor)
        print(format_table(segmentation.results, segmentation.class_name))
        print(f"masks, overlays and volumes_{segmentation.class_name}.csv in {args.out}")
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
