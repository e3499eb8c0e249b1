"""Time and memory of the 3-D supervoxels on the real CHAOST2 and CMR volumes, one core.

    python scripts/benchmark_pseudolabels.py [--all] [--chaos-ids 1 2] [--cmr-ids 1 2]
        [--sort legacy|stable|quicksort] [--data-root ../shared/data]

Every volume runs in a fresh child process (spawn) with NUMBA_NUM_THREADS=1, after a warm-up
call on a tiny volume, so the numbers are steady state:

- seconds: wall and CPU time of `supervoxels_3d` (rescale, graph, sort, merges, mask);
- traced MB: the tracemalloc peak during that call (NumPy arrays and numba's own allocations,
  which go through Python's raw allocator, are both traced);
- RSS MB: the child's peak resident set (getrusage ru_maxrss), and its growth during the call.

The numba compile time is reported separately: the first call in a process with an empty
numba cache (cold: compiling) and with the cache filled (warm: loading the compiled code).
The last column compares with the published supervoxels when the data folder ships them.
"""
from __future__ import annotations

import os

os.environ["NUMBA_NUM_THREADS"] = "1"  # before numba is imported, here and in the children
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from data.core.io import read_volume  # noqa: E402
from data.core.specs import load_spec  # noqa: E402
from data.pseudolabels import header_spacing_zyx, pixdim_spacing_zyx  # noqa: E402
from data.supervoxels import edge_blocks, supervoxels_3d  # noqa: E402

DATASETS = {"CHAOST2": 5000, "CMR": 1000}  # name -> published min size (n_sv)
DEFAULT_IDS = {"CHAOST2": (1, 2, 32), "CMR": (1, 2, 26)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _warm_up(sort: str) -> float:
    """First call of the supervoxel code on a tiny volume; returns its seconds (compile or load)."""
    import numpy as np

    start = time.perf_counter()
    tiny = np.random.default_rng(0).integers(0, 50, (3, 24, 24)).astype(np.float64)
    supervoxels_3d(tiny, (3.0, 1.0, 1.0), 20, sort=sort)
    return time.perf_counter() - start


def _first_call_child(cache_dir: str, sort: str) -> float:
    os.environ["NUMBA_CACHE_DIR"] = cache_dir
    return _warm_up(sort)


def _measure_child(data_root: str, dataset: str, scan_id: int, sort: str, spacing: str) -> dict:
    """Runs in a fresh process: warm up, then measure one volume."""
    import numpy as np

    _warm_up(sort)
    spec = load_spec(dataset)
    data_dir = Path(data_root) / dataset
    path = spec.image_path(data_dir, scan_id)
    image, geometry = read_volume(path)
    spacing_zyx = (pixdim_spacing_zyx(path, geometry) if spacing == "pixdim"
                   else header_spacing_zyx(geometry, path))
    rss_before = _rss_mb()
    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    labels = supervoxels_3d(image, spacing_zyx, DATASETS[dataset], sort=sort)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    traced_peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    rss_peak = _rss_mb()

    published_path = spec.supervoxel_path(data_dir, scan_id, DATASETS[dataset])
    if published_path.is_file():
        published, _ = read_volume(published_path)
        if np.array_equal(labels, published):
            versus = "identical"
        else:
            fg = published != 0
            versus = f"ARI {_ari(labels[fg], published[fg]):.3f}" + ("" if np.array_equal(labels != 0, fg)
                                                                      else ", fg differs")
    else:
        versus = "-"
    z, y, x = image.shape
    n_edges = int(edge_blocks(image.shape, spacing_zyx)["starts"][-1])
    return {"dataset": dataset, "id": scan_id, "shape": f"{z}x{y}x{x}", "edges_m": n_edges / 1e6,
            "wall": wall, "cpu": cpu, "traced": traced_peak, "rss": rss_peak,
            "rss_growth": rss_peak - rss_before, "segments": int(len(np.unique(labels)) - 1),
            "versus": versus}


def _ari(a, b) -> float:
    import numpy as np

    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    _, cells = np.unique(ai.astype(np.int64) * (bi.max() + 1) + bi, return_counts=True)

    def pairs(c):
        c = c.astype(np.float64)
        return (c * (c - 1) / 2).sum()

    n = a.size
    index, pa, pb = pairs(cells), pairs(np.bincount(ai)), pairs(np.bincount(bi))
    expected = pa * pb / (n * (n - 1) / 2)
    return 1.0 if pa + pb == 2 * expected else (index - expected) / ((pa + pb) / 2 - expected)


def _in_child(function, *args):
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(function, args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(os.environ.get("FEWSHOT_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    parser.add_argument("--data-root", type=Path, default=shared, help="folder holding CHAOST2/ and CMR/")
    parser.add_argument("--all", action="store_true", help="every volume of both datasets")
    parser.add_argument("--chaos-ids", type=int, nargs="*", default=list(DEFAULT_IDS["CHAOST2"]))
    parser.add_argument("--cmr-ids", type=int, nargs="*", default=list(DEFAULT_IDS["CMR"]))
    parser.add_argument("--sort", choices=("legacy", "stable", "quicksort"), default="legacy")
    parser.add_argument("--spacing", choices=("pixdim", "header"), default="pixdim")
    args = parser.parse_args(argv)

    selection = {"CHAOST2": args.chaos_ids, "CMR": args.cmr_ids}
    for dataset in DATASETS:
        if not (args.data_root / dataset).is_dir():
            print(f"skipping {dataset}: {args.data_root / dataset} not found")
            selection[dataset] = []
        elif args.all:
            folder = args.data_root / dataset
            selection[dataset] = list(load_spec(dataset).scan_ids(folder, require_labels=False))

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = _in_child(_first_call_child, cache_dir, args.sort)
        warm = _in_child(_first_call_child, cache_dir, args.sort)
    print(f"numba first call (sort={args.sort}): {cold:.1f} s with an empty cache (compiling), "
          f"{warm:.2f} s with the cache filled (loading)\n")

    header = (f"{'dataset':8} {'id':>3} {'shape':>11} {'edges M':>7} {'wall s':>7} {'cpu s':>6} "
              f"{'traced MB':>9} {'RSS MB':>7} {'RSS +MB':>7} {'segs':>5}  vs published")
    print(header)
    print("-" * len(header))
    rows = []
    for dataset, ids in selection.items():
        for scan_id in ids:
            r = _in_child(_measure_child, str(args.data_root), dataset, scan_id, args.sort, args.spacing)
            rows.append(r)
            print(f"{r['dataset']:8} {r['id']:>3} {r['shape']:>11} {r['edges_m']:>7.1f} {r['wall']:>7.2f} "
                  f"{r['cpu']:>6.2f} {r['traced']:>9.0f} {r['rss']:>7.0f} {r['rss_growth']:>7.0f} "
                  f"{r['segments']:>5}  {r['versus']}", flush=True)
    for dataset in DATASETS:
        mine = [r for r in rows if r["dataset"] == dataset]
        if mine:
            print(f"{dataset}: {len(mine)} volumes, mean {sum(r['wall'] for r in mine) / len(mine):.2f} s, "
                  f"max {max(r['wall'] for r in mine):.2f} s, max RSS {max(r['rss'] for r in mine):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
