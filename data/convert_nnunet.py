"""Convert an nnU-Net v2 raw dataset into this project's dataset layout, prepared as the built-in ones.

    python -m data.convert_nnunet NNUNET_RAW_DATASET_DIR OUT_DIR [--name NAME] [--n-sv N] [--ids ID ...]
        [--overwrite] [--orientation keep|LAS|LPS|...] [--spacing MM] [--z-spacing MM]
        [--region abdomen|cardiac|other] [--compat clean|reference]

Input (nnU-Net v2 "raw" layout): `dataset.json` with `channel_names` ({"0": "CT"} or any other name
for MR), `labels` ({name: value}, background 0 included) and `file_ending` (".nii.gz", ".nrrd",
".mha", ...), the images `imagesTr/<case>_0000<file_ending>` and the labels
`labelsTr/<case><file_ending>`. Single-channel datasets only; region-based labels (a list of values
per name) are not supported.

Output (OUT_DIR, the dataset folder for `training.py with ... dataset=NAME data_dir=OUT_DIR`):

    OUT_DIR/dataset.json                  name, modality, region, labels, preprocessing, defaults
    OUT_DIR/case_ids.json                 nnU-Net case identifier -> our integer scan id
    OUT_DIR/images/image_<id>.nii.gz      prepared image (raw units after the intensity rule)
    OUT_DIR/images/label_<id>.nii.gz      label (the nnU-Net label values)
    OUT_DIR/images/classmap_1.json        class-slice index (per-class voxel count rule)
    OUT_DIR/images/preprocessing.json     provenance: sources, raw geometry, parameters, versions
    OUT_DIR/supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz   3-D supervoxels for ADNet / Q-Net

Rules
-----
- **Scan ids.** When every case identifier ends in digits and those numbers are all different,
  the id is that number (`liver_003` -> 3), so files and cases are easy to relate; otherwise the
  cases get 1..N in sorted identifier order. The rule is applied to every case of imagesTr (also
  with `--ids`), so ids never depend on which cases one run converts; a re-run that would
  renumber existing scans (cases added or renamed) is refused.
- **Intensity**, as the built-in datasets (data/pipeline.py): CT (channel name "CT") is
  windowed to [-125, 275] HU and rescaled to [0, 255] (SABS); anything else is MR, whose top 0.5 %
  is clipped (CHAOS, CMR).
- **Orientation.** `--orientation keep` (default) keeps each scan's axes, as the CMR and SABS
  pipelines do; a warning lists the orientations when the cases disagree. `--orientation LAS`
  (CHAOS's) or any other DICOMOrient code permutes/flips every scan to it (no interpolation).
- **In-plane grid, 256 x 256.** Every scan is resampled to one in-plane spacing s x s, then centre
  cropped/padded to 256 x 256 (the CHAOS/CMR rule, origin corrected). s = `--spacing`, or by default
  the median over all cases of the larger in-plane field of view divided by 256 (rounded to
  0.001 mm): the median scan fills the 256 pixels exactly, larger fields of view are cropped (a
  warning says when labelled voxels are cut), smaller ones padded. One spacing for all scans keeps
  organs at one physical scale, which support/query matching relies on.
- **Slices.** z is kept unless `--z-spacing` is given.
- **Labels** are resampled with the per-class linear > 0.5 rule of the built-in pipelines; their
  values must be those of the nnU-Net dataset.json.
- `--compat clean` (default): float32 interpolation and only samples inside the scan (no empty
  trailing slice); `reference` reproduces the built-in pipelines' quirks (data/README.md).

The command checks everything it can before writing anything (dataset.json, folders, case
pairing, channels, dimensions, label values), converts the scans with the prepare-command runner
of data/prepare.py (atomic paired writes, progress bar, existing scans skipped unless
`--overwrite`, a folder prepared with other options refused), writes dataset.json (keys it does not
produce, e.g. folds or eval_labels added by hand, are kept), generates the supervoxels
(data/pseudolabels.py) and ends with the integrity check of data/verify.py: exit code 1 if it fails.

Each scan goes through the one scan-preparation pipeline, `data.pipeline.prepare_scan`, with the
`preprocessing` block (data.core.specs.Preprocessing) that the conversion writes into dataset.json,
so that scripts/segment.py later prepares new scans of this dataset the same way.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from data.core.cli import add_logging_arguments, run_cli
from data.core.io import DataError, Geometry, check_safe_name, read_geometry, read_volume, write_json
from data.core.specs import Preprocessing, builtin_names, check_orientation, generic_spec
from data.pipeline import (
    COMPAT_MODES,
    CROP_SIZE,
    HU_WINDOW,
    TOP_PERCENTILE,
    ProcessedCase,
    image_from_array,
    orientation_of,
    prepare_scan,
)
from data.prepare import PrepareJob, check_label_values, read_nifti_pair, run_prepare
from data.pseudolabels import generate_pseudolabels
from data.verify import verify_dataset

log = logging.getLogger(__name__)

IMAGE_DIR = "images"
CASE_IDS_NAME = "case_ids.json"
DEFAULT_N_SV = 5000
SUPERPIXEL_THRESHOLD = {"MR": 50.0, "CT": 0.0001}    # as CHAOST2 / SABS (body level of 2-D superpixels)
MIN_FGS = (1,)
REGIONS = ("abdomen", "cardiac", "other")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


# ===================================================================================================
# The nnU-Net v2 raw dataset
# ===================================================================================================
@dataclass(frozen=True)
class NnUNetCase:
    identifier: str
    image: Path
    label: Path


@dataclass(frozen=True)
class NnUNetDataset:
    """What the converter reads from an nnU-Net v2 raw dataset folder."""

    root: Path
    name: str
    modality: str                       # "CT" or "MR"
    channel_name: str
    labels: dict[str, int]
    file_ending: str
    cases: dict[str, NnUNetCase]        # identifier -> files, sorted by identifier


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}. An nnU-Net v2 raw dataset folder holds dataset.json, "
                        f"imagesTr/ and labelsTr/ (e.g. nnUNet_raw/Dataset003_Liver)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _dataset_labels(raw: object, path: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: 'labels' must map label names to integer values, e.g. "
                        f'{{"background": 0, "liver": 1}}')
    labels = {}
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise DataError(f"{path}: label {name!r} is region-based ({value}); only one integer value per "
                            f"label is supported")
        if str(name).lower() == "ignore":
            raise DataError(f"{path}: an 'ignore' label (nnU-Net's sparse annotation) is not supported; the "
                            f"methods and the evaluation need dense labels")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
            raise DataError(f"{path}: label {name!r} has value {value!r}; values must be integers >= 0")
        labels[check_safe_name(str(name), "label name", str(path))] = int(value)
    if 0 not in labels.values():
        raise DataError(f"{path}: 'labels' has no background with value 0 ({labels})")
    if len(set(labels.values())) != len(labels):
        raise DataError(f"{path}: two label names share a value ({labels})")
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def _channel(description: dict, path: Path) -> tuple[str, str]:
    """(channel name, modality) of the single input channel."""
    if "channel_names" not in description:
        if "modality" in description:
            raise DataError(f"{path} is an nnU-Net v1 description ('modality', no 'channel_names'); convert "
                            f"the dataset to v2 first (nnUNetv2_convert_old_nnUNet_dataset)")
        raise DataError(f"{path} has no 'channel_names' (nnU-Net v2: {{\"0\": \"CT\"}} or {{\"0\": \"T2\"}})")
    channels = description["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise DataError(f"{path}: 'channel_names' must be a non-empty mapping, got {channels!r}")
    if len(channels) != 1:
        raise DataError(f"{path}: {len(channels)} input channels {channels}; only single-channel datasets can "
                        f"be converted (the methods segment one image per scan). Make a dataset with the "
                        f"one channel you want (its files renamed to <case>_0000)")
    key, name = next(iter(channels.items()))
    if str(key) not in ("0", "0000"):
        raise DataError(f"{path}: the single channel must be channel 0, got {key!r}")
    return str(name), "CT" if str(name).strip().upper() == "CT" else "MR"


def _default_name(description: dict, root: Path) -> str:
    name = str(description.get("name") or "").strip()
    if not name:
        name = re.sub(r"^Dataset\d+_", "", root.name)
    return re.sub(r"[^A-Za-z0-9_-]", "_", name).upper()


def _find_cases(root: Path, ending: str) -> dict[str, NnUNetCase]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError(f"{folder} not found; an nnU-Net v2 raw dataset has imagesTr/<case>_0000{ending} "
                            f"and labelsTr/<case>{ending}")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    images: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith("."):
            continue
        m = pattern.match(path.name)
        if not m:
            if path.name.endswith(ending):
                raise DataError(f"{path}: not named <case>_<channel:4 digits>{ending} (nnU-Net v2)")
            continue
        if m.group(2) != "0000":
            raise DataError(f"{path}: channel {m.group(2)}; only single-channel datasets (files <case>_0000"
                            f"{ending}) can be converted")
        images[m.group(1)] = path
    if not images:
        raise DataError(f"{images_dir}: no <case>_0000{ending} images (file_ending in dataset.json is {ending!r})")
    labels = {p.name[:-len(ending)]: p for p in sorted(labels_dir.iterdir())
              if p.name.endswith(ending) and not p.name.startswith(".")}
    no_label = [c for c in images if c not in labels]
    if no_label:
        raise DataError(f"{len(no_label)} image(s) without a label: "
                        + ", ".join(f"{images[c].name} needs {labels_dir / (c + ending)}" for c in no_label[:5]))
    no_image = [c for c in labels if c not in images]
    if no_image:
        raise DataError(f"{len(no_image)} label(s) without an image: "
                        + ", ".join(f"{labels[c].name} needs {images_dir / (c + '_0000' + ending)}"
                                    for c in no_image[:5]))
    return {c: NnUNetCase(c, images[c], labels[c]) for c in sorted(images)}


def read_nnunet_dataset(root: str | Path) -> NnUNetDataset:
    """Read and check an nnU-Net v2 raw dataset folder's description and file pairing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"nnU-Net raw dataset folder not found: {root}")
    path = root / "dataset.json"
    description = _read_json(path, "nnU-Net dataset.json")
    channel_name, modality = _channel(description, path)
    labels = _dataset_labels(description.get("labels"), path)
    ending = description.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DataError(f"{path}: 'file_ending' must be the files' extension, e.g. \".nii.gz\"; got {ending!r}")
    cases = _find_cases(root, ending)
    n_training = description.get("numTraining")
    if n_training is not None and int(n_training) != len(cases):
        log.warning("%s says numTraining=%s but imagesTr holds %d case(s)", path, n_training, len(cases))
    return NnUNetDataset(root, _default_name(description, root), modality, channel_name, labels, ending, cases)


def case_id_map(identifiers: Sequence[str]) -> dict[str, int]:
    """Case identifier -> scan id: the trailing number when all have one and they are unique, else 1..N
    in sorted order (see the module docstring)."""
    identifiers = sorted(identifiers)
    numbers = [re.search(r"(\d+)$", c) for c in identifiers]
    if all(numbers) and len({int(m.group(1)) for m in numbers}) == len(identifiers):
        return {c: int(m.group(1)) for c, m in zip(identifiers, numbers)}
    return {c: i for i, c in enumerate(identifiers, start=1)}


# ===================================================================================================
# Checks before anything is written
# ===================================================================================================
def read_headers(dataset: NnUNetDataset) -> dict[str, tuple[tuple[int, int, int], Geometry]]:
    """(z, y, x) shape and geometry of every image; 3-D single-channel images only."""
    headers = {}
    for case in dataset.cases.values():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(case.image))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise DataError(f"cannot read the header of {case.image}: the file is corrupt or not an image") from None
        if reader.GetDimension() == 4 or reader.GetNumberOfComponents() > 1:
            raise DataError(f"{case.image} holds several channels ({reader.GetDimension()}-D, "
                            f"{reader.GetNumberOfComponents()} component(s) per voxel); only single-channel 3-D "
                            f"images can be converted")
        headers[case.identifier] = read_geometry(case.image, what="nnU-Net image")
        if headers[case.identifier][0][0] < 2:
            raise DataError(f"{case.image} has a single slice; a 3-D volume is expected (2-D nnU-Net datasets "
                            f"cannot be converted)")
    return headers


def check_labels(dataset: NnUNetDataset, cases: Sequence[str], headers: dict) -> None:
    """Each label's shape equals its image's and its values are among the dataset's label values."""
    allowed = sorted(dataset.labels.values())
    for identifier in cases:
        case = dataset.cases[identifier]
        label, _ = read_volume(case.label, what="nnU-Net label")
        if label.shape != headers[identifier][0]:
            raise DataError(f"{case.label}: shape (z, y, x) {label.shape} differs from its image "
                            f"{case.image.name} {headers[identifier][0]}")
        try:
            check_label_values(label, allowed, case.label)
        except DataError as err:
            raise DataError(f"{err} (the 'labels' of {dataset.root / 'dataset.json'}: {dataset.labels})") from None


def in_plane_fov(shape_zyx, geometry: Geometry, orientation: str | None) -> tuple[float, float]:
    """(x, y) field of view in mm after reorientation to `orientation` (None: the scan's own axes)."""
    extent = [n * s for n, s in zip(reversed(shape_zyx), geometry.spacing)]       # x, y, z of the file
    if orientation is None:
        return extent[0], extent[1]
    own = orientation_of(geometry.direction)
    pairs = ("RL", "AP", "SI")
    axis_of_pair = {next(i for i, p in enumerate(pairs) if c in p): axis for axis, c in enumerate(own)}
    target = [next(i for i, p in enumerate(pairs) if c in p) for c in orientation]
    return extent[axis_of_pair[target[0]]], extent[axis_of_pair[target[1]]]


def median_spacing(headers: dict, orientation: str | None, size: int = CROP_SIZE) -> float:
    """The default in-plane spacing: median of the larger in-plane field of view / size, 0.001 mm."""
    fovs = [max(in_plane_fov(shape, geometry, orientation)) for shape, geometry in headers.values()]
    return round(float(np.median(fovs)) / size, 3)


def orientation_warning(headers: dict) -> str | None:
    codes: dict[str, int] = {}
    for _, geometry in headers.values():
        code = orientation_of(geometry.direction)
        codes[code] = codes.get(code, 0) + 1
    if len(codes) > 1:
        return (f"the cases have different orientations ({', '.join(f'{c}: {n}' for c, n in sorted(codes.items()))}) "
                f"and --orientation keep leaves them so; pass --orientation LAS (or another code) to bring "
                f"every scan to one")
    return None


def check_existing_ids(out_dir: Path, mapping: dict[str, int]) -> None:
    """Refuse a re-run that would give an existing case another id, or an id to another case."""
    path = out_dir / CASE_IDS_NAME
    if not path.is_file():
        return
    old = _read_json(path, "case id mapping")
    moved = [f"{c}: {old[c]} -> {mapping[c]}" for c in mapping if c in old and old[c] != mapping[c]]
    reused = [f"id {i} was {c!r}" for c, i in old.items() if c not in mapping and i in mapping.values()]
    if moved or reused:
        raise DataError(f"{out_dir} was converted with other case ids ({'; '.join((moved + reused)[:5])}): the "
                        f"cases of the nnU-Net dataset changed. Convert into a new OUT_DIR")


# ===================================================================================================
# Conversion
# ===================================================================================================
def dataset_description(dataset: NnUNetDataset, name: str, region: str, prep: Preprocessing, n_sv: int,
                        existing: dict | None) -> dict:
    """Our dataset.json: the converter's keys over whatever else an existing one holds."""
    produced = {
        "name": name,
        "description": f"nnU-Net dataset {dataset.root.name} (channel {dataset.channel_name!r}) converted by "
                       f"data.convert_nnunet",
        "modality": dataset.modality,
        "region": region,
        "image_dir": IMAGE_DIR,
        "labels": dataset.labels,
        "preprocessing": prep.to_mapping(),
        "defaults": {**(existing or {}).get("defaults", {}), "n_sv": n_sv,
                     "superpixel_threshold": SUPERPIXEL_THRESHOLD[dataset.modality]},
    }
    return {**(existing or {}), **produced}


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise DataError(f"dataset name {name!r} must start with a letter and hold only letters, digits, _ and -; "
                        f"pass --name")
    if name.upper() in (n.upper() for n in builtin_names()):
        raise DataError(f"dataset name {name!r} is a built-in dataset's; pass another --name (the built-in "
                        f"description would be used instead of this dataset.json)")
    return name


def process_case(case: NnUNetCase, name: str, allowed: Sequence[int], prep: Preprocessing) -> ProcessedCase:
    image, label, geometry, warnings = read_nifti_pair(case.image, case.label, name)
    check_label_values(label, allowed, case.label)
    result = prepare_scan(image_from_array(image, geometry), label, prep, source=str(case.image))
    result.record = {"sources": {"image": str(case.image), "label": str(case.label), "case": case.identifier},
                     **result.record}
    result.warnings = warnings + result.warnings
    return result


def convert(nnunet_dir: str | Path, out_dir: str | Path, name: str | None = None, n_sv: int = DEFAULT_N_SV,
            ids: Sequence[int] | None = None, overwrite: bool = False, orientation: str | None = None,
            spacing: float | None = None, z_spacing: float | None = None, region: str = "other",
            compat: str = "clean", progress: bool = True) -> int:
    """Convert, generate supervoxels and verify; returns the exit code (0 ok, 1 verify errors).

    Raises `DataError` for bad inputs, before anything is written where they can be found early.
    """

    out_dir = Path(out_dir)
    dataset = read_nnunet_dataset(nnunet_dir)
    name = check_name(name or dataset.name)
    orientation = check_orientation(orientation, "--orientation")
    if region not in REGIONS:
        raise DataError(f"region must be one of {REGIONS}, got {region!r}")
    if n_sv < 1:
        raise DataError(f"--n-sv must be >= 1, got {n_sv}")
    if compat not in COMPAT_MODES:
        raise DataError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    mapping = case_id_map(list(dataset.cases))
    by_id = {i: c for c, i in mapping.items()}
    if ids:
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise DataError(f"--ids {unknown} are not scan ids of {dataset.root}; its ids are {sorted(by_id)} "
                            f"(see the id rule in `python -m data.convert_nnunet -h`)")
    selected = sorted(set(ids)) if ids else sorted(by_id)
    check_existing_ids(out_dir, mapping)

    headers = read_headers(dataset)
    check_labels(dataset, [by_id[i] for i in selected], headers)
    if orientation is None and (warning := orientation_warning(headers)):
        log.warning(warning)
    in_plane = float(spacing) if spacing else median_spacing(headers, orientation)
    prep = Preprocessing(orientation=orientation, in_plane="spacing", spacing=(in_plane, in_plane),
                         z_spacing=z_spacing, size=CROP_SIZE,
                         intensity="ct_window" if dataset.modality == "CT" else "clip_top",
                         clip_percentile=TOP_PERCENTILE, window=HU_WINDOW, compat=compat)
    prep = Preprocessing.from_mapping(prep.to_mapping(), "the conversion options")     # same checks as a file
    json_path = out_dir / "dataset.json"
    existing = _read_json(json_path, "dataset.json") if json_path.is_file() else None
    description = dataset_description(dataset, name, region, prep, int(n_sv), existing)
    spec = generic_spec(description, str(json_path))
    print(f"{dataset.root.name}: {len(dataset.cases)} case(s), {dataset.modality} (channel "
          f"{dataset.channel_name!r}), labels {dataset.labels}; converting {len(selected)} to {out_dir} as {name}: "
          f"{prep.intensity}, {in_plane:g} x {in_plane:g} mm in-plane, {CROP_SIZE} x {CROP_SIZE}, z "
          f"{'kept' if z_spacing is None else f'{z_spacing:g} mm'}, orientation {orientation or 'kept'}")

    allowed = sorted(dataset.labels.values())
    parameters = {"compat": compat, "preprocessing": prep.to_mapping(), "labels": dataset.labels,
                  "classmap_rule": "count", "min_fg": list(MIN_FGS)}
    job = PrepareJob(spec=spec, out_dir=out_dir, sources={i: dataset.cases[by_id[i]] for i in selected},
                     process=lambda _id, case: process_case(case, name, allowed, prep),
                     tool="data.convert_nnunet", parameters=parameters, min_fgs=MIN_FGS, overwrite=overwrite)
    run_prepare(job)
    for path, content in ((json_path, description), (out_dir / CASE_IDS_NAME, mapping)):
        if not path.is_file() or json.loads(path.read_text()) != content:
            write_json(path, content)
    generate_pseudolabels(out_dir, name, kind="supervoxels", min_size=int(n_sv), ids=selected,
                          overwrite=overwrite, progress=progress)
    report = verify_dataset(out_dir, spec, ids=selected if ids else None)
    print(report.format())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.convert_nnunet",
        description="Convert an nnU-Net v2 raw dataset (dataset.json, imagesTr, labelsTr) into this project's "
                    "layout, prepared as the built-in datasets (CT window or MR top-0.5% clip, 256 x 256 "
                    "in-plane), with supervoxels and the integrity check.",
        epilog="Scan ids: the trailing number of every case identifier when those are unique (liver_003 -> 3), "
               "else 1..N in sorted order; the mapping is written to OUT_DIR/case_ids.json. Then: python "
               "training.py with adnet dataset=NAME data_dir=OUT_DIR. See README.md, 'Bring your own data'.")
    parser.add_argument("nnunet_dir", type=Path, metavar="NNUNET_RAW_DATASET_DIR",
                        help="an nnU-Net v2 raw dataset folder, e.g. nnUNet_raw/Dataset003_Liver")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="dataset folder to write, e.g. data/LIVER")
    parser.add_argument("--name", help="dataset name (default: dataset.json's name, or the folder name "
                                       "without DatasetNNN_, upper-cased)")
    parser.add_argument("--n-sv", type=int, default=DEFAULT_N_SV, metavar="N",
                        help=f"supervoxel minimum size in voxels (default {DEFAULT_N_SV}, as CHAOS/SABS; CMR uses 1000)")
    parser.add_argument("--ids", type=int, nargs="+", metavar="ID", help="convert only these scan ids")
    parser.add_argument("--overwrite", action="store_true",
                        help="re-create scans (and their supervoxels) that already exist (default: skip them)")
    parser.add_argument("--orientation", default="keep",
                        help="keep (default: each scan's own axes) or a DICOMOrient code such as LAS or LPS")
    parser.add_argument("--spacing", type=float, metavar="MM",
                        help="in-plane spacing of the 256 x 256 grid (default: median field of view / 256)")
    parser.add_argument("--z-spacing", type=float, metavar="MM", help="resample slices to this spacing "
                                                                      "(default: keep each scan's)")
    parser.add_argument("--region", choices=REGIONS, default="other",
                        help="body region; selects per-region method defaults (default: other)")
    parser.add_argument("--compat", choices=COMPAT_MODES, default="clean",
                        help="clean (default): float32 interpolation, no empty trailing slice; reference: the "
                             "built-in pipelines' quirks (data/README.md)")
    add_logging_arguments(parser)       # -q also hides the supervoxel progress bar
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for option, value in (("--spacing", args.spacing), ("--z-spacing", args.z_spacing)):
        if value is not None and not value > 0:
            build_parser().error(f"{option} must be > 0 mm, got {value}")
    return run_cli(lambda: convert(args.nnunet_dir, args.out_dir, args.name, args.n_sv, args.ids, args.overwrite,
                                   args.orientation, args.spacing, args.z_spacing, args.region, args.compat,
                                   progress=args.log_level != "WARNING"), args)


if __name__ == "__main__":
    raise SystemExit(main())
