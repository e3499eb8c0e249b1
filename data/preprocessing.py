"""Preprocessing primitives shared by the CHAOS, SABS and CMR pipelines, and the prepare-command runner.

Every step follows the reference preprocessing of SSL-ALPNet / Q-Net (the notebooks under their
`data/` folders; ../shared/reference/preprocessing.md is our description of them). Arrays are
SimpleITK-ordered (z, y, x); spacing, origin and direction are SimpleITK's (x, y, z) values in LPS.

Reference behaviour and where this module deliberately differs
----------------------------------------------------------------
- `clip_top_percentile`: voxels above the 99.5th percentile (NumPy's default linear interpolation,
  whole volume, background included) are set to it, in the array's own dtype, so an integer image is
  capped at the truncated percentile. No lower clip.
- `hu_window`: clip to [-125, 275] HU, then min-max to [0, 255] with the *actual* minimum and maximum
  of the clipped volume (`compat="reference"`; normally exactly -125 and 275). `compat="clean"`
  maps the window endpoints themselves to 0 and 255, so a volume without air still maps consistently.
- `resample_image`: linear interpolation, output origin and direction equal to the input's. In
  `compat="reference"` the output size per axis is int(size * spacing / new_spacing + 1) -- one
  voxel more than the extent when the ratio is exact, and that trailing voxel lies outside the input,
  so it is 0 -- and the pixel type is kept, so integer images are truncated toward zero after
  interpolation. `compat="clean"` keeps only the samples that fall inside the input,
  ceil((size - 0.5) * ratio) -- ITK returns 0 from half a voxel past the last centre on, so even
  round(size * ratio) would end in an empty slice when up-sampling -- and interpolates in float32.
- `resample_label`: for every label value in ascending order, the binary mask is resampled
  linearly (float32) and the value written where the interpolated mask exceeds 0.5 (the reference's
  np.rint), so higher ids win where masks overlap and a voxel no class claims stays 0. This is not
  nearest-neighbour resampling. Same sizing rule as the image.
- `centre_crop_or_pad`: in-plane centre crop/pad to 256 x 256 around floor(L/2); z is never
  touched; pad value = the image minimum, 0 for labels. **Deliberate difference:** the reference
  leaves the origin unchanged after the crop (and after SABS's border crop), so its outputs are
  shifted in world coordinates. Here the origin is always moved by direction . (offset * spacing),
  so every voxel keeps its world position, and the offsets are recorded in the sidecar JSON. Voxel
  values are unaffected; no compat switch is offered because nothing downstream reads the old origin.
- Outputs: the reference writes float64 images and labels; `compat="reference"` does the same,
  `compat="clean"` writes float32 images and uint8/uint16 labels.

Raw NIfTI inputs (`read_nifti_pair`) must pair up exactly (shape; geometry within 1e-4); like every
file they are read with `data.io.read_volume`, which refuses truncated files and NaN/inf voxels.

Provenance: each dataset's image folder holds `preprocessing.json` (`SIDECAR_NAME`) with the command,
its parameters, the package versions and, per scan, the source files, the raw geometry, the clip
cap, the resampled size and the crop/pad offsets.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from data.classmap import build_classmaps, write_classmaps
from data.io import DataError, Geometry, atomic_path, read_volume, write_volume

if TYPE_CHECKING:
    from dataloaders.specs import DatasetSpec

COMPAT_MODES = ("reference", "clean")
CROP_SIZE = 256
TOP_PERCENTILE = 99.5
HU_WINDOW = (-125.0, 275.0)
SIDECAR_NAME = "preprocessing.json"
SIDECAR_FORMAT = 1


def check_compat(compat: str) -> str:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    return compat


# --------------------------------------------------------------------------------------- intensity
def clip_top_percentile(array: np.ndarray, percentile: float = TOP_PERCENTILE) -> tuple[np.ndarray, float]:
    """Cap `array` at its `percentile`-th percentile; returns (capped copy, cap actually applied).

    The cap is assigned in the array's dtype (as the reference does), so for integer arrays it is
    the percentile truncated toward zero.
    """
    p = float(np.percentile(array, percentile))
    out = np.array(array, copy=True)
    cap = np.asarray(p).astype(out.dtype)        # the value the assignment below really stores
    out[out > p] = cap
    return out, cap.item()


def hu_window(array: np.ndarray, window: tuple[float, float] = HU_WINDOW, compat: str = "reference",
              source: str = "image") -> np.ndarray:
    """Clip CT values to `window` (HU) and rescale to [0, 255] as float64."""
    check_compat(compat)
    lo, hi = (float(w) for w in window)
    clipped = np.clip(array.astype(np.float64), lo, hi)
    if compat == "reference":
        lo, hi = float(clipped.min()), float(clipped.max())
    if not hi > lo:
        raise DataError(f"{source}: every voxel lies at or beyond the same end of the HU window "
                        f"{window} (constant value {lo:g} after clipping); is this a CT volume in HU?")
    return (clipped - lo) / (hi - lo) * 255.0


# --------------------------------------------------------------------------------------- resampling
def resampled_size(size: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float],
                   compat: str = "reference") -> tuple[int, ...]:
    """Output size (x, y, z) for resampling `size` voxels of `spacing` to `new_spacing`.

    reference: int(size * (spacing / new_spacing) + 1), computed in that order in float64 like the
    notebooks; ceil(size * ratio), and one more voxel whenever size * ratio is an integer.

    clean: as many samples as lie inside the input, ceil((size - 0.5) * ratio). ITK's linear
    resampler returns the default value 0 for any sample at or beyond continuous index size - 0.5
    (half a voxel past the last centre), so the reference's extra samples, and even round(size *
    ratio) samples when up-sampling, would end in an all-zero slice or column.
    """
    check_compat(compat)
    ratio = np.asarray(spacing, np.float64) * 1.0 / np.asarray(new_spacing, np.float64)
    size = np.asarray(size, np.float64)
    if compat == "reference":
        return tuple(int(s + 1) for s in size * ratio)
    # the tolerance keeps float noise in the ratio from adding a sample exactly at size - 0.5
    return tuple(max(1, int(np.ceil(s - 1e-6))) for s in (size - 0.5) * ratio)


def resample_image(image: sitk.Image, new_spacing: Sequence[float], compat: str = "reference",
                   size: Sequence[int] | None = None, origin: Sequence[float] | None = None) -> sitk.Image:
    """Linear resampling to `new_spacing` on a grid with the input's direction.

    The output grid starts at the input's origin unless `origin` is given; `size` overrides the
    sizing rule. reference keeps the pixel type (integer images are truncated toward zero); clean
    interpolates in float32.
    """
    check_compat(compat)
    new_spacing = tuple(float(s) for s in new_spacing)
    if size is None:
        size = resampled_size(image.GetSize(), image.GetSpacing(), new_spacing, compat)
    if compat == "clean" and image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Cast(image, sitk.sitkFloat32)
    origin = image.GetOrigin() if origin is None else tuple(float(o) for o in origin)
    # Outside the input, ITK returns the default value 0: that is the reference's trailing zero slice.
    return sitk.Resample(image, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear,
                         origin, new_spacing, image.GetDirection(), 0.0, image.GetPixelID())


def paint_labels(indicators: Iterable[tuple[float, np.ndarray]]) -> np.ndarray:
    """Label map (float64) from interpolated class indicators given in ascending value order.

    Each value is written where its indicator exceeds 0.5 (the reference's np.rint: 0.5 rounds to
    even, i.e. 0), so a later, higher value wins where indicators overlap, and a voxel that no class
    claims stays 0. (Indicators interpolated from one label map sum to 1, so two of them can only
    exceed 0.5 together when they come from separately resampled masks.)
    """
    out = None
    for value, indicator in indicators:
        if out is None:
            out = np.zeros(indicator.shape, np.float64)
        out[indicator > 0.5] = value
    if out is None:
        raise ValueError("no label indicators given")
    return out


def resample_label(label: np.ndarray, geometry: Geometry, new_spacing: Sequence[float],
                   compat: str = "reference", size: Sequence[int] | None = None,
                   origin: Sequence[float] | None = None) -> np.ndarray:
    """Resample a (z, y, x) label map: per value, linear mask > 0.5, higher values win; float64.

    `geometry` is the label's (normally the image's) geometry; the output grid is the one
    `resample_image` produces for the same geometry, spacing, `size` and `origin`.
    """
    def indicators():
        for value in np.unique(label):
            mask = geometry.apply_to(sitk.GetImageFromArray((label == value).astype(np.float32)))
            # the mask is float32 in both modes, as in the reference, so only the grid rule differs
            yield value, sitk.GetArrayFromImage(resample_image(mask, new_spacing, compat, size, origin))

    return paint_labels(indicators())


# --------------------------------------------------------------------------------------- geometry
def shift_origin(geometry: Geometry, index_offset_xyz: Sequence[float]) -> Geometry:
    """Geometry of a sub-grid whose voxel 0 is voxel `index_offset_xyz` of `geometry`'s grid.

    origin' = origin + direction . (offset * spacing), so world coordinates are preserved.
    """
    direction = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    step = np.asarray(index_offset_xyz, np.float64) * np.asarray(geometry.spacing, np.float64)
    origin = np.asarray(geometry.origin, np.float64) + direction @ step
    return Geometry(tuple(geometry.spacing), tuple(float(o) for o in origin), tuple(geometry.direction))


def centre_offset(length: int, target: int = CROP_SIZE) -> int:
    """Input index of output index 0 for the reference centre crop/pad of one axis.

    The reference centres a (target + 1) buffer, whose half size is (target + 1) // 2, on
    floor(length / 2), then keeps the first `target` entries; for both crop and pad this makes
    output[j] = input[j + offset] with offset = floor(length / 2) - (target + 1) // 2.
    """
    return length // 2 - (target + 1) // 2


def centre_crop_or_pad(array: np.ndarray, target: int = CROP_SIZE, pad_value: float = 0.0,
                       dtype=np.float64) -> tuple[np.ndarray, tuple[int, int]]:
    """In-plane centre crop/pad of a (z, y, x) array to (z, target, target).

    Returns the new array and the offsets (offset_y, offset_x): output[:, j, i] equals
    input[:, j + offset_y, i + offset_x] wherever that index exists; elsewhere `pad_value`.
    """
    if array.ndim != 3:
        raise ValueError(f"centre_crop_or_pad expects (z, y, x), got shape {array.shape}")
    offsets = tuple(centre_offset(n, target) for n in array.shape[1:])
    out = np.full((array.shape[0], target, target), pad_value, dtype=dtype)
    src, dst = [slice(None)], [slice(None)]
    for length, off in zip(array.shape[1:], offsets):
        start, stop = max(0, off), min(length, off + target)
        src.append(slice(start, stop))
        dst.append(slice(start - off, stop - off))
    out[tuple(dst)] = array[tuple(src)]
    return out, (offsets[0], offsets[1])


def border_crop(array: np.ndarray, border_y: int, border_x: int) -> np.ndarray:
    """Remove `border_y` rows and `border_x` columns from each in-plane side of a (z, y, x) array."""
    if 2 * border_y >= array.shape[1] or 2 * border_x >= array.shape[2]:
        raise ValueError(f"border ({border_y}, {border_x}) leaves nothing of in-plane size {array.shape[1:]}")
    return array[:, border_y:array.shape[1] - border_y, border_x:array.shape[2] - border_x]


def image_from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    return geometry.apply_to(sitk.GetImageFromArray(array))


def label_output_dtype(label: np.ndarray, compat: str):
    if compat == "reference":
        return np.float64
    return np.uint8 if float(label.max(initial=0)) < 256 else np.uint16


# --------------------------------------------------------------------------------------- NIfTI input
def read_nifti_pair(image_path: Path, label_path: Path, dataset: str) -> tuple[np.ndarray, np.ndarray, Geometry, list[str]]:
    """Read a raw image and its label, checking that they describe the same grid.

    Shapes must be equal and spacing, origin and direction agree within 1e-4 (relative; 1e-4
    absolute near zero). Differences below that (float noise in the headers) are reported as a
    warning and the image geometry is used for both, as the reference does by copying it.
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


# --------------------------------------------------------------------------------------- MR pipeline
@dataclass
class ProcessedCase:
    """One preprocessed scan, ready to be written, plus its provenance record for the sidecar."""

    image: np.ndarray
    label: np.ndarray
    geometry: Geometry
    record: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def volume_change_warnings(before: np.ndarray, before_spacing, after: np.ndarray, after_spacing,
                           source: str, min_volume_mm3: float = 1000.0, tolerance: float = 0.10) -> list[str]:
    """Warn where a class's volume (mm^3) changes by more than `tolerance` through resampling.

    Only structures above `min_volume_mm3` (1 cm^3) are checked: thin or small ones (adrenals,
    myocardium at 8 mm slices) legitimately change more.
    """
    v0, v1 = float(np.prod(before_spacing)), float(np.prod(after_spacing))
    values0, counts0 = np.unique(before, return_counts=True)
    values1, counts1 = np.unique(after, return_counts=True)
    after_counts = dict(zip(values1.tolist(), counts1.tolist()))
    out = []
    for value, count in zip(values0.tolist(), counts0.tolist()):
        if value == 0 or count * v0 < min_volume_mm3:
            continue
        vol_before, vol_after = count * v0, after_counts.get(value, 0) * v1
        if abs(vol_after - vol_before) > tolerance * vol_before:
            out.append(f"{source}: label {value:g} volume changed from {vol_before / 1000:.1f} to "
                       f"{vol_after / 1000:.1f} cm^3 by resampling (more than {tolerance:.0%})")
    return out


def crop_loss_warnings(label: np.ndarray, cropped: np.ndarray, source: str) -> list[str]:
    """Warn when the centre crop cuts labelled voxels away (the field of view exceeds 320 mm)."""
    values, before = np.unique(label, return_counts=True)
    after = dict(zip(*np.unique(cropped, return_counts=True)))
    out = []
    for value, count in zip(values.tolist(), before.tolist()):
        lost = count - int(after.get(value, 0))
        if value != 0 and lost > 0:
            out.append(f"{source}: the {CROP_SIZE}x{CROP_SIZE} centre crop removed {lost} of {count} "
                       f"voxels of label {value:g}")
    return out


def clip_resample_crop(image: sitk.Image, label: np.ndarray, target_spacing: Sequence[float],
                       compat: str = "reference", source: str = "scan") -> ProcessedCase:
    """The CHAOS / CMR step (reference `image_normalize.ipynb`): clip the top 0.5 %, resample image
    and label to `target_spacing`, centre crop/pad both to 256 x 256, origin corrected.

    `label` is a (z, y, x) array on `image`'s grid, holding the values to be written.
    """
    check_compat(compat)
    geometry = Geometry.of(image)
    array = sitk.GetArrayFromImage(image)
    if label.shape != array.shape:
        raise DataError(f"{source}: label shape {label.shape} differs from image shape {array.shape}")
    clipped, cap = clip_top_percentile(array)
    resampled = resample_image(image_from_array(clipped, geometry), target_spacing, compat)
    res_array = sitk.GetArrayFromImage(resampled)
    res_label = resample_label(label, geometry, target_spacing, compat)
    if res_label.shape != res_array.shape:          # same rule, same grid: a bug if this fires
        raise AssertionError(f"{source}: resampled label {res_label.shape} != image {res_array.shape}")
    res_geometry = Geometry.of(resampled)
    image_dtype = np.float64 if compat == "reference" else np.float32
    out_image, (off_y, off_x) = centre_crop_or_pad(res_array, pad_value=float(res_array.min()),
                                                   dtype=image_dtype)
    out_label, _ = centre_crop_or_pad(res_label, pad_value=0.0, dtype=label_output_dtype(res_label, compat))
    warnings = volume_change_warnings(label, geometry.spacing, res_label, res_geometry.spacing, source)
    warnings += crop_loss_warnings(res_label, out_label, source)
    record = {
        "raw_size_xyz": list(image.GetSize()),
        "raw_spacing_xyz": list(geometry.spacing),
        "raw_origin_xyz": list(geometry.origin),
        "direction": list(geometry.direction),
        "raw_pixel_type": image.GetPixelIDTypeAsString(),
        "clip_percentile": TOP_PERCENTILE,
        "clip_cap": cap,
        "resampled_size_xyz": list(resampled.GetSize()),
        "crop_offset_xyz": [off_x, off_y, 0],
        "output_shape_zyx": list(out_image.shape),
    }
    return ProcessedCase(out_image, out_label, shift_origin(res_geometry, (off_x, off_y, 0)), record, warnings)


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
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("numpy", "SimpleITK", "scipy", "pydicom", "opencv-python-headless"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def read_sidecar(folder: Path) -> dict | None:
    path = Path(folder) / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); delete it and re-run with --overwrite") from None


def _json_text(obj, level: int = 0) -> str:
    """JSON with one key per line, but lists of numbers and strings kept on one line."""
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_json_text(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(inner + _json_text(v, level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write_json(path: Path, obj) -> None:
    """Write a human-readable JSON file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(_json_text(obj) + "\n")


# --------------------------------------------------------------------------------------- CLI runner
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
        print(f"{len(done)} of {len(ids)} scans already prepared in {folder}; skipping them "
              f"(--overwrite re-creates them)")
    warnings: list[str] = []
    for scan_id in tqdm(todo, desc=f"prepare {spec.name}", unit="scan"):
        case = job.process(scan_id, job.sources[scan_id])
        write_pair(spec.image_path(job.out_dir, scan_id), spec.label_path(job.out_dir, scan_id),
                   case.image, case.label, case.geometry)
        for w in case.warnings:
            tqdm.write(f"warning: {w}")
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
        print(f"class-slice index ({rule} rule): " + ", ".join(p.name for p in written))
    print(f"{len(todo)} scan(s) written, {len(ids) - len(todo)} skipped, {len(warnings)} warning(s); "
          f"output in {folder}")
    if not job.verify:
        return 0
    from data.verify import verify_dataset          # here: data.verify imports this module

    report = verify_dataset(job.out_dir, spec, ids=job.verify_ids)
    print(report.format())
    return 0 if report.ok else 1


def run_cli(main_body: Callable[[], int]) -> int:
    """Run a command body, turning `DataError` into a one-line message and exit code 1."""
    try:
        return main_body()
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
