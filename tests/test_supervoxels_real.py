"""Regenerate the published supervoxels of every CHAOST2 and CMR volume and compare.

The Q-Net data ships `supervoxels_5000` (CHAOST2) and `supervoxels_1000` (CMR), made by the
reference generator with NumPy 1.23. The command's defaults (reference pixdim spacing, the
NumPy < 1.25 sort order) must give exactly the shipped foreground, an adjusted Rand index of at
least 0.9 on it, and in fact the same file bit for bit (ids included).

About 1.5 min for the 55 volumes on one core; skipped where the real data is absent.
"""
from __future__ import annotations

import numpy as np
import pytest

from data.core.io import read_volume
from data.pseudolabels import Job, compute_pseudolabels
from data.core.specs import DatasetSpec, load_spec

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`

CHAOS = load_spec("CHAOST2")
CMR = load_spec("CMR")
MIN_ARI = 0.9


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings of the same items."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in size: {a.shape} vs {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, a_ids = np.unique(a, return_inverse=True)
    _, b_ids = np.unique(b, return_inverse=True)
    _, cell_counts = np.unique(a_ids.astype(np.int64) * (b_ids.max() + 1) + b_ids, return_counts=True)

    def pairs(counts):
        counts = counts.astype(np.float64)
        return float((counts * (counts - 1) / 2).sum())

    index = pairs(cell_counts)
    pairs_a = pairs(np.bincount(a_ids))
    pairs_b = pairs(np.bincount(b_ids))
    expected = pairs_a * pairs_b / (n * (n - 1) / 2)
    maximum = (pairs_a + pairs_b) / 2
    if maximum == expected:  # both labelings trivial (one cluster, or all singletons)
        return 1.0
    return (index - expected) / (maximum - expected)


def test_adjusted_rand_index_known_values():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 3, 3]) == 1.0          # renaming
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    assert abs(adjusted_rand_index(rng.integers(0, 5, 20000), rng.integers(0, 5, 20000))) < 0.01


def check_against_published(spec: DatasetSpec, data_dir, scan_id: int, n_sv: int) -> None:
    published_path = spec.supervoxel_path(data_dir, scan_id, n_sv)
    job = Job(scan_id, spec.image_path(data_dir, scan_id), published_path, "supervoxels", n_sv,
              threshold=None, reference_ids=False, spacing="pixdim", sort="legacy")
    regenerated, _ = compute_pseudolabels(job)          # the command's own code path, not written
    published, _ = read_volume(published_path)
    assert regenerated.shape == published.shape and regenerated.dtype == np.int32
    foreground = published != 0
    np.testing.assert_array_equal(regenerated != 0, foreground, err_msg="foreground differs")
    ari = adjusted_rand_index(regenerated[foreground], published[foreground])
    assert ari >= MIN_ARI, f"ARI {ari:.4f} < {MIN_ARI} on the foreground"
    # Stronger: the reference's sort order and spacing reproduce the file bit for bit.
    assert np.array_equal(regenerated, published), f"not bit-identical (ARI {ari:.4f})"


@pytest.mark.parametrize("scan_id", CHAOS.expected_ids)
def test_chaos_supervoxels_match_the_published_files(chaos_dir, scan_id):
    check_against_published(CHAOS, chaos_dir, scan_id, n_sv=5000)


@pytest.mark.parametrize("scan_id", CMR.expected_ids)
def test_cmr_supervoxels_match_the_published_files(cmr_dir, scan_id):
    check_against_published(CMR, cmr_dir, scan_id, n_sv=1000)
