"""Synapse multi-atlas abdominal CT (SABS / BTCV): raw NIfTI in HU -> windowed 256 x 256 NIfTI.

    python -m data.prepare_sabs RAW_DIR OUT_DIR [--ids ID ...] [--overwrite] [--compat reference|clean] [--verify]

RAW_DIR holds `img/img00XX.nii.gz` and `label/label00XX.nii.gz` (the Synapse `RawData/Training/`
folder; RAW_DIR may also be the folder above `RawData/` or `Training/`). Images and labels are
paired by case number, never by position. OUT_DIR is the dataset folder (e.g. data/SABS); scans go
to `OUT_DIR/sabs_CT_normalized/image_<id>.nii.gz` / `label_<id>.nii.gz`, with `classmap_1.json`
(per-class voxel-count rule, as the SABS reference notebook) and `preprocessing.json`.

Ids: the 30 training cases 0001-0010, 0021-0040 become 0-29 in case order (img0001 -> 0, img0010 ->
9, img0021 -> 10, ..., img0040 -> 29), as in the reference. The table is fixed, so a missing case
never renumbers the others (the reference counts files, so a missing file shifts every later id).
`--ids` takes these output ids.

Steps (reference: SSL-ALPNet `data/SABS/{intensity_normalization, resampling_and_roi}.ipynb`), the
scan-preparation pipeline (data/pipeline.py) with SABS's `preprocessing` block
(configs/datasets/sabs.yaml: ct_window, in_plane fit, border 0.0625, size 256) and the command's
--compat:
1. Clip to [-125, 275] HU and min-max rescale to [0, 255] (float64). `--compat reference` uses the
   clipped volume's actual minimum and maximum, as the reference; `clean` maps -125 and 275 HU.
2. Remove a 32-pixel border in-plane (512 -> 448), origin shifted accordingly (the reference does
   not shift it). Size-aware: for an in-plane size L other than 512 the border is round(L * 32/512)
   pixels, the same fraction of the field of view, and a warning is printed (every Synapse training
   case is 512 x 512).
3. Resample in-plane so that the remaining field of view becomes 256 pixels: spacing
   (sx * 1.75, sy * 1.75, sz), 1.75 = (512 - 2*32) / 256 (in general (L - 2*border) / 256); labels with
   the per-class linear > 0.5 rule. z is not resampled.

Output size, and how it differs from the reference. The reference's resampling sizes each axis
int(size * ratio + 1), so its files are **257 x 257 x (Z + 1)**; the SSL-ALPNet loader then slices
`[:256, :256]` (with a FIXME) and keeps the trailing all-background slice. The files written here
are always **256 x 256**, so every loader can read them unchanged:
- `--compat reference` (default) resamples exactly as the reference (257 x 257 x (Z + 1)) and then
  drops the last row and column, i.e. stores what the SSL-ALPNet loader trains on, trailing slice
  included. The dropped row/column lies past the input's extent, so it only ever held the
  resampler's default 0.
- `--compat clean` resamples onto exactly 256 x 256 x Z pixels that tile the cropped field of view
  (pixel centres at (i + 0.5) * 1.75 - 0.5 input pixels, so the grid is centred and every sample
  lies inside the input; the origin moves by 0.375 input pixels accordingly), with no trailing
  empty slice, interpolating in float32; images are written as float32 and labels as uint8.
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
from data.pipeline import ProcessedCase, border_pixels, image_from_array, prepare_scan
from data.prepare import PrepareJob, add_common_arguments, check_label_values, read_nifti_pair, run_prepare

log = logging.getLogger(__name__)

DATASET = "SABS"
TRAINING_CASES = tuple(range(1, 11)) + tuple(range(21, 41))
CASE_TO_ID = {case: i for i, case in enumerate(TRAINING_CASES)}
REFERENCE_SIZE = 512                # Synapse's in-plane size, which the 32-pixel border assumes
LABEL_VALUES = tuple(range(14))
MIN_FGS = (1,)

_IMAGE_RE = re.compile(r"^img(\d+)\.nii(\.gz)?$")
_LABEL_RE = re.compile(r"^label(\d+)\.nii(\.gz)?$")


def border_for(length: int, prep: Preprocessing | None = None) -> int:
    """Pixels the pipeline removes from each side of an in-plane axis of `length` with SABS's block
    (default) or `prep`: 32 of Synapse's 512, the same share of the field of view otherwise."""
    return border_pixels(length, (prep or load_spec(DATASET).preprocessing).border)


def find_raw_dirs(raw_dir: Path) -> tuple[Path, Path]:
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"raw Synapse folder not found: {raw_dir}")
    for base in (raw_dir, raw_dir / "Training", raw_dir / "RawData" / "Training"):
        if (base / "img").is_dir() and (base / "label").is_dir():
            return base / "img", base / "label"
    raise DataError(f"{raw_dir} has no img/ and label/ folders (nor RawData/Training/img, /label); "
                    f"pass the Synapse 'RawData/Training' folder (see data/README.md)")


def _cases(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        m = pattern.match(path.name)
        if not m:
            continue
        case = int(m.group(1))
        if case in found:
            raise DataError(f"{folder}: case {case} appears twice ({found[case].name}, {path.name})")
        found[case] = path
    return found


def find_cases(raw_dir: Path, ids: Sequence[int] | None) -> dict[int, tuple[int, Path, Path]]:
    """{output id: (Synapse case number, image path, label path)}, paired by case number."""
    img_dir, label_dir = find_raw_dirs(raw_dir)
    images, labels = _cases(img_dir, _IMAGE_RE), _cases(label_dir, _LABEL_RE)
    if not images:
        raise DataError(f"{img_dir}: no img<case>.nii.gz files")
    unknown = sorted(c for c in set(images) | set(labels) if c not in CASE_TO_ID)
    if unknown:
        raise DataError(f"case number(s) {unknown} in {img_dir.parent} are not Synapse training cases "
                        f"{TRAINING_CASES[0]}-10, 21-40 (test cases have no labels); remove them")
    no_label = sorted(set(images) - set(labels))
    if no_label:
        raise DataError(f"image(s) without a label in {label_dir}: "
                        + ", ".join(str(images[c]) for c in no_label[:5]))
    no_image = sorted(set(labels) - set(images))
    if no_image:
        raise DataError(f"label(s) without an image in {img_dir}: "
                        + ", ".join(str(labels[c]) for c in no_image[:5]))
    cases = {CASE_TO_ID[c]: (c, images[c], labels[c]) for c in sorted(images)}
    if ids:
        missing = [i for i in ids if i not in cases]
        if missing:
            raise DataError(f"output id(s) {missing} not available in {img_dir.parent}: ids 0-29 stand "
                            f"for cases {list(TRAINING_CASES)}; found {sorted(cases)}")
        return {i: cases[i] for i in ids}
    absent = [c for c in TRAINING_CASES if c not in images]
    if absent:
        log.warning(f"{len(absent)} Synapse training case(s) absent from {img_dir}: {absent}; "
              f"the dataset will be incomplete")
    return cases


def process_case(case: int, image_path: Path, label_path: Path, prep: Preprocessing) -> ProcessedCase:
    image, label, geometry, warnings = read_nifti_pair(image_path, label_path, DATASET)
    check_label_values(label, LABEL_VALUES, label_path)
    result = prepare_scan(image_from_array(image, geometry), label, prep, source=str(image_path))
    height, width = image.shape[1:]
    if (height, width) != (REFERENCE_SIZE, REFERENCE_SIZE):
        bx, by, _ = result.record["border_crop_offset_xyz"]
        warnings.append(f"{image_path}: in-plane size {height}x{width} is not Synapse's 512x512; removed "
                        f"a {by}/{bx}-pixel border (the reference's 32/512 of the field of view) before "
                        f"resampling to {prep.size}x{prep.size}")
    result.record = {"sources": {"image": str(image_path), "label": str(label_path), "synapse_case": case},
                     **result.record}
    result.warnings = warnings + result.warnings
    return result


def sidecar_parameters(prep: Preprocessing) -> dict:
    """The options recorded in preprocessing.json (their names predate the `preprocessing` block; kept
    so that a folder prepared earlier is still recognised as prepared with the same options)."""
    return {"compat": prep.compat, "hu_window": list(prep.window), "border": border_for(REFERENCE_SIZE, prep),
            "reference_size": REFERENCE_SIZE, "out_size": prep.size, "classmap_rule": "reference",
            "min_fg": list(MIN_FGS)}


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m data.prepare_sabs",
        description="Preprocess Synapse/BTCV abdominal CT: window [-125, 275] HU -> [0, 255], 32-px "
                    "border crop, in-plane resampling to 256x256; writes OUT_DIR/sabs_CT_normalized/ "
                    "(ids 0-29) and classmap_1.json.")
    parser.add_argument("raw_dir", type=Path, metavar="RAW_DIR",
                        help="Synapse 'RawData/Training' folder with img/ and label/ (or a folder above it)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="dataset folder, e.g. data/SABS")
    add_common_arguments(parser, "output ids 0-29 to prepare (case 0001 -> 0, ..., 0010 -> 9, 0021 -> 10, "
                                 "..., 0040 -> 29; default: every case found)")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        spec = load_spec(DATASET)
        prep = dataclasses.replace(spec.preprocessing, compat=args.compat)
        cases = find_cases(args.raw_dir, args.ids)
        job = PrepareJob(spec=spec, out_dir=args.out_dir, sources=cases,
                         process=lambda _id, src: process_case(*src, prep),
                         tool="data.prepare_sabs", parameters=sidecar_parameters(prep), min_fgs=MIN_FGS,
                         overwrite=args.overwrite, verify=args.verify,
                         verify_ids=tuple(sorted(cases)) if args.ids else None)
        return run_prepare(job)

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
