"""2-D superpixels of SSL-ALPNet (`data/pseudolabel_gen.ipynb`, "MIDDLE" mode), slice by slice.

For each axial slice of a (Z, Y, X) image, as the reference notebook does it:

1. scikit-image `felzenszwalb(slice, scale=1, sigma=1, min_size=400)` on the raw float slice
   (no rescaling: scikit-image divides the scale by 255, so the result depends on the absolute
   intensity range, and the image must be fed in the ranges the reference used).
2. A body mask: intensity > threshold, the largest 8-connected component, holes filled (an
   empty thresholded slice gives an empty mask). The reference threshold is 1e-4 above a
   per-dataset base: 50 for CHAOS (50.0001), 0 for SABS (1e-4); see `reference_threshold`.
3. Relabelling inside the mask. By default ("clean") every segment that touches the mask is
   kept and the ids are compacted to 1..K per slice, in the order of Felzenszwalb's ids (first
   occurrence in raster order). With `reference_ids=True` the reference's quirks are reproduced
   exactly: Felzenszwalb segment 0 is dropped (its pixels become background), ids 1..max-1 keep
   their values, segment max is written as max + 1 (so id max is unused), and segments wholly
   outside the mask leave gaps. (The reference's relabel loop renames 0 to max + 1, never visits
   that value, and visits max twice.)

The output is int32 with 0 as background in both modes (the reference wrote float64).
"""
from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb

from data.supervoxels import body_mask_2d

THRESHOLD_OFFSET = 1e-4  # the reference thresholds at base + 1e-4 ("> 1e-4 + 50" for CHAOS)


def reference_threshold(base: float) -> float:
    """The body-mask threshold of the reference for a dataset's base level (CHAOS 50 -> 50.0001)."""
    return THRESHOLD_OFFSET + float(base)


def relabel_clean(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Keep the segments inside `mask`, renumbered 1..K in the order of their ids; (H, W) int32."""
    inside = segments[mask]
    kept = np.unique(inside)
    out = np.zeros(segments.shape, dtype=np.int32)
    out[mask] = np.searchsorted(kept, inside) + 1
    return out


def relabel_reference(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """SSL-ALPNet's `superpix_masking`, quirks included (see the module docstring); (H, W) int32.

    `segments` holds Felzenszwalb ids 0..max (every id present). Id 0 becomes background, ids
    1..max-1 are unchanged, id max becomes max + 1; pixels outside `mask` are 0.
    """
    top = int(segments.max())
    lut = np.arange(top + 1, dtype=np.int32)
    lut[0] = 0
    if top > 0:
        lut[top] = top + 1
    out = lut[segments]
    out[~mask] = 0
    return out


def superpixels_2d(image: np.ndarray, threshold: float, min_size: int = 400, sigma: float = 1.0,
                   reference_ids: bool = False) -> np.ndarray:
    """Superpixels of every axial slice of a (Z, Y, X) image; returns (Z, Y, X) int32, 0 = background.

    Args:
        image: (Z, Y, X) real array in the dataset's intensity units (not rescaled).
        threshold: body mask is image > threshold (use `reference_threshold(base)` for the
            reference's base + 1e-4).
        min_size: Felzenszwalb minimum segment size in pixels (400 in the reference).
        sigma: Gaussian smoothing of Felzenszwalb (1 in the reference); scale is 1.
        reference_ids: reproduce the reference's id quirks instead of compact ids 1..K per slice.

    Ids are per slice: the same id in two slices means nothing.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"superpixels_2d expects a 3-D (z, y, x) image, got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"the image is empty (shape {image.shape})")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"the image must be real-valued, got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise ValueError("the image contains NaN or infinite values")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if int(min_size) != min_size or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size}")
    relabel = relabel_reference if reference_ids else relabel_clean
    out = np.zeros(image.shape, dtype=np.int32)
    for z, slice_2d in enumerate(np.asarray(image, dtype=np.float64)):
        segments = felzenszwalb(slice_2d, scale=1, sigma=sigma, min_size=int(min_size), channel_axis=None)
        out[z] = relabel(segments, body_mask_2d(slice_2d, threshold))
    return out
