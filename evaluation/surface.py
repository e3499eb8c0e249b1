"""Surface distances beside Dice: HD95 and ASSD in mm, computed by MONAI's metrics.

- **HD95**: `monai.metrics.compute_hausdorff_distance(percentile=95)`, symmetric: the larger of the
  95th percentiles (linear interpolation, `torch.quantile`) of the distances from each prediction
  surface voxel to the nearest label surface voxel and from each label surface voxel to the nearest
  prediction surface voxel.
- **ASSD**: `monai.metrics.compute_average_surface_distance(symmetric=True)`: the mean of both sets of
  distances together.

A mask's surface is MONAI's: its voxels that a binary erosion (scipy, face-connected structuring element,
background outside the array) removes. Distances are Euclidean between voxel centres, each axis scaled by
its spacing, so they are in mm of the grid the masks lie on.

Empty masks are what MONAI makes of them (`surface_distances` passes its values through):

| prediction | label | HD95 | ASSD |
|---|---|---|---|
| empty | not empty | nan | inf |
| not empty | empty | nan | inf |
| empty | empty | nan | nan |

`mean_distances` is how the reports average them: over the pairs with both masks non-empty, with the
number left out.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

HD95_PERCENTILE = 95.0
SURFACE_METRICS = ("hd95_mm", "assd_mm")     # ScanScore attributes, results.csv columns, results.json keys


@dataclass(frozen=True)
class SurfaceDistances:
    """HD95 and ASSD of one prediction against its label, in mm (nan/inf for empty masks, as MONAI)."""

    hd95_mm: float
    assd_mm: float

    @property
    def defined(self) -> bool:
        """Both finite: neither mask was empty."""
        return math.isfinite(self.hd95_mm) and math.isfinite(self.assd_mm)


def array_spacing(spacing_xyz: Sequence[float]) -> tuple[float, ...]:
    """A volume's spacing as SimpleITK gives it, (x, y, z), in the order of its array's axes (z, y, x)."""
    return tuple(float(s) for s in reversed(tuple(spacing_xyz)))


def surface_distances(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> SurfaceDistances:
    """HD95 and ASSD between two masks on one grid.

    Args:
        prediction: Z x H x W (or H x W) mask, nonzero = foreground.
        truth: the label's mask, same shape.
        spacing: mm per array axis, in array order ((z, y, x); `array_spacing` turns a SimpleITK spacing).
    """
    prediction, truth = np.asarray(prediction) != 0, np.asarray(truth) != 0
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction and label differ in shape: {prediction.shape} and {truth.shape}")
    if len(spacing) != prediction.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {prediction.ndim}-D mask")
    prediction, truth = _crop_to_union(prediction, truth)
    return SurfaceDistances(*_monai_distances(prediction, truth, tuple(float(s) for s in spacing)))


def scored_surface_distances(prediction: np.ndarray, truth: np.ndarray, scored: np.ndarray,
                             spacing_xyz: Sequence[float]) -> SurfaceDistances:
    """`surface_distances` on the scored slices of a volume, as the protocol scores the Dice.

    Slices outside `scored` count as background in both masks and keep their place, so a slice left out
    between scored ones stays a gap of its thickness in z.

    Args:
        prediction: Z x H x W mask of the class, nonzero = foreground.
        truth: Z x H x W mask of the class in the label.
        scored: indices of the scored slices.
        spacing_xyz: the volume's spacing as SimpleITK gives it (x, y, z), mm.
    """
    keep = np.zeros(prediction.shape[0], bool)
    keep[np.asarray(scored, dtype=int)] = True
    keep = keep[:, None, None]
    return surface_distances((prediction != 0) & keep, (truth != 0) & keep, array_spacing(spacing_xyz))


def mean_distances(distances: Iterable[SurfaceDistances]) -> tuple[SurfaceDistances, int]:
    """The mean HD95 and ASSD over the pairs whose distances are defined (both masks non-empty), and how
    many were left out; nan means when none is defined.

    An empty prediction makes HD95 nan and ASSD inf (MONAI); such a scan is left out of the means and
    counted instead, so that one empty prediction does not turn a whole class's mean into nan or inf."""
    distances = list(distances)
    defined = [d for d in distances if d.defined]
    if not defined:
        return SurfaceDistances(float("nan"), float("nan")), len(distances)
    return (SurfaceDistances(float(np.mean([d.hd95_mm for d in defined])), float(np.mean([d.assd_mm for d in defined]))),
            len(distances) - len(defined))


def _crop_to_union(prediction: np.ndarray, truth: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of either's foreground plus `margin` voxels (as much as the array
    holds). MONAI crops the same way itself; doing it first spares it scanning the whole volume in torch,
    which was most of its time on a 36 x 256 x 256 scan. Distances do not depend on where the box lies."""
    union = prediction | truth
    if not union.any():
        return prediction, truth
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - margin, 0), int(present[-1]) + 1 + margin))
    box = tuple(box)
    return np.ascontiguousarray(prediction[box]), np.ascontiguousarray(truth[box])


def _monai_distances(prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    # imported here: monai.metrics takes about 2 s to import, which commands that never score (training,
    # scripts.segment without a label) should not pay
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    y_pred = torch.from_numpy(prediction)[None, None]          # 1 x 1 x (Z x) H x W: batch, one class
    y = torch.from_numpy(truth)[None, None]
    with warnings.catch_warnings():
        # MONAI warns for every empty mask ("... is all 0, this may result in nan/inf distance"), which
        # the returned nan/inf already say, and about an argument it passes itself (deprecated in 1.5)
        warnings.filterwarnings("ignore", message=".* is all 0, this may result in nan/inf distance")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*always_return_as_numpy")
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=HD95_PERCENTILE,
                                          spacing=spacing)
        assd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                                spacing=spacing)
    return float(hd95[0, 0]), float(assd[0, 0])
