"""MS-CMRSeg 2019 bSSFP (C0) cardiac MRI: raw challenge NIfTI -> normalised 256 x 256 NIfTI.

    python -m data.prepare_cmr RAW_DIR OUT_DIR [--ids N ...] [--overwrite] [--compat reference|clean] [--verify]

RAW_DIR is the challenge's `C0LET2_nii45_for_challenge19` folder (or the folder above it) with
`c0t2lge/patient<N>_C0.nii.gz` (bSSFP images; the T2 and LGE files beside them are ignored) and
`c0gt/patient<N>_C0_manual.nii.gz` (labels), or a single folder holding both. Images and labels
are paired by N; images without a manual label (the unlabelled cases 36-45) are skipped. OUT_DIR
is the dataset folder (e.g. data/CMR); scans go to `OUT_DIR/cmr_MR_normalized/image_<N>.nii.gz` /
`label_<N>.nii.gz`, with `classmap_{1,200}.json` (sum rule after 200/500/600 -> 1/2/3, see
data/classmap.py) and `preprocessing.json`.

Steps (reference: Q-Net `data/CMR/image_normalize.ipynb`, identical to the CHAOS step apart from
the spacing; the reference's first step, copying `patient<N>_C0` to `image_N`, is unpublished and
assumed to be a plain rename):
1. Labels are validated to hold only {0, 200 LV myocardium, 500 LV blood pool, 600 RV} and are
   kept as these raw values in the output files, as in the published Q-Net data; the loaders map
   them to 1/2/3 (configs/datasets/cmr.yaml, raw_label_values).
2. The scan-preparation pipeline (data/pipeline.py) with CMR's `preprocessing` block
   (configs/datasets/cmr.yaml) and the command's --compat: clip the top 0.5 % of intensities (in
   the image's own dtype), resample image and label to 1.25 x 1.25 x 7.99 mm (oblique short-axis
   directions are kept), centre crop/pad to 256 x 256, with the origin correction the reference
   omits.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import Sequence

from data.core.cli import add_logging_arguments, run_cli
from data.core.io import DataError
from data.core.specs import Preprocessing, load_spec
from data.pipeline import ProcessedCase, image_from_array, prepare_scan
from data.prepare import PrepareJob, add_common_arguments, check_label_values, read_nifti_pair, run_prepare

log = logging.getLogger(__name__)

DATASET = "CMR"
LABEL_VALUES = (0, 200, 500, 600)
MIN_FGS = (1, 200)
RELEASE_FOLDER = "C0LET2_nii45_for_challenge19"

_IMAGE_RE = re.compile(r"^patient(\d+)_C0\.nii(\.gz)?$")
_LABEL_RE = re.compile(r"^patient(\d+)_C0_manual\.nii(\.gz)?$")


def _matching(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        m = pattern.match(path.name)
        if m:
            n = int(m.group(1))
            if n in found:
                raise DataError(f"{folder}: patient {n} appears twice ({found[n].name}, {path.name})")
            found[n] = path
    return found


def find_raw_dirs(raw_dir: Path) -> tuple[Path, Path]:
    """(image folder, label folder) of the release layout, or RAW_DIR for both."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"raw MS-CMRSeg folder not found: {raw_dir}")
    for base in (raw_dir, raw_dir / RELEASE_FOLDER):
        if (base / "c0t2lge").is_dir() and (base / "c0gt").is_dir():
            return base / "c0t2lge", base / "c0gt"
    if _matching(raw_dir, _IMAGE_RE):
        return raw_dir, raw_dir
    raise DataError(f"{raw_dir} has neither c0t2lge/ and c0gt/ folders nor patient<N>_C0.nii.gz files; "
                    f"pass the MS-CMRSeg '{RELEASE_FOLDER}' folder (see data/README.md)")


def find_cases(raw_dir: Path, ids: Sequence[int] | None, expected: Sequence[int]) -> dict[int, tuple[Path, Path]]:
    """{N: (image, label)} paired by patient number."""
    image_dir, label_dir = find_raw_dirs(raw_dir)
    images, labels = _matching(image_dir, _IMAGE_RE), _matching(label_dir, _LABEL_RE)
    if not labels:
        raise DataError(f"{label_dir}: no patient<N>_C0_manual.nii.gz label files")
    no_image = sorted(set(labels) - set(images))
    if no_image:
        raise DataError(f"label(s) without a bSSFP image in {image_dir}: "
                        + ", ".join(str(labels[n]) for n in no_image[:5]))
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled and not ids:
        log.info("skipping %d bSSFP image(s) without a manual label: patients %s", len(unlabelled), unlabelled)
    cases = {n: (images[n], labels[n]) for n in sorted(labels)}
    if ids:
        missing = [n for n in ids if n not in cases]
        if missing:
            raise DataError(f"patient(s) {missing} have no image/label pair in {image_dir} / {label_dir}; "
                            f"found {sorted(cases)}")
        return {n: cases[n] for n in ids}
    absent = [n for n in expected if n not in cases]
    if absent:
        log.warning("%d labelled patient(s) absent: %s; the dataset will be incomplete", len(absent), absent)
    return cases


def process_case(image_path: Path, label_path: Path, prep: Preprocessing) -> ProcessedCase:
    image, label, geometry, warnings = read_nifti_pair(image_path, label_path, DATASET)
    check_label_values(label, LABEL_VALUES, label_path)
    case = prepare_scan(image_from_array(image, geometry), label, prep, source=str(image_path))
    case.record = {"sources": {"image": str(image_path), "label": str(label_path)}, **case.record}
    case.warnings = warnings + case.warnings
    return case


def sidecar_parameters(prep: Preprocessing) -> dict:
    """The options recorded in preprocessing.json (their names predate the `preprocessing` block; kept
    so that a folder prepared earlier is still recognised as prepared with the same options)."""
    return {"compat": prep.compat, "target_spacing": [*prep.spacing, prep.z_spacing],
            "clip_percentile": prep.clip_percentile, "crop_size": prep.size, "label_values": list(LABEL_VALUES),
            "classmap_rule": "reference", "min_fg": list(MIN_FGS)}


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m data.prepare_cmr",
        description="Preprocess MS-CMRSeg 2019 bSSFP: top 0.5% clip, 1.25x1.25x7.99 mm, 256x256, raw "
                    "label values kept; writes OUT_DIR/cmr_MR_normalized/ and classmap_{1,200}.json.")
    parser.add_argument("raw_dir", type=Path, metavar="RAW_DIR",
                        help=f"MS-CMRSeg '{RELEASE_FOLDER}' folder with c0t2lge/ and c0gt/, or one folder "
                             f"holding patient<N>_C0.nii.gz and patient<N>_C0_manual.nii.gz")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="dataset folder, e.g. data/CMR")
    add_common_arguments(parser, "patient numbers N to prepare (default: every labelled patient found)")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        spec = load_spec(DATASET)
        prep = dataclasses.replace(spec.preprocessing, compat=args.compat)
        cases = find_cases(args.raw_dir, args.ids, spec.expected_ids)
        job = PrepareJob(spec=spec, out_dir=args.out_dir, sources=cases,
                         process=lambda _id, src: process_case(*src, prep),
                         tool="data.prepare_cmr", parameters=sidecar_parameters(prep), min_fgs=MIN_FGS,
                         overwrite=args.overwrite, verify=args.verify,
                         verify_ids=tuple(sorted(cases)) if args.ids else None)
        return run_prepare(job)

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
