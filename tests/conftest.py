"""Shared test fixtures.

Real-data tests read the preprocessed CHAOS-T2 and CMR volumes at ../shared/data (relative to the
project root; CI has them there) and skip with a reason where that folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker's torch gets its share of the
    cores, and so do the commands the tests start (OMP_NUM_THREADS): two workers with all the cores
    each would fight over them (oneDNN and OpenMP spin), two with one core each keep both busy while
    one waits for a subprocess, imports or Python."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch
        torch.set_num_threads(threads)


_share_the_cores_between_workers()

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FEWSHOT_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
CHAOS_DIR = SHARED_DATA / "CHAOST2"
CMR_DIR = SHARED_DATA / "CMR"


def _real(path: Path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"real data not found at {path}")


requires_chaos = _real(CHAOS_DIR)
requires_cmr = _real(CMR_DIR)


@pytest.fixture
def chaos_dir() -> Path:
    if not CHAOS_DIR.is_dir():
        pytest.skip(f"real data not found at {CHAOS_DIR}")
    return CHAOS_DIR


@pytest.fixture
def cmr_dir() -> Path:
    if not CMR_DIR.is_dir():
        pytest.skip(f"real data not found at {CMR_DIR}")
    return CMR_DIR


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six small synthetic phantoms (12 x 64 x 64) with supervoxels, shared by the end-to-end tests."""
    from data.phantoms import generate_phantoms
    root = tmp_path_factory.mktemp("phantoms") / "SYNTH"
    generate_phantoms(root, n_scans=6, size=64, slices=12, progress=False)
    return root
