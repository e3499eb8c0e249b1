"""Unit tests of the 3-D Felzenszwalb supervoxels (data/supervoxels.py) on small synthetic volumes.

The published-file comparison on the real CHAOS / CMR volumes is in test_supervoxels_real.py.
"""
from __future__ import annotations

import base64
import hashlib
import logging

import numpy as np
import pytest
from skimage.measure import label as sk_label
from skimage.segmentation import felzenszwalb

from data.core.io import read_volume
from data.supervoxels import (EDGE_BLOCKS, _edge_costs, edge_blocks, edge_weights, felzenszwalb_3d,
                              foreground_mask, mask_supervoxels, rescale_0_255,
                              sort_edges, supervoxels_3d)


def blocky_volume(shape=(6, 20, 24), levels=6, seed=0) -> np.ndarray:
    """Integer-valued 0..255 volume of random 2x4x4 blocks plus noise: many tied edge costs."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    coarse = rng.integers(0, levels, size=(-(-z // 2), -(-y // 4), -(-x // 4)))
    vol = np.kron(coarse, np.ones((2, 4, 4)))[:z, :y, :x] * (255 // (levels - 1))
    noise = rng.integers(-3, 4, size=shape) * (rng.random(shape) < 0.2)
    return np.clip(vol + noise, 0, 255).astype(np.float64)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label arrays define the same partition (ids may differ)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def labels_in_raster_order(labels: np.ndarray) -> bool:
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    return np.array_equal(ids, np.arange(len(ids))) and np.all(np.diff(first) > 0)


# ------------------------------------------------------------------------------------ graph
def test_edge_blocks_are_the_reference_26_neighbourhood():
    # Table of adnet_qnet.md §4.2: in-plane (0,+1,0), (0,+1,+1), (0,0,+1), (0,+1,-1), then z.
    assert EDGE_BLOCKS["3d"] == ((0, 1, 0), (0, 1, 1), (0, 0, 1), (0, 1, -1), (1, 1, 0), (1, 1, 1),
                                 (1, 0, 1), (1, -1, 0), (1, -1, -1), (1, 0, -1), (1, 1, -1), (1, -1, 1),
                                 (1, 0, 0))
    # skimage: right (col+1), down (row+1), down-right, up-right pair ((r, c+1), (r+1, c)).
    assert EDGE_BLOCKS["skimage"][:4] == ((0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, -1))
    # Each unordered neighbour pair exactly once: the offsets and their negatives are the 26.
    offsets = set(EDGE_BLOCKS["3d"]) | {tuple(-o for o in off) for off in EDGE_BLOCKS["3d"]}
    assert len(offsets) == 26 and (0, 0, 0) not in offsets


def reference_cost_blocks(image: np.ndarray, w: dict) -> list[np.ndarray]:
    """The costs as the reference builds them: numpy slices per block, C order, sqrt(w * d^2)."""
    def cost(a, b, weight):
        return np.sqrt(weight * (a - b) ** 2).ravel()
    i = image
    w1, w2, w3, w4 = w["in_plane"], w["z"], w["z_one_step"], w["z_two_steps"]
    return [
        cost(i[:, 1:, :], i[:, :-1, :], w1), cost(i[:, 1:, 1:], i[:, :-1, :-1], w1),
        cost(i[:, :, 1:], i[:, :, :-1], w1), cost(i[:, 1:, :-1], i[:, :-1, 1:], w1),
        cost(i[1:, 1:, :], i[:-1, :-1, :], w3), cost(i[1:, 1:, 1:], i[:-1, :-1, :-1], w4),
        cost(i[1:, :, 1:], i[:-1, :, :-1], w3), cost(i[1:, :-1, :], i[:-1, 1:, :], w3),
        cost(i[1:, :-1, :-1], i[:-1, 1:, 1:], w4), cost(i[1:, :, :-1], i[:-1, :, 1:], w3),
        cost(i[1:, 1:, :-1], i[:-1, :-1, 1:], w4), cost(i[1:, :-1, 1:], i[:-1, 1:, :-1], w4),
        cost(i[1:], i[:-1], w2),
    ]


def test_edge_costs_and_endpoints_match_the_reference_layout():
    rng = np.random.default_rng(3)
    image = rng.random((3, 5, 6)) * 255
    spacing = (7.7, 1.25, 1.25)
    blocks = edge_blocks(image.shape, spacing)
    n = int(blocks["starts"][-1])
    costs, codes = np.empty(n), np.empty(n, dtype=np.int32)
    _edge_costs(image, blocks["offsets"], blocks["weights"], blocks["lo"], blocks["dims"],
                blocks["starts"], costs, codes)
    # Bit-identical to the reference's slicing, in its block order.
    np.testing.assert_array_equal(costs, np.concatenate(reference_cost_blocks(image, edge_weights(spacing))))
    # Every code decodes to the pair (p, p + offset), p in C order inside the block.
    shape = np.array(image.shape)
    for b, offset in enumerate(EDGE_BLOCKS["3d"]):
        block_codes = codes[blocks["starts"][b]:blocks["starts"][b + 1]]
        assert np.all(block_codes % 16 == b)
        p = block_codes // 16
        coords = np.stack(np.unravel_index(p, image.shape), axis=1)
        expected = [c for c in np.ndindex(*image.shape)
                    if np.all((np.array(c) + offset >= 0) & (np.array(c) + offset < shape))]
        np.testing.assert_array_equal(coords, np.array(expected))


def test_edge_weights_are_the_literal_sqrt_then_square_forms():
    w = edge_weights((7.7, 1.25, 1.25))
    s = np.float64(7.7) / np.float64(1.25)
    assert w["in_plane"] == 1.0
    assert w["z"] == s ** 2
    assert w["z_one_step"] == (np.sqrt(1 + s ** 2) / np.sqrt(2.0)) ** 2
    assert w["z_two_steps"] == (np.sqrt(2 + s ** 2) / np.sqrt(3.0)) ** 2
    # ... which are the squared physical distances over the isotropic-grid distances.
    assert w["z_one_step"] == pytest.approx((1.25 ** 2 + 7.7 ** 2) / (2 * 1.25 ** 2), rel=1e-12)
    assert w["z_two_steps"] == pytest.approx((2 * 1.25 ** 2 + 7.7 ** 2) / (3 * 1.25 ** 2), rel=1e-12)
    assert edge_weights((2.0, 2.0, 2.0))["z"] == 1.0


# ------------------------------------------------------------------------------------ sorting
# Inputs with ties, and the SHA-256 of NumPy 1.23.5's np.argsort(x) (int64 little-endian), which
# the legacy edge sort (`sort_edges(..., "legacy")`) must reproduce. KILLER is a McIlroy adversary
# for the introsort with its values halved (ties): it drives one part past the depth budget, into
# the heapsort fallback.
MOD7 = ((np.arange(5000, dtype=np.int64) * 7919) % 9973 % 7).astype(np.float64)
MOD7_NUMPY123 = "95271eff4790a1b6c0dc70fa72593cbfd8eb2d3cd561228bb38b26fcfd4143f1"
KILLER = np.frombuffer(base64.b64decode(
    "AFsBWwJaA1oEWQVZBlgHWAhXCVcKVgtWDFUNVQ5UD1QQEZaUlZSTk5KSkZGQkI+Pjo6NjYyMi4uKiomJiIiHh4aGhYWE"
    "hIODgoKBgYCAf39+fn19fHx7e3p6eXl4eHd3dnZ1dXR0c3NycnFxcHBvb25ubW1sbGtramppaWhoZ2dmZmVlZGRjY2Ji"
    "YWFgYF9fXl5dXVwAAQIDBAUGBwgJCgsMDQ4PEFNTUlJRUVBQT09OTk1NTExLS0pKSUlISEdHRkZFRUREQ0NCQkFBQEA/"
    "Pz4+PT08PDs7Ojo5OTg4Nzc2NjU1NDQzMzIyMTEwMC8vLi4tLSwsKysqKikpKCgnJyYmJSUkJCMjIiIhISAgHx8eHh0d"
    "HBwbGxoaGRkYGBcXFhYVFRQUExMSElwR"), dtype=np.uint8).astype(np.float64)
KILLER_NUMPY123 = "57c92aa1055fee7bb17db0f95aeeb3b79611eedac720557e47e801c9b79e11c9"


@pytest.mark.parametrize("values, digest", [(MOD7, MOD7_NUMPY123), (KILLER, KILLER_NUMPY123)],
                         ids=["ties", "heapsort-fallback"])
def test_legacy_sort_reproduces_numpy_1_23(values, digest):
    # the codes carried through the sort are the positions: what the edge sort returns is the argsort
    _, order = sort_edges(values.copy(), np.arange(values.size, dtype=np.int32), "legacy")
    order = order.astype(np.int64)
    assert np.all(np.diff(values[order]) >= 0)
    assert not np.array_equal(order, np.argsort(values, kind="stable"))  # the tie order matters
    assert hashlib.sha256(order.astype("<i8").tobytes()).hexdigest() == digest


@pytest.mark.parametrize("sort", ["legacy", "stable", "quicksort"])
def test_sort_edges_sorts_costs_and_carries_codes(sort):
    rng = np.random.default_rng(1)
    costs = rng.integers(0, 20, 3000).astype(np.float64) * 0.5
    codes = np.arange(3000, dtype=np.int32)
    sorted_costs, sorted_codes = sort_edges(costs.copy(), codes.copy(), sort)
    assert np.all(np.diff(sorted_costs) >= 0)
    np.testing.assert_array_equal(costs[sorted_codes], sorted_costs)
    assert np.array_equal(np.sort(sorted_codes), codes)
    if sort == "stable":
        np.testing.assert_array_equal(sorted_codes, np.argsort(costs, kind="stable"))


# ------------------------------------------------------------------------------------ merging
@pytest.mark.parametrize("sort", ["legacy", "stable"])
def test_pass1_alone_joins_exactly_the_equal_valued_26_connected_regions(sort):
    # scale 1 on a 0-255 integer image: k / |C| <= 1/255, below any non-zero cost, so pass 1
    # joins only equal neighbours; min_size 1 disables pass 2.
    image = blocky_volume()
    labels = felzenszwalb_3d(image, (1.0, 1.0, 1.0), scale=1, min_size=1, sort=sort)
    expected = np.zeros(image.shape, dtype=np.int64)
    for value in np.unique(image):
        comp = sk_label(image == value, connectivity=3)
        expected[comp > 0] = comp[comp > 0] + expected.max()
    assert same_partition(labels, expected)
    assert labels_in_raster_order(labels)


@pytest.mark.parametrize("min_size", [5, 40, 300])
def test_pass2_enforces_min_size(min_size):
    image = blocky_volume(seed=min_size)
    labels = felzenszwalb_3d(image, (3.0, 1.0, 1.0), min_size=min_size)
    assert np.bincount(labels.ravel()).min() >= min_size
    assert labels_in_raster_order(labels)
    # Components stay connected (26-connectivity): pass 2 merges along edges only.
    for segment in range(labels.max() + 1):
        assert sk_label(labels == segment, connectivity=3).max() == 1


def test_min_size_above_the_volume_gives_one_segment():
    labels = felzenszwalb_3d(blocky_volume(), (1.0, 1.0, 1.0), min_size=10 ** 6)
    assert labels.dtype == np.int32 and np.all(labels == 0)


def test_larger_scale_gives_fewer_segments():
    image = blocky_volume(seed=4) + np.random.default_rng(4).random((6, 20, 24))
    counts = [felzenszwalb_3d(image, (1.0, 1.0, 1.0), scale=s, min_size=1).max() + 1
              for s in (1, 100, 5000)]
    assert counts[0] > counts[1] > counts[2]


def test_spacing_changes_the_through_plane_weights():
    image = blocky_volume(seed=5) + np.random.default_rng(5).random((6, 20, 24)) * 40
    thin = felzenszwalb_3d(image, (1.0, 1.0, 1.0), scale=300, min_size=1)
    thick = felzenszwalb_3d(image, (8.0, 1.0, 1.0), scale=300, min_size=1)
    assert not same_partition(thin, thick)


@pytest.mark.parametrize("sort", ["legacy", "stable", "quicksort"])
def test_deterministic(sort):
    image = blocky_volume(seed=7)
    first = felzenszwalb_3d(image, (3.0, 1.0, 1.0), min_size=50, sort=sort)
    again = felzenszwalb_3d(image.copy(), (3.0, 1.0, 1.0), min_size=50, sort=sort)
    np.testing.assert_array_equal(first, again)


def test_tie_order_changes_the_result():
    # Why the sort kind is a parameter: with many tied costs the greedy merge differs.
    image = np.random.default_rng(0).integers(0, 4, (6, 20, 24)).astype(np.float64) * 60
    legacy = felzenszwalb_3d(image, (3.0, 1.0, 1.0), min_size=200, sort="legacy")
    stable = felzenszwalb_3d(image, (3.0, 1.0, 1.0), min_size=200, sort="stable")
    assert not same_partition(legacy, stable)


def test_anisotropic_in_plane_spacing_is_logged(caplog):
    image = blocky_volume(seed=9)
    with caplog.at_level(logging.WARNING, logger="data.supervoxels"):
        felzenszwalb_3d(image, (3.0, 1.0, 1.0), min_size=10)
    assert not caplog.records                                  # isotropic in-plane: no message
    with caplog.at_level(logging.WARNING, logger="data.supervoxels"):
        labels = felzenszwalb_3d(image, (3.0, 1.0, 1.5), min_size=10)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "in-plane spacing (y, x) = (1.0, 1.5) is anisotropic" in caplog.text
    assert labels.shape == image.shape


def test_sigma_smooths_per_axis_in_mm():
    image = blocky_volume(seed=8)
    assert not same_partition(felzenszwalb_3d(image, (3.0, 1.0, 1.0), sigma=0.0, min_size=1),
                              felzenszwalb_3d(image, (3.0, 1.0, 1.0), sigma=1.0, min_size=1))


# ------------------------------------------------------------------------------------ 2-D equality
SKIMAGE_COMBOS = [(1, 5000), (1, 100), (100, 50), (12750, 20), (1000, 1)]


def assert_equals_skimage(slice_2d: np.ndarray, scale: float, min_size: int):
    ours = felzenszwalb_3d(slice_2d[None], (1.0, 1.0, 1.0), scale=scale, min_size=min_size,
                           edge_order="skimage", sort="quicksort")[0]
    theirs = felzenszwalb(slice_2d, scale=scale, sigma=0, min_size=min_size, channel_axis=None)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("scale, min_size", SKIMAGE_COMBOS)
def test_single_slice_equals_skimage_felzenszwalb_synthetic(scale, min_size):
    # A (1, H, W) volume has no z edges and weight-1 in-plane edges: skimage's 8-connected
    # graph. With skimage's block order and its argsort (NumPy's default), ties break alike.
    rng = np.random.default_rng(min_size)
    slice_2d = blocky_volume(shape=(2, 60, 70), seed=min_size)[0] + (rng.random((60, 70)) < 0.3) * 0.5
    assert_equals_skimage(slice_2d, scale, min_size)


def test_single_slice_equals_skimage_felzenszwalb_chaos(chaos_dir):
    # The recipe of adnet_qnet.md §4.5: slices 5, 20, 30 of CHAOS #1 on the 0-255 scale.
    image, _ = read_volume(chaos_dir / "chaos_MR_T2_normalized" / "image_1.nii.gz")
    scaled = rescale_0_255(image)
    for z in (5, 20, 30):
        for scale, min_size in SKIMAGE_COMBOS:
            assert_equals_skimage(scaled[z], scale, min_size)


# ------------------------------------------------------------------------------------ masking
def test_foreground_mask_threshold_largest_component_and_holes():
    volume = np.zeros((3, 12, 12))
    volume[0, 1:9, 1:9] = 200          # body with a hole ...
    volume[0, 4:6, 4:6] = 0
    volume[0, 10, 10] = 200            # ... and a separate speck: dropped
    volume[1, 2:5, 2:5] = 10           # exactly 10: not above the threshold
    volume[1, 6:8, 6:8] = 11
    volume[1, 8, 8] = 11               # touches the 2x2 square diagonally: same 8-component
    mask = foreground_mask(volume)
    assert mask.dtype == bool and mask.shape == volume.shape
    expected0 = np.zeros((12, 12), bool)
    expected0[1:9, 1:9] = True
    np.testing.assert_array_equal(mask[0], expected0)
    expected1 = np.zeros((12, 12), bool)
    expected1[6:8, 6:8] = True
    expected1[8, 8] = True
    np.testing.assert_array_equal(mask[1], expected1)
    assert not mask[2].any()           # empty slice stays empty


def test_foreground_mask_keeps_the_first_of_equal_components():
    volume = np.zeros((1, 8, 8))
    volume[0, 1:3, 1:3] = 100
    volume[0, 5:7, 5:7] = 100
    mask = foreground_mask(volume)[0]
    assert mask[1:3, 1:3].all() and not mask[5:7, 5:7].any()


def test_mask_supervoxels_renames_zero_and_clears_background():
    segments = np.array([[[0, 0, 1, 2], [3, 3, 1, 2]]])
    mask = np.array([[[True, False, True, False], [True, True, True, True]]])
    out = mask_supervoxels(segments, mask)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[[4, 0, 1, 0], [3, 3, 1, 2]]])


def test_supervoxels_3d_end_to_end():
    image = blocky_volume(shape=(6, 24, 24), seed=9) * 3 + 17   # not on the 0-255 scale
    image[:, :2] = 0                                             # a dark border: background
    out = supervoxels_3d(image, (3.0, 1.0, 1.0), min_size=30)
    mask = foreground_mask(rescale_0_255(image))
    assert out.dtype == np.int32 and out.shape == image.shape
    np.testing.assert_array_equal(out != 0, mask)
    segments = felzenszwalb_3d(rescale_0_255(image), (3.0, 1.0, 1.0), min_size=30)
    np.testing.assert_array_equal(out[mask], np.where(segments == 0, segments.max() + 1, segments)[mask])


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("image, spacing, message", [
    (np.ones((8, 8)), (1, 1, 1), "3-D"),
    (np.ones((2, 8, 8, 1)), (1, 1, 1), "3-D"),
    (blocky_volume(), None, "spacing_zyx is required"),
    (blocky_volume(), (1, 1), "3 values"),
    (blocky_volume(), (0, 1, 1), "positive"),
    (blocky_volume(), (1, -1, 1), "positive"),
    (blocky_volume(), (1, float("nan"), 1), "positive"),
    (blocky_volume(), "abc", "three numbers"),
    (np.full((3, 8, 8), 7.0), (1, 1, 1), "no foreground"),
    (np.zeros((3, 8, 8)), (1, 1, 1), "no foreground"),
    (np.where(np.eye(8)[None] > 0, np.nan, 1.0), (1, 1, 1), "NaN or infinite"),
    (np.where(np.eye(8)[None] > 0, np.inf, 1.0), (1, 1, 1), "NaN or infinite"),
    (np.ones((3, 8, 8), dtype=complex), (1, 1, 1), "real-valued"),
])
def test_supervoxels_3d_rejects_bad_input(image, spacing, message):
    with pytest.raises(ValueError, match=message):
        supervoxels_3d(image, spacing, min_size=10)


def test_felzenszwalb_3d_rejects_bad_parameters():
    image = blocky_volume()
    with pytest.raises(ValueError, match="sort"):
        felzenszwalb_3d(image, (1, 1, 1), sort="bogus")
    with pytest.raises(ValueError, match="edge_order"):
        felzenszwalb_3d(image, (1, 1, 1), edge_order="2d")
    with pytest.raises(ValueError, match="scale"):
        felzenszwalb_3d(image, (1, 1, 1), scale=-1)
    with pytest.raises(ValueError, match="min_size"):
        felzenszwalb_3d(image, (1, 1, 1), min_size=2.5)
    with pytest.raises(ValueError, match="3-D"):
        felzenszwalb_3d(image[0], (1, 1, 1))
