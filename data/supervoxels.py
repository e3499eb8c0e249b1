"""3-D supervoxels of ADNet / Q-Net: Felzenszwalb's graph segmentation on the 26-neighbourhood.

This re-implements the supervoxel generator of the references (ADNet / Q-Net
`supervoxels/felzenszwalb_3d*.py|pyx`, `generate_supervoxels.py`), step by step:

1. `felzenszwalb_3d`: every voxel is a node, joined to its 13 "forward" neighbours of the
   26-neighbourhood (`EDGE_BLOCKS`). The cost of an edge is sqrt(w * (I_q - I_p)^2), where w
   corrects for anisotropic voxels (`edge_weights`). The edges are sorted by cost and merged
   greedily: pass 1 is Felzenszwalb's rule with k = scale / 255, pass 2 joins every edge that
   touches a component smaller than `min_size`. Components are numbered 0..K-1 by their first
   voxel in raster order.
2. `foreground_mask`: per slice, intensity > 10 on the 0-255 scale, the largest 8-connected
   component, holes filled.
3. `supervoxels_3d`: rescale to 0-255, run (1) with scale 1 and sigma 0, mask with (2); the
   segment numbered 0 is renamed max + 1, so supervoxel ids are >= 1 and 0 is background.

Fidelity. The greedy merge depends on the exact order of the sorted edges, and with integer-valued
images most costs are tied (on CHAOS a fifth of the edges cost exactly 0), so every detail that
moves a tie changes the supervoxels. These are reproduced literally: the block order of the 13
offsets and the C order of the edges inside a block; the weights computed as square root then
square (`(sqrt(1 + s^2) / sqrt(2))^2`, not `(1 + s^2) / 2`); float64 costs; thresholds
Int + k / Size rounded to float32 and compared in float64; union-find roots that are the smallest
voxel index of their component; and the tie order of the sort.

The sort. The reference calls NumPy's default `argsort`, whose tie order is an accident of its
implementation: NumPy < 1.25 used a scalar introsort (the published files were made with
NumPy 1.23), newer versions use SIMD sorts that differ between CPUs. `sort="legacy"` (default)
is our numba port of the NumPy < 1.25 introsort, which yields exactly its permutation on any
NumPy and CPU: it is deterministic everywhere, and together with the reference's spacing (the
NIfTI pixdim strings, see `data/pseudolabels.py`) it regenerates every published CHAOST2 and
CMR supervoxel file bit for bit. `sort="stable"` breaks ties by edge order (a radix sort: the
fastest, also deterministic, but far from the published files: adjusted Rand index 0.58-0.92 on
the CHAOS foregrounds, 0.78-1.0 on CMR) and `sort="quicksort"` calls the installed NumPy's
`argsort` as the reference literally did (machine-dependent; it is what scikit-image uses, hence
the 2-D equality test with `edge_order="skimage"`).

Speed and memory. The loops run under numba with `cache=True`: the first call after a checkout
compiles for about 10 s, later processes load the cache in under a second. A CHAOS volume
(37 x 256 x 256, 31 M edges) takes 2.5-3 s of one core (the reference's Cython: 8-50 s), a CMR
volume about 1 s. Per edge we keep a float64 cost (needed: ties decide the result) and an int32
code (source voxel and block), ~12 bytes, so about 0.4 GB for a CHAOS volume.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from numba import njit
from scipy import ndimage as ndi
from skimage.measure import label as connected_components

log = logging.getLogger(__name__)

# The 13 forward offsets (dz, dy, dx) of the 26-neighbourhood, in the reference's block order:
# the four in-plane blocks, then the nine through-plane blocks. An edge of block b joins voxel p
# and p + offset; inside a block the edges are in C order of p.
_IN_PLANE_3D = ((0, 1, 0), (0, 1, 1), (0, 0, 1), (0, 1, -1))
# scikit-image's 2-D `felzenszwalb` builds the same in-plane edges in another order (col+1,
# row+1, down-right, up-right); with equal costs the order decides the merges. For tests.
_IN_PLANE_SKIMAGE = ((0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 1, -1))
_THROUGH_PLANE = ((1, 1, 0), (1, 1, 1), (1, 0, 1), (1, -1, 0), (1, -1, -1), (1, 0, -1),
                  (1, 1, -1), (1, -1, 1), (1, 0, 0))
EDGE_BLOCKS = {"3d": _IN_PLANE_3D + _THROUGH_PLANE, "skimage": _IN_PLANE_SKIMAGE + _THROUGH_PLANE}

SORT_KINDS = ("legacy", "stable", "quicksort")
FOREGROUND_THRESHOLD = 10.0  # on the 0-255 scale (reference `fg_thresh`)

# An edge is stored as one integer code, p * 16 + b (source voxel, block), so the merge loops
# recover both voxels with a shift and a mask instead of dividing.
_BLOCK_BITS = 4


# ------------------------------------------------------------------------------------ validation
def check_spacing(spacing_zyx) -> tuple[float, float, float]:
    """Return `spacing_zyx` as three positive finite floats (z, y, x) or raise `ValueError`."""
    if spacing_zyx is None:
        raise ValueError("spacing_zyx is required: the edge weights depend on the voxel size "
                         "(pass the image's (z, y, x) spacing in mm)")
    try:
        values = tuple(float(s) for s in spacing_zyx)
    except (TypeError, ValueError):
        raise ValueError(f"spacing_zyx must be three numbers (z, y, x), got {spacing_zyx!r}") from None
    if len(values) != 3:
        raise ValueError(f"spacing_zyx must have 3 values (z, y, x), got {len(values)}: {spacing_zyx!r}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing_zyx must be positive and finite, got {values}")
    return values


def _check_volume(volume, what: str = "volume") -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{what} must be a 3-D (z, y, x) array, got shape {volume.shape}; "
                         f"wrap a single slice as volume[None]")
    if volume.size == 0:
        raise ValueError(f"{what} is empty (shape {volume.shape})")
    if not (np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)
            or volume.dtype == np.bool_):
        raise ValueError(f"{what} must be real-valued, got dtype {volume.dtype}")
    if volume.size >= 2 ** (31 - _BLOCK_BITS):
        raise ValueError(f"{what} has {volume.size} voxels; at most {2 ** (31 - _BLOCK_BITS) - 1} "
                         f"are supported (the edge codes are int32)")
    if not np.isfinite(volume).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return volume


# ------------------------------------------------------------------------------------ edge graph
def edge_weights(spacing_zyx) -> dict[str, np.float64]:
    """Squared distance ratios w of the four kinds of edge, computed as the reference does.

    With s = spacing_z / spacing_x (the reference's choice; the in-plane spacing is assumed
    isotropic): in-plane edges 1 (diagonals too), pure z edges s^2, z plus one in-plane step
    (sqrt(1 + s^2) / sqrt(2))^2, z plus two in-plane steps (sqrt(2 + s^2) / sqrt(3))^2. The
    roundabout square-root-then-square forms are kept because the simplified ones differ in the
    last bit, which reorders ties.
    """
    sz, _, sx = check_spacing(spacing_zyx)
    s = np.float64(sz) / np.float64(sx)
    return {
        "in_plane": np.float64(1.0),
        "z": s ** 2,
        "z_one_step": (np.sqrt(1 + s ** 2) / np.sqrt(np.float64(2))) ** 2,
        "z_two_steps": (np.sqrt(2 + s ** 2) / np.sqrt(np.float64(3))) ** 2,
    }


def _weight_of(offset: tuple[int, int, int], w: dict[str, np.float64]) -> np.float64:
    dz, dy, dx = offset
    if dz == 0:
        return w["in_plane"]
    return (w["z"], w["z_one_step"], w["z_two_steps"])[abs(dy) + abs(dx)]


def edge_blocks(shape: tuple[int, int, int], spacing_zyx, edge_order: str = "3d") -> dict[str, np.ndarray]:
    """Describe the edge list of a (Z, Y, X) grid block by block (nothing per edge is stored).

    Returns one row per block b (13 blocks):
      offsets (13, 3) int64   the (dz, dy, dx) step from p to its neighbour q
      weights (13,) float64   w of the block (`edge_weights`)
      lo (13, 3) int64        the first p of the block (the origin of its sub-grid)
      dims (13, 3) int64      the sub-grid extent; the block holds prod(dims) edges, in C order
      starts (14,) int64      cumulative edge counts: block b is edges starts[b]:starts[b+1]
      flat (13,) int64        q - p as a flat (raster) index difference
    """
    if edge_order not in EDGE_BLOCKS:
        raise ValueError(f"edge_order must be one of {sorted(EDGE_BLOCKS)}, got {edge_order!r}")
    w = edge_weights(spacing_zyx)
    offsets = np.array(EDGE_BLOCKS[edge_order], dtype=np.int64)
    dims = np.maximum(np.array(shape, dtype=np.int64) - np.abs(offsets), 0)
    _, Y, X = shape
    return {
        "offsets": offsets,
        "weights": np.array([_weight_of(tuple(o), w) for o in EDGE_BLOCKS[edge_order]]),
        "lo": np.maximum(-offsets, 0),
        "dims": dims,
        "starts": np.concatenate([[0], np.cumsum(dims.prod(axis=1))]).astype(np.int64),
        "flat": (offsets[:, 0] * Y + offsets[:, 1]) * X + offsets[:, 2],
    }


@njit(cache=True)
def _edge_costs(image, offsets, weights, lo, dims, starts, costs, codes):
    """Fill costs[e] = sqrt(w_b * (I_q - I_p)^2) and codes[e] = p * 16 + b for every edge e."""
    _, Y, X = image.shape
    for b in range(offsets.shape[0]):
        dz, dy, dx = offsets[b, 0], offsets[b, 1], offsets[b, 2]
        w = weights[b]
        e = starts[b]
        for z in range(lo[b, 0], lo[b, 0] + dims[b, 0]):
            for y in range(lo[b, 1], lo[b, 1] + dims[b, 1]):
                p = (z * Y + y) * X + lo[b, 2]
                for x in range(lo[b, 2], lo[b, 2] + dims[b, 2]):
                    d = image[z + dz, y + dy, x + dx] - image[z, y, x]
                    costs[e] = math.sqrt(w * (d * d))
                    codes[e] = (p << _BLOCK_BITS) | b
                    e += 1
                    p += 1


# ------------------------------------------------------------------------------------ sorting
# All sorts below sort `keys` (float64 costs) in place and apply the same permutation to
# `payload` (the edge codes), so no index array and no gather are needed.

_RADIX_BITS = 11
_RADIX_PASSES = 6  # 6 x 11 bits cover the 64 bits of a float64


@njit(cache=True)
def _radix_sort_stable(keys, payload):
    """Stable sort of non-negative float64 keys, carrying payload; returns (keys, payload).

    LSD radix sort on the IEEE bit patterns (for x >= 0 they order like the values), 11 bits per
    pass, skipping digits shared by every key. Ties keep their input (edge) order. The inputs
    are used as scratch space; use the returned arrays.
    """
    n = keys.size
    if n == 0:
        return keys, payload
    bits = keys.view(np.uint64)
    n_buckets = 1 << _RADIX_BITS
    mask = np.uint64(n_buckets - 1)
    hist = np.zeros((_RADIX_PASSES, n_buckets), dtype=np.int64)
    for i in range(n):
        k = bits[i]
        for d in range(_RADIX_PASSES):
            hist[d, (k >> np.uint64(d * _RADIX_BITS)) & mask] += 1
    bits_tmp = np.empty_like(bits)
    payload_tmp = np.empty_like(payload)
    pos = np.empty(n_buckets, dtype=np.int64)
    for d in range(_RADIX_PASSES):
        shift = np.uint64(d * _RADIX_BITS)
        if hist[d, (bits[0] >> shift) & mask] == n:  # every key has this digit
            continue
        total = 0
        for j in range(n_buckets):
            pos[j] = total
            total += hist[d, j]
        for i in range(n):
            k = bits[i]
            j = (k >> shift) & mask
            bits_tmp[pos[j]] = k
            payload_tmp[pos[j]] = payload[i]
            pos[j] += 1
        bits, bits_tmp = bits_tmp, bits
        payload, payload_tmp = payload_tmp, payload
    return bits.view(np.float64), payload


# NumPy < 1.25 `argsort` for float64 is numarray's introsort (Charles R. Harris;
# numpy/core/src/npysort/quicksort.cpp `aquicksort_`). Its tie order is reproduced exactly:
# median of three (lo, mid, hi) with the pivot parked at hi - 1; Hoare partition that stops on
# keys equal to the pivot; the larger part deferred on a stack and the smaller one continued;
# a depth budget of 2 * floor(log2 n), checked only when a deferred part is resumed, after which
# that part is heap-sorted; insertion sort for parts of at most 16 elements.
_SMALL_PART = 15   # hi - lo above this: partition; otherwise insertion sort
_SCAN_BLOCK = 128  # elements classified per block in `_hoare_partition`


@njit(cache=True, inline="always")
def _swap(keys, payload, i, j):
    keys[i], keys[j] = keys[j], keys[i]
    payload[i], payload[j] = payload[j], payload[i]


@njit(cache=True)
def _hoare_partition(keys, payload, lo, hi, left_hits, right_hits):
    """Partition keys[lo:hi+1] around the pivot parked at hi - 1; return the pivot's final index.

    Exactly the swaps of the scalar Hoare loop (i moves right past keys < pivot, j moves left
    past keys > pivot, swap, until they cross), found faster: the k-th swap pairs the k-th
    position from the left holding a key >= pivot with the k-th position from the right holding
    a key <= pivot, as long as the two have not crossed. Blocks of `_SCAN_BLOCK` keys are
    classified without branches (BlockQuicksort, Edelkamp & Weiss 2016) from both ends; the
    blocks never overlap, so every pair found is one the scalar loop swaps too. The last few
    blocks' worth, where the positions cross, is left to the scalar loop, resumed from the last
    pair swapped.
    """
    pivot = keys[hi - 1]
    last_left = lo          # the scalar loop's i and j after the last swap (or at the start)
    last_right = hi - 1
    first = lo + 1          # keys[first:last+1] have not been classified yet
    last = hi - 2
    n_left = used_left = base_left = 0
    n_right = used_right = base_right = 0
    while True:
        if used_left == n_left:
            if last - first + 1 < _SCAN_BLOCK:
                break
            n_left = used_left = 0
            base_left = first
            for t in range(_SCAN_BLOCK):
                left_hits[n_left] = t
                n_left += keys[first + t] >= pivot
            first += _SCAN_BLOCK
        if used_right == n_right:
            if last - first + 1 < _SCAN_BLOCK:
                break
            n_right = used_right = 0
            base_right = last
            for t in range(_SCAN_BLOCK):
                right_hits[n_right] = t
                n_right += keys[last - t] <= pivot
            last -= _SCAN_BLOCK
        pairs = min(n_left - used_left, n_right - used_right)
        for m in range(pairs):
            _swap(keys, payload, base_left + left_hits[used_left + m],
                  base_right - right_hits[used_right + m])
        if pairs > 0:
            used_left += pairs
            used_right += pairs
            last_left = base_left + left_hits[used_left - 1]
            last_right = base_right - right_hits[used_right - 1]
    i = last_left
    j = last_right
    while True:
        i += 1
        while keys[i] < pivot:
            i += 1
        j -= 1
        while pivot < keys[j]:
            j -= 1
        if i >= j:
            break
        _swap(keys, payload, i, j)
    _swap(keys, payload, i, hi - 1)
    return i


@njit(cache=True)
def _sift_down(keys, payload, lo, start, end):
    """Move heap position `start` down in the 1-based max-heap keys[lo:lo+end]."""
    key = keys[lo + start - 1]
    item = payload[lo + start - 1]
    hole = start
    child = 2 * start
    while child <= end:
        if child < end and keys[lo + child - 1] < keys[lo + child]:
            child += 1
        if key < keys[lo + child - 1]:
            keys[lo + hole - 1] = keys[lo + child - 1]
            payload[lo + hole - 1] = payload[lo + child - 1]
            hole = child
            child += child
        else:
            break
    keys[lo + hole - 1] = key
    payload[lo + hole - 1] = item


@njit(cache=True)
def _heapsort(keys, payload, lo, hi):
    """NumPy's heapsort of keys[lo:hi+1]: the introsort's fallback when a part is too deep."""
    n = hi - lo + 1
    for start in range(n >> 1, 0, -1):
        _sift_down(keys, payload, lo, start, n)
    while n > 1:
        _swap(keys, payload, lo, lo + n - 1)  # the maximum to the end, the last key on top
        n -= 1
        _sift_down(keys, payload, lo, 1, n)


@njit(cache=True)
def _insertion_sort(keys, payload, lo, hi):
    for i in range(lo + 1, hi + 1):
        key = keys[i]
        item = payload[i]
        j = i
        while j > lo and key < keys[j - 1]:
            keys[j] = keys[j - 1]
            payload[j] = payload[j - 1]
            j -= 1
        keys[j] = key
        payload[j] = item


@njit(cache=True)
def _legacy_sort(keys, payload):
    """Sort keys in place into NumPy < 1.25 `argsort` order, permuting payload alike.

    With payload = arange(n) the result is NumPy 1.23's `np.argsort(keys)`, ties included. Plain
    scalar logic, so the order is the same on every CPU.
    """
    n = keys.size
    if n < 2:
        return
    left_hits = np.empty(_SCAN_BLOCK, dtype=np.int64)
    right_hits = np.empty(_SCAN_BLOCK, dtype=np.int64)
    # Deferred parts (lo, hi, depth). The part continued is the smaller side, so at most
    # log2(n) parts are deferred at a time (NumPy's stack holds 128).
    stack = np.empty((128, 3), dtype=np.int64)
    top = 0
    lo = 0
    hi = n - 1
    depth = 0
    while (n >> (depth + 1)) > 0:
        depth += 1
    depth *= 2  # 2 floor(log2 n)
    while True:
        if depth < 0:  # checked only for a resumed (deferred) part, as NumPy does
            _heapsort(keys, payload, lo, hi)
        else:
            while hi - lo > _SMALL_PART:
                mid = lo + ((hi - lo) >> 1)
                if keys[mid] < keys[lo]:
                    _swap(keys, payload, mid, lo)
                if keys[hi] < keys[mid]:
                    _swap(keys, payload, hi, mid)
                if keys[mid] < keys[lo]:
                    _swap(keys, payload, mid, lo)
                _swap(keys, payload, mid, hi - 1)
                i = _hoare_partition(keys, payload, lo, hi, left_hits, right_hits)
                depth -= 1
                if i - lo < hi - i:  # defer the larger side, continue with the smaller
                    stack[top, 0], stack[top, 1] = i + 1, hi
                    hi = i - 1
                else:
                    stack[top, 0], stack[top, 1] = lo, i - 1
                    lo = i + 1
                stack[top, 2] = depth
                top += 1
            _insertion_sort(keys, payload, lo, hi)
        if top == 0:
            return
        top -= 1
        lo, hi, depth = stack[top, 0], stack[top, 1], stack[top, 2]


def sort_edges(costs: np.ndarray, codes: np.ndarray, sort: str = "legacy") -> tuple[np.ndarray, np.ndarray]:
    """Sort the edges by cost: returns (sorted costs, their codes). Consumes both inputs.

    "legacy": NumPy < 1.25 `argsort` order (the published supervoxels; any machine).
    "stable": ties in edge order (any machine).
    "quicksort": the installed NumPy's default `argsort`; tie order varies with NumPy and CPU.
    """
    if sort == "legacy":
        _legacy_sort(costs, codes)
        return costs, codes
    if sort == "stable":
        return _radix_sort_stable(costs, codes)
    if sort == "quicksort":
        order = np.argsort(costs)  # the default kind on purpose: the reference's call
        return costs[order], codes[order]
    raise ValueError(f"sort must be one of {SORT_KINDS}, got {sort!r}")


# ------------------------------------------------------------------------------------ merging
@njit(cache=True, inline="always")
def _find(parent, i):
    """Root (smallest voxel index) of i's component, halving the path on the way."""
    while parent[i] < i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, inline="always")
def _voxels(code, flat):
    p = code >> _BLOCK_BITS
    return p, p + flat[code & ((1 << _BLOCK_BITS) - 1)]


@njit(cache=True, inline="always")
def _join(parent, size, a, b):
    """Union of the roots a != b under the smaller index; returns the new root."""
    root, child = (a, b) if a < b else (b, a)
    parent[child] = root
    size[root] = size[a] + size[b]
    return root


@njit(cache=True)
def _merge_components(codes, costs, flat, n_voxels, k, min_size):
    """Both merge passes over the sorted edges; returns the union-find parent array (int32).

    Pass 1 (Felzenszwalb): join the two components of an edge when its cost is below both
    float32(Int + k / Size); Int(new) = cost. Pass 2: join whenever either component has fewer
    than `min_size` voxels (Size updated, Int not). Roots are the smallest voxel index, so the
    partition does not depend on the shape of the forest.

    Both passes stop as soon as no further join is possible, which changes nothing: pass 1 when
    the cost reaches float32(max Int + k) (no threshold can exceed it and the costs only grow;
    on a 0-255 image with scale 1 that is right after the zero-cost edges), pass 2 when no
    component is below `min_size` (typically after 70-85 % of the edges).
    """
    parent = np.arange(n_voxels, dtype=np.int32)
    size = np.ones(n_voxels, dtype=np.int32)
    internal = np.zeros(n_voxels, dtype=np.float64)

    stop = np.float64(np.float32(k))  # float32(max Int + k) with max Int = 0
    for e in range(codes.size):
        cost = costs[e]
        if cost >= stop:
            break
        p, q = _voxels(codes[e], flat)
        a = _find(parent, p)
        b = _find(parent, q)
        if a == b:
            continue
        if cost < min(np.float32(internal[a] + k / size[a]), np.float32(internal[b] + k / size[b])):
            internal[_join(parent, size, a, b)] = cost
            stop = max(stop, np.float64(np.float32(cost + k)))

    n_small = 0
    for v in range(n_voxels):
        if parent[v] == v and size[v] < min_size:
            n_small += 1
    for e in range(codes.size):
        if n_small == 0:
            break
        p, q = _voxels(codes[e], flat)
        a = _find(parent, p)
        b = _find(parent, q)
        if a == b:
            continue
        small_a = size[a] < min_size
        small_b = size[b] < min_size
        if small_a or small_b:
            root = _join(parent, size, a, b)
            n_small -= small_a + small_b - (size[root] < min_size)
    return parent


@njit(cache=True)
def _label_components(parent):
    """Number the components 0..K-1 by their first voxel in raster order (int32, flat)."""
    labels = np.empty(parent.size, dtype=np.int32)
    n = 0
    for v in range(parent.size):
        root = _find(parent, v)
        if root == v:
            labels[v] = n
            n += 1
        else:
            labels[v] = labels[root]  # root < v, labelled already
    return labels


def felzenszwalb_3d(volume: np.ndarray, spacing_zyx, scale: float = 1.0, sigma: float = 0.0,
                    min_size: int = 20, edge_order: str = "3d", sort: str = "legacy") -> np.ndarray:
    """Felzenszwalb graph segmentation of a (Z, Y, X) volume on the 26-neighbourhood.

    Args:
        volume: (Z, Y, X) real array, used as float64. The reference feeds the 0-255 scale.
        spacing_zyx: voxel size (z, y, x) in mm; the in-plane spacing is assumed isotropic.
        scale: Felzenszwalb's k times 255 (k = scale / 255, as in scikit-image), >= 0.
        sigma: Gaussian smoothing in mm, per axis sigma / spacing (0: none).
        min_size: pass 2 merges until every component has at least this many voxels.
        edge_order: "3d" (the reference) or "skimage" (in-plane blocks in scikit-image's order,
            so that a (1, H, W) volume with sort="quicksort" reproduces
            `skimage.segmentation.felzenszwalb(..., sigma=0)` exactly).
        sort: "legacy" (default; NumPy < 1.25 argsort order, deterministic), "stable" or
            "quicksort" (the installed NumPy's argsort); see the module docstring.

    Returns:
        (Z, Y, X) int32 segment ids 0..K-1, numbered by first occurrence in raster order.
    """
    volume = _check_volume(volume)
    spacing = check_spacing(spacing_zyx)
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be finite and >= 0, got {scale}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if int(min_size) != min_size or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size}")
    if sort not in SORT_KINDS:
        raise ValueError(f"sort must be one of {SORT_KINDS}, got {sort!r}")
    if not math.isclose(spacing[1], spacing[2], rel_tol=1e-3):
        log.warning(f"in-plane spacing (y, x) = {spacing[1:]} is anisotropic; as in the reference "
                    f"the in-plane edges are not weighted and s = spacing_z / spacing_x")
    image = np.ascontiguousarray(volume, dtype=np.float64)
    if sigma > 0:
        image = ndi.gaussian_filter(image, sigma=[sigma / s for s in spacing])

    blocks = edge_blocks(image.shape, spacing, edge_order)
    n_edges = int(blocks["starts"][-1])
    costs = np.empty(n_edges, dtype=np.float64)
    codes = np.empty(n_edges, dtype=np.int32)
    _edge_costs(image, blocks["offsets"], blocks["weights"], blocks["lo"], blocks["dims"],
                blocks["starts"], costs, codes)
    costs, codes = sort_edges(costs, codes, sort)
    parent = _merge_components(codes, costs, blocks["flat"], image.size, float(scale) / 255.0,
                               int(min_size))
    del costs, codes
    return _label_components(parent).reshape(image.shape)


# ------------------------------------------------------------------------------------ masking
def rescale_0_255(volume: np.ndarray) -> np.ndarray:
    """255 * (v - min) / (max - min) in float64, in the reference's order of operations."""
    volume = np.asarray(volume, dtype=np.float64)
    lo, hi = volume.min(), volume.max()
    if not hi > lo:
        raise ValueError(f"the volume is constant ({lo}): it has no foreground to segment")
    return 255 * (volume - lo) / (hi - lo)


def largest_component_2d(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a (H, W) bool mask (ties: first in raster order)."""
    labels = connected_components(mask, connectivity=2)
    if labels.max() == 0:
        return np.zeros(mask.shape, dtype=bool)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def body_mask_2d(image_2d: np.ndarray, threshold: float) -> np.ndarray:
    """The reference's body mask of one slice: > threshold, largest 8-connected component, holes filled.

    A slice with nothing above the threshold gives an empty mask. Returns (H, W) bool.
    """
    mask = np.asarray(image_2d) > threshold
    if not mask.any():
        return mask
    return ndi.binary_fill_holes(largest_component_2d(mask))


def foreground_mask(volume_0_255: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Per-slice foreground of a (Z, Y, X) volume on the 0-255 scale, as (Z, Y, X) bool.

    Each slice: intensity > `threshold` (10), then its largest 8-connected component, then
    `binary_fill_holes` (cross structure); a slice with nothing above the threshold stays empty.
    """
    volume = np.asarray(volume_0_255)
    if volume.ndim != 3:
        raise ValueError(f"foreground_mask expects a 3-D (z, y, x) array, got shape {volume.shape}")
    return np.stack([body_mask_2d(s, threshold) for s in volume])


def mask_supervoxels(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference's masking: id 0 becomes max + 1, int32, 0 outside `mask` (ids not compacted)."""
    out = segments.astype(np.int32, copy=True)
    out[segments == 0] = segments.max() + 1
    out[~mask] = 0
    return out


def supervoxels_3d(image: np.ndarray, spacing_zyx, min_size: int, sort: str = "legacy") -> np.ndarray:
    """ADNet / Q-Net supervoxels of a (Z, Y, X) image; returns (Z, Y, X) int32, 0 = background.

    The image is rescaled to 0-255 (float64), segmented with `felzenszwalb_3d` (scale 1,
    sigma 0, at least `min_size` voxels per segment) and masked with `foreground_mask`.
    Supervoxel ids are >= 1 and can have gaps (segments wholly outside the mask), as in the
    published files.

    Raises `ValueError` for a non-3-D array, a missing or invalid spacing, non-finite values, or
    a volume without foreground (constant, or nothing above 10 on the 0-255 scale).
    """
    image = _check_volume(image, "image")
    spacing = check_spacing(spacing_zyx)
    if int(min_size) != min_size or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size}")
    scaled = rescale_0_255(image)
    mask = foreground_mask(scaled)
    if not mask.any():
        raise ValueError("the image has no foreground: no voxel is above 10 on the 0-255 scale")
    segments = felzenszwalb_3d(scaled, spacing, scale=1.0, sigma=0.0, min_size=int(min_size), sort=sort)
    return mask_supervoxels(segments, mask)
