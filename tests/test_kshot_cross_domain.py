"""K-shot and cross-domain evaluation: which support scans, organs matched across datasets, and the
acceptance commands on the phantoms (a model trained with `adnet synth`, evaluated 3-shot and on the
phantoms' CT-like second modality, SYNTH_CT)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs.experiment import build_config
from data.core.errors import ConfigError
from data.core.specs import load_spec
from data.phantoms import ct_contrast, generate_phantoms, make_phantom
from evaluation.protocol import match_classes, support_scans
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`

CHAOS_IDS = (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)


def test_the_k_support_scans_are_ssl_alpnets_and_never_a_query():
    spec = load_spec("CHAOST2")
    fold0, fold4 = spec.fold(CHAOS_IDS, 0), spec.fold(CHAOS_IDS, 4)
    # SSL-ALPNet's K-shot block pids[SEP[k]:SEP[k+1] + K], its last K scans the supports
    assert support_scans(fold0, -1, 1) == (8,) and support_scans(fold0, -1, 3) == (8, 10, 13)
    assert support_scans(fold4, -1, 3) == (1, 2, 3)                 # wraps around, as the reference's circular list
    qnet = spec.fold(CHAOS_IDS, 0, "qnet")
    assert support_scans(qnet, 2, 3) == (3, 10, 13)                 # Q-Net's supp_idx=2: queries 1, 2, 5, 8 stay
    with pytest.raises(ConfigError, match=r"evaluation.n_shot=17 needs 16 support scans .* use evaluation.n_shot <= 16"):
        support_scans(fold0, -1, 17)


def test_classes_are_matched_by_organ_name_and_a_missing_organ_is_one_line():
    assert match_classes(load_spec("CHAOST2"), load_spec("SABS"), [1, 2, 3, 4]) == {1: 6, 2: 2, 3: 3, 4: 1}
    with pytest.raises(ConfigError) as err:
        build_config("adnet", "SYNTH", "data/SYNTH", updates={"eval_dataset": "CMR"})
    message = str(err.value)
    assert "\n" not in message and "class 1 LIVER of SYNTH has no organ of that name in eval_dataset CMR" in message
    cfg = build_config("adnet", "SYNTH", "data/SYNTH", updates={"eval_dataset": "SYNTH_CT", "test_labels": [2, 3]})
    assert cfg["eval_dataset"] == "SYNTH_CT" and cfg["eval_data_dir"] == "./data/SYNTH_CT"
    assert build_config("adnet", "SYNTH", "data/SYNTH")["eval_data_dir"] == "data/SYNTH"        # in-domain


def test_the_second_modality_is_the_same_anatomy_through_a_ct_contrast(tmp_path):
    generate_phantoms(tmp_path / "CT", n_scans=6, size=32, slices=6, progress=False, supervoxels=False, modality="CT")
    spec = load_spec("SYNTH_CT")
    assert spec.modality == "CT" and spec.scan_ids(tmp_path / "CT") == (1, 2, 3, 4, 5, 6)
    from data.core.io import read_volume
    image, _ = read_volume(spec.image_path(tmp_path / "CT", 2))
    label, _ = read_volume(spec.label_path(tmp_path / "CT", 2))
    mr_image, mr_label = make_phantom(2, 32, 6, 0)
    np.testing.assert_array_equal(label, mr_label)
    np.testing.assert_allclose(image, ct_contrast(mr_image), rtol=1e-6)
    assert ct_contrast(np.array([0.0, 210.0, 245.0])).tolist() == [0.0, 40.0, 255.0]    # air, fat dark, bone


def _run(script, *updates, log_dir, data_dir):
    args = [sys.executable, script, "-l", "WARNING", "with", "adnet", "synth", f"data_dir={data_dir}",
            f"log_dir={log_dir}", "encoder.weights=none", "train.n_steps=1", "train.snapshot_every=1",
            "train.batch_episodes=1", "evaluation.batch_size=4", "evaluation.n_overlays=0",
            "evaluation.save_predictions=False", "device=cpu", *updates]
    out = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """The phantoms, their CT-like twins, and an ADNet trained on the phantoms (1 episode, random encoder)."""
    root = tmp_path_factory.mktemp("kshot")
    shutil.copytree(phantom_dir, root / "SYNTH")
    generate_phantoms(root / "SYNTH_CT", n_scans=6, size=64, slices=12, progress=False, supervoxels=False,
                      modality="CT")
    _run("training.py", log_dir=root / "runs", data_dir=root / "SYNTH")
    return root


def test_a_model_trained_on_the_phantoms_is_evaluated_three_shot_on_their_ct_twins(trained):
    """Both acceptance commands in one evaluation (each costs a ResNet-101 pass over the fold on the CPU):
    `validation.py with adnet synth evaluation.n_shot=3 eval_dataset=SYNTH_CT`."""
    out = _run("validation.py", "evaluation.n_shot=3", "eval_dataset=SYNTH_CT", f"eval_data_dir={trained / 'SYNTH_CT'}",
               log_dir=trained / "runs", data_dir=trained / "SYNTH")
    assert "adnet on SYNTH -> SYNTH_CT, setting 1, fold 0, 3-shot (support scans 2, 3, 4" in out
    results = json.loads(next((trained / "runs" / "test").glob("*/*/results.json")).read_text())
    assert results["n_shot"] == 3 and results["support_scans"] == [2, 3, 4] and results["query_scans"] == [1]
    assert results["protocol"]["n_shot"] == 3 and np.isfinite(results["mean_dice"])
    assert list(results["support_slices_per_scan"]["LIVER"]) == ["2", "3", "4"]
    assert results["support_slices_per_scan"]["LIVER"]["2"] == results["support_slices"]["LIVER"]
    assert results["train_dataset"] == "SYNTH" and results["dataset"] == results["eval_dataset"] == "SYNTH_CT"
    assert set(results["classes"]) == {"LIVER", "RK", "LK", "SPLEEN"}
    from scripts import collect_results
    table = trained / "table"
    assert collect_results.main([str(trained / "runs" / "test"), "--out", str(table)]) == 0
    md = (table / "table.md").read_text()
    assert "Dice (%) on SYNTH -> SYNTH_CT, setting 1" in md and "| adnet, 3-shot | 3 |" in md
