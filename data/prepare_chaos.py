"""CHAOS T2-SPIR (abdominal MRI): raw challenge DICOM + PNG ground truth -> normalised NIfTI.

    python -m data.prepare_chaos RAW_MR_DIR OUT_DIR [--ids ID ...] [--overwrite] [--compat reference|clean] [--verify]

RAW_MR_DIR is the challenge's `CHAOS_Train_Sets/Train_Sets/MR` folder (or a folder above it), with
`<id>/T2SPIR/DICOM_anon/*.dcm` (one axial slice per file) and `<id>/T2SPIR/Ground/*.png` (one 8-bit
mask per slice, same file stem). OUT_DIR is the dataset folder (e.g. data/CHAOST2); the scans go to
`OUT_DIR/chaos_MR_T2_normalized/image_<id>.nii.gz` / `label_<id>.nii.gz` with the CHAOS ids, next to
`classmap_{1,100,400}.json` (sum rule, see data/classmap.py) and `preprocessing.json` (provenance).

Steps (reference: SSL-ALPNet / Q-Net `data/CHAOST2/{dcm_img_to_nii.sh, png_gth_to_nii.ipynb,
image_normalize.ipynb}`):
1. DICOM -> volume. The reference runs the legacy `dcm2nii`; here SimpleITK reads an explicitly
   sorted file list: headers first, sorted by the projection of ImagePositionPatient on the slice
   normal (inferior to superior for axial slices), after checking that all slices share
   ImageOrientationPatient and size and lie at distinct, uniformly spaced positions (1e-3 relative).
   The integer pixel type is kept (int16, as dcm2nii writes), because the resampling truncates
   integer images and the published volumes are integer-valued.
2. PNG -> label. Every DICOM file is paired with the PNG of the same stem (the reference stacks the
   PNGs by instance number and assumes that equals the slice order). Values are mapped by the
   official CHAOS ranges: 0 -> 0, 55-70 -> 1 liver, 110-135 -> 2 right kidney, 175-200 -> 3 left
   kidney, 240-255 -> 4 spleen; any other value is an error. (The reference maps the sorted unique
   values to 0, 1, 2, ... by rank, which shifts ids when an organ is missing.) The stack is placed on
   the native DICOM grid, so it is reoriented with the image in step 3, which for CHAOS's axial
   slices is exactly the reference's row flip of the PNG stack.
3. The scan-preparation pipeline (data/pipeline.py) with CHAOS's `preprocessing` block
   (configs/datasets/chaost2.yaml) and the command's --compat: reorient to LAS with DICOMOrient,
   which flips the rows and reproduces dcm2nii's layout (direction diag(1, -1, 1); columns toward
   patient left, rows toward anterior, slices toward superior); clip the top 0.5 % of intensities;
   resample image and label to 1.25 x 1.25 x 7.70 mm; centre crop/pad to 256 x 256, with the origin
   correction the reference omits.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import SimpleITK as sitk

from data.core.cli import add_logging_arguments, run_cli
from data.core.io import DataError
from data.core.specs import Preprocessing, load_spec
from data.pipeline import ProcessedCase, prepare_scan
from data.prepare import PrepareJob, add_common_arguments, run_prepare

log = logging.getLogger(__name__)

DATASET = "CHAOST2"
MIN_FGS = (1, 100, 400)
# (low, high, class id) of the official CHAOS ground-truth grey values
PNG_RANGES = ((0, 0, 0), (55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
SPACING_RTOL = 1e-3
IOP_ATOL = 1e-4

_POSITION_TAG = "0020|0032"
_ORIENTATION_TAG = "0020|0037"


# --------------------------------------------------------------------------------------- DICOM
@dataclass(frozen=True)
class DicomSlice:
    path: Path
    position: tuple[float, float, float]       # ImagePositionPatient, mm (LPS)
    orientation: tuple[float, ...]             # ImageOrientationPatient: row then column cosines
    size: tuple[int, int]                      # (columns, rows)


def _parse_floats(text: str, n: int, tag: str, path: Path) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.strip().split("\\"))
    except ValueError:
        values = ()
    if len(values) != n:
        raise DataError(f"DICOM {path}: tag {tag} is {text!r}, expected {n} numbers")
    return values


def read_slice_header(path: Path) -> DicomSlice:
    """Read one DICOM file's header (no pixels): position, orientation, size."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise DataError(f"cannot read DICOM {path}: the file is corrupt, truncated or not DICOM. "
                        f"Re-extract it from the CHAOS archive.") from None
    for tag, name in ((_POSITION_TAG, "ImagePositionPatient"), (_ORIENTATION_TAG, "ImageOrientationPatient")):
        if not reader.HasMetaDataKey(tag):
            raise DataError(f"DICOM {path} has no {name} ({tag}); the slice cannot be placed in the volume")
    size = reader.GetSize()
    if len(size) == 3 and size[2] != 1:
        raise DataError(f"DICOM {path} holds {size[2]} frames; CHAOS has one slice per file")
    return DicomSlice(path,
                      _parse_floats(reader.GetMetaData(_POSITION_TAG), 3, "ImagePositionPatient", path),
                      _parse_floats(reader.GetMetaData(_ORIENTATION_TAG), 6, "ImageOrientationPatient", path),
                      (int(size[0]), int(size[1])))


def sort_slices(slices: Sequence[DicomSlice], folder: Path) -> list[DicomSlice]:
    """Slices in ascending position along the slice normal, after checking that they form one volume."""
    if len(slices) < 2:
        raise DataError(f"{folder}: {len(slices)} DICOM file(s); a volume needs at least 2 slices")
    # compare with the most common value, so that the message names the odd file out
    orientations = [tuple(np.round(s.orientation, 4)) for s in slices]
    usual_orientation = max(set(orientations), key=orientations.count)
    sizes = [s.size for s in slices]
    usual_size = max(set(sizes), key=sizes.count)
    for s in slices:
        if not np.allclose(s.orientation, usual_orientation, atol=IOP_ATOL):
            raise DataError(f"DICOM {s.path}: ImageOrientationPatient {s.orientation} differs from "
                            f"{usual_orientation} of the other slices; the folder mixes series")
        if s.size != usual_size:
            raise DataError(f"DICOM {s.path}: size {s.size} differs from {usual_size} of the other "
                            f"slices; the folder mixes series")
    first = slices[0]
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    depth = np.array([np.dot(s.position, normal) for s in slices])
    order = np.argsort(depth, kind="stable")
    ordered = [slices[i] for i in order]
    gaps = np.diff(depth[order])
    spacing = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        a, b = ordered[k].path.name, ordered[k + 1].path.name
        if gap <= SPACING_RTOL * max(spacing, 1e-6):
            raise DataError(f"{folder}: {a} and {b} lie at the same slice position; the folder holds "
                            f"duplicate slices or two series")
        if abs(gap - spacing) > SPACING_RTOL * spacing:
            raise DataError(f"{folder}: slice gap {gap:.4f} mm between {a} and {b} differs from the "
                            f"typical {spacing:.4f} mm; slices are missing or the spacing is not uniform")
    return ordered


def dicom_files(folder: Path) -> list[Path]:
    """The slice files of a DICOM_anon folder: its *.dcm files, or every visible file if none is named so."""
    if not folder.is_dir():
        raise DataError(f"DICOM folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    dcm = [p for p in files if p.suffix.lower() == ".dcm"]
    if not files:
        raise DataError(f"{folder}: no DICOM files")
    return dcm or files


def read_dicom_series(folder: Path) -> tuple[sitk.Image, list[Path]]:
    """Read the DICOM slices of `folder` as one native (LPS-ordered) volume, sorted by position."""
    ordered = sort_slices([read_slice_header(p) for p in dicom_files(folder)], folder)
    paths = [s.path for s in ordered]
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(p) for p in paths])
    try:
        image = reader.Execute()
    except RuntimeError:
        for p in paths:                               # find the file the series reader choked on
            try:
                sitk.ReadImage(str(p), imageIO="GDCMImageIO")
            except RuntimeError:
                raise DataError(f"cannot read the pixels of DICOM {p}: the file is corrupt or "
                                f"truncated. Re-extract the CHAOS archive.") from None
        raise DataError(f"{folder}: SimpleITK cannot read the sorted series") from None
    return image, paths


def as_int16(image: sitk.Image, source: str) -> sitk.Image:
    """Integer images as int16, as dcm2nii writes them (values must fit)."""
    integer = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32)
    if image.GetPixelID() == sitk.sitkInt16 or image.GetPixelID() not in integer:
        return image
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    if stats.GetMinimum() < -32768 or stats.GetMaximum() > 32767:
        raise DataError(f"{source}: intensities {stats.GetMinimum():g}..{stats.GetMaximum():g} do not fit int16")
    return sitk.Cast(image, sitk.sitkInt16)


# --------------------------------------------------------------------------------------- PNG labels
def png_lookup() -> np.ndarray:
    """256-entry table grey value -> class id, 255 for values outside every CHAOS range."""
    lut = np.full(256, 255, np.uint8)
    for low, high, class_id in PNG_RANGES:
        lut[low:high + 1] = class_id
    return lut


def read_png_label(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """One ground-truth PNG as class ids (rows, cols), validated."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DataError(f"cannot read PNG {path}: the file is corrupt or not a PNG")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        channels = 1 if mask.ndim == 2 else mask.shape[2]
        raise DataError(f"PNG {path} is {channels}-channel {mask.dtype}; CHAOS ground truth is "
                        f"single-channel 8-bit grey")
    if mask.shape != shape:
        raise DataError(f"PNG {path} is {mask.shape[0]}x{mask.shape[1]} (rows x cols) but its DICOM "
                        f"slice is {shape[0]}x{shape[1]}")
    ids = png_lookup()[mask]
    if (ids == 255).any():
        bad = np.unique(mask[ids == 255])
        raise DataError(f"PNG {path} has grey values {bad[:10].tolist()} outside the CHAOS ranges "
                        f"(0; 55-70 liver; 110-135 right kidney; 175-200 left kidney; 240-255 spleen)")
    return ids


def read_ground_truth(ground: Path, dicom_paths: Sequence[Path], shape: tuple[int, int]) -> np.ndarray:
    """(z, rows, cols) class ids, slice k from the PNG with the stem of `dicom_paths[k]`."""
    if not ground.is_dir():
        raise DataError(f"ground-truth folder not found: {ground}")
    pngs = {p.stem: p for p in ground.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")}
    stems = [p.stem for p in dicom_paths]
    missing = [s for s in stems if s not in pngs]
    extra = sorted(set(pngs) - set(stems))
    if missing or extra:
        parts = [f"{ground}: {len(pngs)} PNG(s) for {len(stems)} DICOM slice(s)"]
        if missing:
            parts.append("no PNG for " + ", ".join(f"{s}.dcm" for s in missing[:5]))
        if extra:
            parts.append("no DICOM for " + ", ".join(pngs[s].name for s in extra[:5]))
        raise DataError("; ".join(parts) + ". Each slice needs the PNG of the same file name.")
    return np.stack([read_png_label(pngs[s], shape) for s in stems])


# --------------------------------------------------------------------------------------- subjects
def find_mr_root(raw_dir: Path) -> Path:
    """The folder holding the subject folders `<id>/T2SPIR`, given it or an ancestor in the archive."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise DataError(f"raw CHAOS folder not found: {raw_dir}")
    for candidate in (raw_dir, raw_dir / "MR", raw_dir / "Train_Sets" / "MR",
                      raw_dir / "CHAOS_Train_Sets" / "Train_Sets" / "MR"):
        if candidate.is_dir() and any((d / "T2SPIR").is_dir() for d in candidate.iterdir() if d.is_dir()):
            return candidate
    raise DataError(f"{raw_dir} holds no <id>/T2SPIR folders; pass the CHAOS "
                    f"'CHAOS_Train_Sets/Train_Sets/MR' folder (see data/README.md)")


def find_subjects(raw_dir: Path, ids: Sequence[int] | None, expected: Sequence[int]) -> dict[int, Path]:
    """{id: <id>/T2SPIR folder}: the requested ids, or every expected id present."""
    root = find_mr_root(raw_dir)
    found = {int(d.name): d / "T2SPIR" for d in root.iterdir()
             if d.is_dir() and d.name.isdigit() and (d / "T2SPIR").is_dir()}
    if ids:
        missing = [i for i in ids if i not in found]
        if missing:
            raise DataError(f"{root}: no T2SPIR folder for subject(s) {missing}; found {sorted(found)}")
        chosen = {i: found[i] for i in ids}
    else:
        ignored = sorted(set(found) - set(expected))
        if ignored:
            log.warning(f"ignoring subject folder(s) {ignored} in {root}: not CHAOS training ids")
        absent = sorted(set(expected) - set(found))
        if absent:
            log.warning(f"{len(absent)} CHAOS subject(s) absent from {root}: {absent}; the dataset "
                  f"will be incomplete")
        chosen = {i: found[i] for i in sorted(found) if i in expected}
    for i, folder in chosen.items():
        for sub in ("DICOM_anon", "Ground"):
            if not (folder / sub).is_dir():
                raise DataError(f"subject {i}: folder {folder / sub} not found")
    if not chosen:
        raise DataError(f"{root}: no CHAOS subjects to prepare")
    return chosen


def read_subject(t2spir: Path) -> tuple[sitk.Image, np.ndarray, list[Path]]:
    """The native (DICOM-ordered) int16 image, its (z, y, x) class-id label on the same grid, and the
    DICOM files in slice order."""
    native, paths = read_dicom_series(t2spir / "DICOM_anon")
    native = as_int16(native, str(t2spir / "DICOM_anon"))
    cols, rows = native.GetSize()[:2]
    label = read_ground_truth(t2spir / "Ground", paths, (rows, cols))
    return native, label, paths


def process_subject(t2spir: Path, prep: Preprocessing) -> ProcessedCase:
    image, label, paths = read_subject(t2spir)
    case = prepare_scan(image, label, prep, source=str(t2spir))
    sources = {"dicom_dir": str(t2spir / "DICOM_anon"), "ground_dir": str(t2spir / "Ground"),
               "dicom_files_in_slice_order": [p.name for p in paths],
               "label_files": "the PNG of each DICOM file's stem in ground_dir"}
    case.record = {"sources": sources, **case.record}
    return case


def sidecar_parameters(prep: Preprocessing) -> dict:
    """The options recorded in preprocessing.json (their names predate the `preprocessing` block; kept
    so that a folder prepared earlier is still recognised as prepared with the same options)."""
    return {"compat": prep.compat, "orientation": prep.orientation,
            "target_spacing": [*prep.spacing, prep.z_spacing], "clip_percentile": prep.clip_percentile,
            "crop_size": prep.size, "png_ranges": [list(r) for r in PNG_RANGES],
            "classmap_rule": "reference", "min_fg": list(MIN_FGS)}


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m data.prepare_chaos",
        description="Preprocess CHAOS T2-SPIR from the raw challenge DICOM/PNG files: LAS volumes, "
                    "top 0.5% clip, 1.25x1.25x7.70 mm, 256x256; writes OUT_DIR/chaos_MR_T2_normalized/ "
                    "and the class-slice index classmap_{1,100,400}.json.")
    parser.add_argument("raw_dir", type=Path, metavar="RAW_MR_DIR",
                        help="CHAOS 'CHAOS_Train_Sets/Train_Sets/MR' folder (or a folder above it)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="dataset folder, e.g. data/CHAOST2")
    add_common_arguments(parser, "CHAOS subject ids to prepare (default: every training subject found)")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        spec = load_spec(DATASET)
        prep = dataclasses.replace(spec.preprocessing, compat=args.compat)
        subjects = find_subjects(args.raw_dir, args.ids, spec.expected_ids)
        job = PrepareJob(spec=spec, out_dir=args.out_dir, sources=subjects,
                         process=lambda _id, folder: process_subject(folder, prep),
                         tool="data.prepare_chaos", parameters=sidecar_parameters(prep),
                         min_fgs=MIN_FGS, overwrite=args.overwrite, verify=args.verify,
                         verify_ids=tuple(sorted(subjects)) if args.ids else None)
        return run_prepare(job)

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
