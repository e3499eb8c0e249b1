"""The scan-preparation pipeline: one raw scan -> a dataset's arrays, driven by its `preprocessing` block.

    prepare_scan(image, label, prep, source) -> ProcessedCase

`prep` is a dataset's `data.core.specs.Preprocessing` (configs/datasets/*.yaml, or the dataset.json
of a converted dataset). Every way a scan is prepared goes through `prepare_scan`: the built-in
commands (data/prepare_chaos.py, prepare_cmr.py, prepare_sabs.py), the nnU-Net converter
(data/convert_nnunet.py) and scripts/segment.py for new scans. Steps, in order:

1. orientation: `reorient` to the block's DICOMOrient code (a permutation/flip, no interpolation),
   or the scan's own axes;
2. intensity: `clip_top_percentile` (MR), `hu_window` (CT) or nothing;
3. grid: `resample_to_spacing` (CHAOS, CMR, SYNTH, converted datasets: target spacing, then centre
   crop/pad in-plane) or `resample_to_fit` (SABS: border crop, then resample so that the remaining
   field of view spans `size` pixels).

Conventions: arrays are SimpleITK-ordered (z, y, x); spacing, origin and direction are SimpleITK's
(x, y, z) values in LPS; `Geometry` (data/core/io.py) carries them next to an array.

Reference behaviour and where this module deliberately differs
----------------------------------------------------------------
The steps follow the reference preprocessing of SSL-ALPNet / Q-Net (the notebooks under their
`data/` folders; data/README.md lists what each step reproduces).

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
- `centre_crop_or_pad`: in-plane centre crop/pad to size x size around floor(L/2); z is never
  touched; pad value = the image minimum, 0 for labels. **Deliberate difference:** the reference
  leaves the origin unchanged after the crop (and after SABS's border crop), so its outputs are
  shifted in world coordinates. Here the origin is always moved by direction . (offset * spacing)
  (`shift_origin`), so every voxel keeps its world position, and the offsets are recorded in the
  provenance record. Voxel values are unaffected; no compat switch is offered because nothing
  downstream reads the old origin.
- The fit rule (SABS): the reference resamples to int(size * ratio + 1) = 257 x 257 x (Z + 1) and
  its loader keeps [:256, :256]; `compat="reference"` does exactly that (the dropped row and column
  lie past the input, so they only held the resampler's 0). `compat="clean"` resamples onto exactly
  size x size x Z pixels that tile the cropped field of view (pixel centres at (i + 0.5) * r - 0.5
  input pixels, all inside the input; the origin moves accordingly).
- Outputs: the reference writes float64 images and labels; `compat="reference"` does the same,
  `compat="clean"` gives float32 images and uint8/uint16 labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from data.core.io import DataError, Geometry
from data.core.specs import Preprocessing

COMPAT_MODES = ("reference", "clean")
# The reference values, which are also the defaults of a `preprocessing` block.
_DEFAULT_BLOCK = Preprocessing()
CROP_SIZE = _DEFAULT_BLOCK.size                     # 256
TOP_PERCENTILE = _DEFAULT_BLOCK.clip_percentile     # 99.5
HU_WINDOW = _DEFAULT_BLOCK.window                   # (-125.0, 275.0)


def check_compat(compat: str) -> str:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    return compat


@dataclass
class ProcessedCase:
    """One prepared scan, plus its provenance record and the warnings raised while preparing it.

    `image` and `label` are (z, y, x) arrays on `geometry`'s grid; `label` is None when the scan came
    without one. `record` is what the dataset's `preprocessing.json` keeps about the scan.
    """

    image: np.ndarray
    label: np.ndarray | None
    geometry: Geometry
    record: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ===================================================================================================
# Intensity
# ===================================================================================================
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


def normalise_intensity(array: np.ndarray, prep: Preprocessing, source: str) -> tuple[np.ndarray, dict]:
    """Apply the block's intensity rule to a (z, y, x) array; returns it and what was done (provenance)."""
    if prep.intensity == "clip_top":
        clipped, cap = clip_top_percentile(array, prep.clip_percentile)
        return clipped, {"clip_percentile": prep.clip_percentile, "clip_cap": cap}
    if prep.intensity == "ct_window":
        lo, hi = prep.window
        # the range that reference mode stretches to [0, 255] (normally the window itself)
        clipped_range = [float(max(array.min(), lo)), float(min(array.max(), hi))]
        return (hu_window(array, prep.window, prep.compat, source=source),
                {"hu_window": list(prep.window), "clipped_min_max_hu": clipped_range})
    return array, {}


# ===================================================================================================
# Resampling
# ===================================================================================================
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


MAX_RESAMPLED_VOXELS = 2 ** 28     # 1 GiB of float32: far beyond any scan of the field at its grids


def check_resampled_size(out_size: Sequence[int], size: Sequence[int], spacing: Sequence[float],
                         new_spacing: Sequence[float], source: str) -> None:
    """Refuse a resampling whose output would not fit in memory before it is attempted: a header
    spacing of 500 mm (a unit error, a broken conversion) would otherwise make a grid of billions
    of voxels and end in an out-of-memory kill."""
    voxels = float(np.prod(np.asarray(out_size, np.float64)))
    if voxels > MAX_RESAMPLED_VOXELS:
        extent = " x ".join(f"{n * s:.0f}" for n, s in zip(size, spacing))
        raise DataError(f"{source}: its header's voxel spacing {tuple(round(float(s), 4) for s in spacing)} mm "
                        f"makes a field of view of {extent} mm, which resampled to "
                        f"{tuple(float(s) for s in new_spacing)} mm would be {tuple(int(n) for n in out_size)} "
                        f"voxels ({voxels * 4 / 2 ** 30:.0f} GiB). The spacing is almost certainly wrong (a "
                        f"unit error or a broken conversion): fix the file's header and run again")


def resample_image(image: sitk.Image, new_spacing: Sequence[float], compat: str = "reference",
                   size: Sequence[int] | None = None, origin: Sequence[float] | None = None) -> sitk.Image:
    """Linear resampling to `new_spacing` (x, y, z) on a grid with the input's direction.

    The output grid starts at the input's origin unless `origin` is given; `size` (x, y, z)
    overrides the sizing rule of `resampled_size`. reference keeps the pixel type (integer images are
    truncated toward zero); clean interpolates in float32.
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
            mask = image_from_array((label == value).astype(np.float32), geometry)
            # the mask is float32 in both modes, as in the reference, so only the grid rule differs
            yield value, sitk.GetArrayFromImage(resample_image(mask, new_spacing, compat, size, origin))

    return paint_labels(indicators())


# ===================================================================================================
# Geometry: arrays on grids, crops and pads, orientation
# ===================================================================================================
def image_from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A (z, y, x) array as a SimpleITK image placed on `geometry`."""
    return geometry.apply_to(sitk.GetImageFromArray(array))


def shift_origin(geometry: Geometry, index_offset_xyz: Sequence[float]) -> Geometry:
    """Geometry of a sub-grid whose voxel 0 is voxel `index_offset_xyz` (x, y, z) of `geometry`'s grid.

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


def border_pixels(length: int, fraction: float) -> int:
    """Pixels removed from each side of an in-plane axis of `length` by a border of `fraction`.

    round(length * fraction): 32 of Synapse's 512 for SABS's 0.0625, the same share of any other size.
    """
    return round(length * fraction)


def border_crop(array: np.ndarray, border_y: int, border_x: int) -> np.ndarray:
    """Remove `border_y` rows and `border_x` columns from each in-plane side of a (z, y, x) array."""
    if 2 * border_y >= array.shape[1] or 2 * border_x >= array.shape[2]:
        raise ValueError(f"border ({border_y}, {border_x}) leaves nothing of in-plane size {array.shape[1:]}")
    return array[:, border_y:array.shape[1] - border_y, border_x:array.shape[2] - border_x]


def reorient(image: sitk.Image, orientation: str | None) -> sitk.Image:
    """The image permuted/flipped to a DICOMOrient code (world positions unchanged); None keeps it."""
    return image if orientation is None else sitk.DICOMOrient(image, orientation)


def orientation_of(direction: Sequence[float]) -> str:
    """The DICOMOrient code closest to a direction matrix (e.g. LAS for diag(1, -1, 1))."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(d) for d in direction])


def image_output_dtype(compat: str):
    return np.float64 if compat == "reference" else np.float32


def label_output_dtype(label: np.ndarray, compat: str):
    if compat == "reference":
        return np.float64
    return np.uint8 if float(label.max(initial=0)) < 256 else np.uint16


# ===================================================================================================
# Checks of a prepared label
# ===================================================================================================
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
    """Warn when the in-plane centre crop cuts labelled voxels away (a field of view larger than the grid)."""
    size_y, size_x = cropped.shape[1:]
    values, before = np.unique(label, return_counts=True)
    after = dict(zip(*np.unique(cropped, return_counts=True)))
    out = []
    for value, count in zip(values.tolist(), before.tolist()):
        lost = count - int(after.get(value, 0))
        if value != 0 and lost > 0:
            out.append(f"{source}: the {size_y}x{size_x} centre crop removed {lost} of {count} "
                       f"voxels of label {value:g}")
    return out


# ===================================================================================================
# The two grid rules (`Preprocessing.in_plane`)
# ===================================================================================================
def resample_to_spacing(array: np.ndarray, label: np.ndarray | None, geometry: Geometry, prep: Preprocessing,
                        source: str) -> ProcessedCase:
    """CHAOS / CMR grid (reference `image_normalize.ipynb`): resample image and label to (`spacing`,
    `z_spacing`) mm, then centre crop/pad both in-plane to `size` x `size`, origin corrected.

    `array` and `label` are (z, y, x) arrays on `geometry`; the image is padded with its minimum.
    """
    sz = prep.z_spacing if prep.z_spacing is not None else geometry.spacing[2]
    new_spacing = (prep.spacing[0], prep.spacing[1], sz)
    check_resampled_size(resampled_size(array.shape[::-1], geometry.spacing, new_spacing, prep.compat),
                         array.shape[::-1], geometry.spacing, new_spacing, source)
    resampled = resample_image(image_from_array(array, geometry), new_spacing, prep.compat)
    res_array = sitk.GetArrayFromImage(resampled)
    out, (off_y, off_x) = centre_crop_or_pad(res_array, prep.size, pad_value=float(res_array.min()),
                                             dtype=image_output_dtype(prep.compat))
    out_geometry = shift_origin(Geometry.of(resampled), (off_x, off_y, 0))
    record = {"resampled_spacing_xyz": list(new_spacing), "resampled_size_xyz": list(resampled.GetSize()),
              "crop_offset_xyz": [off_x, off_y, 0]}
    if label is None:
        return ProcessedCase(out, None, out_geometry, record)
    res_label = resample_label(label, geometry, new_spacing, prep.compat)
    if res_label.shape != res_array.shape:          # same rule, same grid: a bug if this fires
        raise AssertionError(f"{source}: resampled label {res_label.shape} != image {res_array.shape}")
    out_label, _ = centre_crop_or_pad(res_label, prep.size, pad_value=0.0,
                                      dtype=label_output_dtype(res_label, prep.compat))
    warnings = volume_change_warnings(label, geometry.spacing, res_label, new_spacing, source)
    warnings += crop_loss_warnings(res_label, out_label, source)
    return ProcessedCase(out, out_label, out_geometry, record, warnings)


def resample_to_fit(array: np.ndarray, label: np.ndarray | None, geometry: Geometry, prep: Preprocessing,
                    source: str) -> ProcessedCase:
    """SABS grid (reference `resampling_and_roi.ipynb`): remove `border` of each in-plane side, then
    resample in-plane so that the remaining field of view spans `size` pixels; z is kept.

    `array` and `label` are (z, y, x) arrays on `geometry`. See the module docstring for the
    reference and clean grids.
    """
    height, width = array.shape[1:]
    by, bx = border_pixels(height, prep.border), border_pixels(width, prep.border)
    cropped_geometry = shift_origin(geometry, (bx, by, 0))
    sx, sy, sz = geometry.spacing
    # (512 - 2*32) / 256 = 1.75 for Synapse, computed in the reference's order
    new_spacing = (sx * ((width - 2 * bx) / prep.size), sy * ((height - 2 * by) / prep.size), sz)
    size, origin = None, None
    if prep.compat == "clean":
        # size pixels tile the cropped field of view exactly: pixel centres at (i + 0.5) * r - 0.5
        # input pixels (r = 1.75 for Synapse), all inside the input; z keeps its slices.
        size = (prep.size, prep.size, array.shape[0])
        ratios = (new_spacing[0] / sx, new_spacing[1] / sy, 1.0)
        origin = shift_origin(cropped_geometry, [(r - 1) / 2 for r in ratios]).origin
    resampled = resample_image(image_from_array(border_crop(array, by, bx), cropped_geometry), new_spacing,
                               prep.compat, size, origin)
    res_array = sitk.GetArrayFromImage(resampled)
    if min(res_array.shape[1:]) < prep.size:
        raise AssertionError(f"{source}: resampled in-plane size {res_array.shape[1:]} < {prep.size}")
    # reference: the SSL-ALPNet loader's [:256, :256]; it drops only the zero row/column past the extent
    out = res_array[:, :prep.size, :prep.size].astype(image_output_dtype(prep.compat))
    record = {"border_crop_offset_xyz": [bx, by, 0], "resampled_spacing_xyz": list(new_spacing),
              "resampled_size_xyz": list(resampled.GetSize())}
    if label is None:
        return ProcessedCase(out, None, Geometry.of(resampled), record)
    cropped_label = border_crop(label, by, bx)
    res_label = resample_label(cropped_label, cropped_geometry, new_spacing, prep.compat, size, origin)
    out_label = res_label[:, :prep.size, :prep.size]
    warnings = volume_change_warnings(cropped_label, cropped_geometry.spacing, out_label, new_spacing, source)
    return ProcessedCase(out, out_label.astype(label_output_dtype(out_label, prep.compat)), Geometry.of(resampled),
                         record, warnings)


GRID_RULES = {"spacing": resample_to_spacing, "fit": resample_to_fit}


# ===================================================================================================
# The pipeline
# ===================================================================================================
def prepare_scan(image: sitk.Image, label: np.ndarray | None, prep: Preprocessing,
                 source: str = "scan") -> ProcessedCase:
    """Prepare one raw scan as the dataset described by `prep` prepared its scans.

    `image` is the raw scan (any orientation, spacing and pixel type); `label` an optional (z, y, x)
    array on its grid holding the values to keep (validated by the caller). Steps: orientation,
    intensity, grid (module docstring). The result's `geometry` is the exact prepared grid, so a
    prediction on it maps back to the raw scan's grid in world coordinates; its `label` is None when
    no label was given. `source` names the scan in messages.
    """
    raw_shape = tuple(reversed(image.GetSize()))
    if label is not None and label.shape != raw_shape:
        raise DataError(f"{source}: label shape {label.shape} differs from image shape {raw_shape}")
    check_compat(prep.compat)
    raw_geometry = Geometry.of(image)
    oriented = reorient(image, prep.orientation)
    if label is not None and prep.orientation is not None:
        label = sitk.GetArrayFromImage(reorient(image_from_array(label, raw_geometry), prep.orientation))
    array, intensity_record = normalise_intensity(sitk.GetArrayFromImage(oriented), prep, source)
    case = GRID_RULES[prep.in_plane](array, label, Geometry.of(oriented), prep, source)
    case.record = {
        "raw_size_xyz": list(image.GetSize()),
        "raw_spacing_xyz": list(raw_geometry.spacing),
        "raw_origin_xyz": list(raw_geometry.origin),
        "raw_direction": list(raw_geometry.direction),
        "raw_orientation": orientation_of(raw_geometry.direction),
        "orientation": prep.orientation or "kept",
        "raw_pixel_type": image.GetPixelIDTypeAsString(),
        **intensity_record,
        **case.record,
        "output_shape_zyx": list(case.image.shape),
    }
    return case
