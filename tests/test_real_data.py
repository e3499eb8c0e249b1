"""The spine on the real data in ../shared/data: support choice from the shipped class index, and a
2-step CHAOST2 training evaluated on one real fold through the commands."""
import json
import subprocess
import sys

import numpy as np

import pytest

from evaluation.protocol import support_slices
from data.core.specs import load_spec
from dataloaders.volumes import VolumeStore
from tests.conftest import PROJECT_ROOT, requires_chaos, requires_cmr, CHAOS_DIR, CMR_DIR

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`


def _classmap(folder):
    return json.loads((folder / "classmap_1.json").read_text())


@requires_chaos
def test_chaos_support_slices_agree_with_the_shipped_class_index():
    spec = load_spec("CHAOST2")
    store = VolumeStore(spec, CHAOS_DIR)
    classmap = _classmap(spec.image_folder(CHAOS_DIR))
    for fold_index in range(5):
        support, _ = spec.fold(store.ids, fold_index).support_and_queries(-1)
        for c in spec.eval_labels:
            zlist = classmap[spec.label_name(c)][str(support)]      # SSL-ALPNet's source of support slices
            expected = [zlist[int(q * len(zlist))] for q in (1 / 6, 1 / 2, 5 / 6)]
            assert support_slices(store.scan(support).slices_with(c), 3) == expected


@requires_cmr
def test_cmr_support_slices_after_label_mapping():
    spec = load_spec("CMR")
    store = VolumeStore(spec, CMR_DIR)
    classmap = _classmap(spec.image_folder(CMR_DIR))
    support, queries = spec.fold(store.ids, 0, "qnet").support_and_queries(2)
    assert support == 3 and queries == (1, 2, 4, 5, 6, 7, 8)
    for c in spec.eval_labels:          # the classmap is written after the 200/500/600 -> 1/2/3 mapping
        assert store.scan(support).slices_with(c).tolist() == classmap[spec.label_name(c)][str(support)]


@requires_chaos
def test_two_training_steps_on_chaos_then_one_real_fold_evaluated(tmp_path):
    # one organ (spleen, the fewest slices) keeps the real fold's evaluation to a quarter of the time
    common = ["with", "adnet", "chaost2", f"data_dir={CHAOS_DIR}", f"log_dir={tmp_path}", "encoder.weights=none",
              "test_labels=[4]", "train.n_steps=2"]     # validation evaluates a training of its own configuration
    train = subprocess.run([sys.executable, "training.py", "-l", "WARNING", *common, "train.print_every=1"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    val = subprocess.run([sys.executable, "validation.py", "-l", "WARNING", *common, "evaluation.n_overlays=1"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1200)
    assert val.returncode == 0, val.stderr[-3000:]
    assert "support scan 8" in val.stdout and "SPLEEN" in val.stdout
    results = json.loads(next(tmp_path.glob("test/*/1/results.json")).read_text())
    assert results["query_scans"] == [1, 2, 3, 5] and results["checkpoint"].endswith("snapshots/2.pth")
    assert list(results["classes"]) == ["SPLEEN"]
    assert np.isfinite(results["mean_dice"])
