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

Steps (reference: SSL-ALPNet `data/SABS/{intensity_normalization, resampling_and_roi}.ipynb`):
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
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from data.io import DataError, Geometry
from data.preprocessing import (CROP_SIZE, HU_WINDOW, PrepareJob, ProcessedCase, add_common_arguments,
                                border_crop, check_label_values, hu_window, image_from_array,
                                label_output_dtype, read_nifti_pair, resample_image, resample_label,
                                run_cli, run_prepare, shift_origin, volume_change_warnings)

DATASET = "SABS"
TRAINING_CASES = tuple(range(1, 11)) + tuple(range(21, 41))
CASE_TO_ID = {case: i for i, case in enumerate(TRAINING_CASES)}
REFERENCE_SIZE = 512
REFERENCE_BORDER = 32
LABEL_VALUES = tuple(range(14))
MIN_FGS = (1,)

_IMAGE_RE = re.compile(r"^img(\d+)\.nii(\.gz)?$")
_LABEL_RE = re.compile(r"^label(\d+)\.nii(\.gz)?$")


def border_for(length: int) -> int:
    """Border removed from each side of an in-plane axis: 32 px of 512, the same fraction otherwise."""
    if length == REFERENCE_SIZE:
        return REFERENCE_BORDER
    return int(round(length * REFERENCE_BORDER / REFERENCE_SIZE))


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
        print(f"warning: {len(absent)} Synapse training case(s) absent from {img_dir}: {absent}; "
              f"the dataset will be incomplete")
    return cases


def process_case(case: int, image_path: Path, label_path: Path, compat: str) -> ProcessedCase:
    image, label, geometry, warnings = read_nifti_pair(image_path, label_path, DATASET)
    check_label_values(label, LABEL_VALUES, label_path)
    windowed = hu_window(image, HU_WINDOW, compat, source=str(image_path))
    height, width = image.shape[1:]
    by, bx = border_for(height), border_for(width)
    if (height, width) != (REFERENCE_SIZE, REFERENCE_SIZE):
        warnings.append(f"{image_path}: in-plane size {height}x{width} is not Synapse's 512x512; removed "
                        f"a {by}/{bx}-pixel border (the reference's 32/512 of the field of view) before "
                        f"resampling to {CROP_SIZE}x{CROP_SIZE}")
    cropped_geometry = shift_origin(geometry, (bx, by, 0))
    cropped_label = border_crop(label, by, bx)
    sx, sy, sz = geometry.spacing
    # (512 - 2*32) / 256 = 1.75 for Synapse, computed in the reference's order
    new_spacing = (sx * ((width - 2 * bx) / CROP_SIZE), sy * ((height - 2 * by) / CROP_SIZE), sz)
    size, origin = None, None
    if compat == "clean":
        # 256 output pixels tile the cropped field of view exactly: pixel centres at (i + 0.5) * r - 0.5
        # in input pixels (r = 1.75 for Synapse), all inside the input; z keeps its slices.
        size = (CROP_SIZE, CROP_SIZE, image.shape[0])
        ratios = (new_spacing[0] / sx, new_spacing[1] / sy, 1.0)
        origin = shift_origin(cropped_geometry, [(r - 1) / 2 for r in ratios]).origin
    resampled = resample_image(image_from_array(border_crop(windowed, by, bx), cropped_geometry),
                               new_spacing, compat, size, origin)
    out_image = sitk.GetArrayFromImage(resampled)
    out_label = resample_label(cropped_label, cropped_geometry, new_spacing, compat, size, origin)
    full_size = list(resampled.GetSize())
    if min(out_image.shape[1:]) < CROP_SIZE:
        raise AssertionError(f"{image_path}: resampled in-plane size {out_image.shape[1:]} < {CROP_SIZE}")
    # reference: the SSL-ALPNet loader's [:256, :256]; it drops only the zero row/column past the extent
    out_image = out_image[:, :CROP_SIZE, :CROP_SIZE]
    out_label = out_label[:, :CROP_SIZE, :CROP_SIZE]
    warnings += volume_change_warnings(cropped_label, cropped_geometry.spacing, out_label,
                                       resampled.GetSpacing(), str(label_path))
    record = {
        "sources": {"image": str(image_path), "label": str(label_path), "synapse_case": case},
        "raw_size_xyz": [width, height, image.shape[0]],
        "raw_spacing_xyz": list(geometry.spacing),
        "raw_origin_xyz": list(geometry.origin),
        "direction": list(geometry.direction),
        "hu_window": list(HU_WINDOW),
        "clipped_min_max_hu": [float(max(image.min(), HU_WINDOW[0])), float(min(image.max(), HU_WINDOW[1]))],
        "border_crop_offset_xyz": [bx, by, 0],
        "resampled_spacing_xyz": list(resampled.GetSpacing()),
        "resampled_size_xyz": full_size,
        "kept_size_xyz": [CROP_SIZE, CROP_SIZE, out_image.shape[0]],
        "output_shape_zyx": list(out_image.shape),
    }
    image_dtype = np.float64 if compat == "reference" else np.float32
    return ProcessedCase(out_image.astype(image_dtype), out_label.astype(label_output_dtype(out_label, compat)),
                         Geometry.of(resampled), record, warnings)


def main(argv: Sequence[str] | None = None) -> int:
    from dataloaders.specs import load_spec

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
    args = parser.parse_args(argv)

    def body() -> int:
        spec = load_spec(DATASET)
        cases = find_cases(args.raw_dir, args.ids)
        parameters = {"compat": args.compat, "hu_window": list(HU_WINDOW), "border": REFERENCE_BORDER,
                      "reference_size": REFERENCE_SIZE, "out_size": CROP_SIZE,
                      "classmap_rule": "reference", "min_fg": list(MIN_FGS)}
        job = PrepareJob(spec=spec, out_dir=args.out_dir, sources=cases,
                         process=lambda _id, src: process_case(*src, args.compat),
                         tool="data.prepare_sabs", parameters=parameters, min_fgs=MIN_FGS,
                         overwrite=args.overwrite, verify=args.verify,
                         verify_ids=tuple(sorted(cases)) if args.ids else None)
        return run_prepare(job)

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
