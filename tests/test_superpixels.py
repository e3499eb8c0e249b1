"""Tests of the SSL-ALPNet 2-D superpixels (data/superpixels.py)."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import felzenszwalb

from data.superpixels import (reference_threshold, relabel_clean, relabel_reference,
                              superpixels_2d)
from data.supervoxels import body_mask_2d


def phantom(slices=3, size=64, seed=0) -> np.ndarray:
    """(slices, size, size) 'MR' volume: dark air, a bright body disc with textured organs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    body = (yy ** 2 + xx ** 2) < (0.4 * size) ** 2
    vol = np.zeros((slices, size, size))
    for z in range(slices):
        organ = ((yy - 5) ** 2 / 60 + (xx + 8 - z) ** 2 / 150) < 1
        img = np.where(body, 300.0, 10.0) + np.where(organ, 250.0, 0.0)
        vol[z] = img + rng.normal(0, 25, img.shape) * body
    return vol


def reference_superpix_masking(raw_seg2d, mask2d):
    """The reference notebook's relabel loop, transcribed literally (for comparison only)."""
    raw = np.int32(raw_seg2d)
    lbvs = np.unique(raw)
    max_lb = lbvs.max()
    raw[raw == 0] = max_lb + 1
    lbvs = list(lbvs) + [max_lb]
    raw = raw * mask2d
    out = np.zeros(raw.shape)
    lb_new = 1
    for lbv in lbvs:
        if lbv == 0:
            continue
        out[raw == lbv] = lb_new
        lb_new += 1
    return out


def test_reference_threshold_is_base_plus_1e4():
    assert reference_threshold(50) == 50.0001
    assert reference_threshold(0) == 1e-4


def test_clean_ids_compact_per_slice_and_cover_the_mask():
    vol = phantom()
    out = superpixels_2d(vol, threshold=reference_threshold(50))
    assert out.dtype == np.int32 and out.shape == vol.shape
    for z in range(vol.shape[0]):
        mask = body_mask_2d(vol[z], reference_threshold(50))
        np.testing.assert_array_equal(out[z] > 0, mask)              # nothing of the body lost
        ids = np.unique(out[z][mask])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # compact 1..K
        segments = felzenszwalb(vol[z], scale=1, sigma=1, min_size=400, channel_axis=None)
        # Inside the mask the partition is Felzenszwalb's, renumbered in the order of its ids.
        kept = np.unique(segments[mask])
        np.testing.assert_array_equal(out[z][mask], np.searchsorted(kept, segments[mask]) + 1)


def test_reference_ids_reproduce_the_notebook_quirks():
    vol = phantom(seed=1)
    out = superpixels_2d(vol, threshold=reference_threshold(50), reference_ids=True)
    assert out.dtype == np.int32
    quirks_seen = 0
    for z in range(vol.shape[0]):
        segments = felzenszwalb(vol[z], scale=1, sigma=1, min_size=400, channel_axis=None)
        mask = body_mask_2d(vol[z], reference_threshold(50))
        np.testing.assert_array_equal(out[z], reference_superpix_masking(segments, mask))
        top = segments.max()
        assert np.all(out[z][segments == 0] == 0)       # segment 0 dropped, even inside the mask
        assert not np.any(out[z] == top)                # id max unused ...
        assert np.all(out[z][(segments == top) & mask] == top + 1)   # ... written as max + 1
        quirks_seen += np.any(mask & (segments == 0)) and np.any(mask & (segments == top))
    assert quirks_seen > 0                              # the phantom exercises both quirks


@pytest.mark.parametrize("seed", range(5))
def test_relabel_reference_matches_the_literal_loop_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    top = int(rng.integers(0, 6))
    segments = rng.permutation(np.resize(np.arange(top + 1), 48)).reshape(6, 8)  # ids 0..top all present
    mask = rng.random((6, 8)) < 0.7
    np.testing.assert_array_equal(relabel_reference(segments, mask),
                                  reference_superpix_masking(segments, mask))


def test_relabel_clean_keeps_segment_zero_and_fills_gaps():
    segments = np.array([[0, 0, 1, 2], [3, 3, 4, 4]])
    mask = np.array([[True, True, False, True], [True, True, True, True]])  # segment 1 outside
    np.testing.assert_array_equal(relabel_clean(segments, mask), [[1, 1, 0, 2], [3, 3, 4, 4]])


def test_threshold_is_strict_and_only_the_largest_body_is_kept():
    vol = np.full((2, 40, 40), 50.0)
    vol[0, 5:30, 5:30] = 200.0         # body
    vol[0, 33:37, 33:37] = 200.0       # separate small blob: outside the body mask
    vol[1] = 50.0001                   # exactly at the threshold: nothing above it
    out = superpixels_2d(vol, threshold=50.0001)
    assert out[0, 5:30, 5:30].all() and not out[0, 33:37, 33:37].any()
    assert not out[0, :5].any()
    assert not out[1].any()            # empty mask -> empty slice


def test_lower_threshold_takes_in_more():
    vol = phantom(seed=2)
    low = superpixels_2d(vol, threshold=reference_threshold(0))
    high = superpixels_2d(vol, threshold=reference_threshold(50))
    assert (low > 0).sum() > (high > 0).sum()


def test_min_size_controls_the_segment_count():
    vol = phantom(seed=3)
    few = superpixels_2d(vol, threshold=50.0001, min_size=800)
    many = superpixels_2d(vol, threshold=50.0001, min_size=50)
    assert many.max() > few.max()


@pytest.mark.parametrize("image, message", [
    (np.ones((8, 8)), "3-D"),
    (np.full((2, 8, 8), np.nan), "NaN or infinite"),
    (np.ones((2, 8, 8), dtype=complex), "real-valued"),
])
def test_rejects_bad_input(image, message):
    with pytest.raises(ValueError, match=message):
        superpixels_2d(image, threshold=0.5)
