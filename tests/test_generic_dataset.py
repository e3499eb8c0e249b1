"""A dataset of one's own (dataset.json + images + labels + supervoxels) trains and validates through the same
commands as the built-in datasets, with no code change."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data.core.io import read_volume
from data.core.specs import load_spec
from tests.conftest import PROJECT_ROOT
from tests.helpers import full_config

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`

NAME = "MYPHANTOMS"


@pytest.fixture(scope="module")
def own_dataset(phantom_dir, tmp_path_factory):
    """The session's phantoms under other folder names, described only by a dataset.json."""
    root = tmp_path_factory.mktemp("own") / "my_phantoms"
    shutil.copytree(phantom_dir / "synth_normalized", root / "scans")
    shutil.copytree(phantom_dir / "supervoxels_1000", root / "supervoxels_1000")
    synth = load_spec("SYNTH")
    (root / "dataset.json").write_text(json.dumps({
        "name": NAME, "modality": "MR", "region": "abdomen", "image_dir": "scans",
        "labels": {"background": 0, "liver": 1, "right kidney": 2, "left kidney": 3, "spleen": 4},
        "eval_labels": [1, 4], "defaults": {"n_sv": 1000, "superpixel_threshold": 50.0},
        "preprocessing": {**synth.preprocessing.to_mapping(), "size": 64}}, indent=1))
    return root


def _run(script, *updates, data_dir, log_dir, check=True):
    args = [sys.executable, script, "-l", "WARNING", "with", "adnet", f"dataset={NAME}", f"data_dir={data_dir}",
            f"log_dir={log_dir}", "encoder.weights=none", "evaluation.batch_size=4", *updates]
    out = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_own_dataset_trains_and_validates_like_a_built_in_one(own_dataset, tmp_path):
    log_dir = tmp_path / "runs"
    _run("training.py", "train.n_steps=2", "train.print_every=1", data_dir=own_dataset, log_dir=log_dir)
    run = next((log_dir / "train").glob(f"adnet_{NAME}_setting1_labels1-4_fold0/1"))
    assert (run / "snapshots" / "2.pth").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == NAME and config["test_labels"] == [1, 4] and config["data"]["n_sv"] == 1000

    # one class keeps the test short (the CPU encoder dominates); the default classes were checked above
    out = _run("validation.py", "test_labels=[4]", f"evaluation.checkpoint={run / 'snapshots' / '2.pth'}",
               data_dir=own_dataset, log_dir=log_dir).stdout
    assert "spleen" in out and "mean" in out
    test = next((log_dir / "test").glob(f"adnet_{NAME}_setting1_labels4_fold0/1"))
    results = json.loads((test / "results.json").read_text())
    assert results["dataset"] == NAME and set(results["classes"]) == {"spleen"}
    assert np.isfinite(results["mean_dice"])
    pred, geometry = read_volume(next((test / "predictions").glob("*spleen*")))
    image, image_geometry = read_volume(own_dataset / "scans" / f"image_{results['query_scans'][0]}.nii.gz")
    assert pred.shape == image.shape and geometry.matches(image_geometry)


def test_class_id_missing_from_dataset_json_is_a_clear_error(own_dataset, tmp_path):
    """What validation.py and training.py run, in-process (the commands themselves are tested above)."""
    from models.engine.evaluation import evaluate
    from models.engine.trainer import train
    cfg = full_config("adnet", NAME, own_dataset, tmp_path, test_labels=[2, 7],
                      **{"evaluation.checkpoint": "untrained", "encoder.weights": "none"})
    with pytest.raises(ValueError, match=rf"test_labels \[7\] not in the {NAME} label table \(1 liver, "):
        evaluate(cfg, None, progress=False)
    with pytest.raises(ValueError, match=rf"test_labels \[7\] not in the {NAME} label table"):
        train(cfg, tmp_path / "run", progress=False)


def test_bad_preprocessing_block_names_the_file(own_dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(own_dataset, broken)
    description = json.loads((broken / "dataset.json").read_text())
    description["preprocessing"]["orientation"] = "LLS"
    (broken / "dataset.json").write_text(json.dumps(description))
    from data.core.io import DataError
    with pytest.raises(DataError, match=r"dataset.json: orientation 'LLS' is not a DICOMOrient code"):
        load_spec(NAME, broken)
