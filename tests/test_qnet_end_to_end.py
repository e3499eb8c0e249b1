"""Q-Net end to end on CPU: a few training steps on synthetic phantoms, then the evaluation protocol
with test-time refinement; the trained model also loads from a checkpoint in the reference's format."""
import json

import numpy as np
import pytest
import torch

from configs.experiment import check_config, method_defaults
from models.engine.builders import build_model
from models.engine.evaluation import evaluate
from models.engine.experiment import Experiment
from models.engine.trainer import train

pytestmark = pytest.mark.slow     # trains a model, runs commands or reads every real scan: not in `make check`


def _config(data_dir, log_dir, dataset="SYNTH", **sections):
    d = method_defaults("qnet", dataset, 1, str(data_dir))
    cfg = {"method": "qnet", "dataset": dataset, "data_dir": str(data_dir), "setting": 1,
           "test_labels": d.pop("test_labels"), "exclude_rule": "any", "eval_fold": 0, "seed": 1,
           "device": "cpu", "log_dir": str(log_dir), "exp_name": "qnet_e2e", **d}
    cfg["encoder"]["weights"] = "none"
    cfg["train"].update(n_steps=2, snapshot_every=2, print_every=1)
    cfg["evaluation"].update(save_predictions=True, n_overlays=0)
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    check_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from data.phantoms import generate_phantoms
    root = tmp_path_factory.mktemp("synth")
    generate_phantoms(root, n_scans=6, size=64, slices=12, n_sv=300, progress=False)
    return root


def test_train_then_evaluate_with_refinement(phantoms, tmp_path):
    cfg = _config(phantoms, tmp_path, data={"n_sv": 300}, test_labels=[4])
    assert cfg["head"]["refine_steps"] == 7 and cfg["head"]["alpha"] == [0.9, 0.1]
    snapshot = train(cfg, tmp_path / "train", progress=False)
    assert snapshot.name == "2.pth" and snapshot.is_file()

    cfg["evaluation"]["checkpoint"] = str(snapshot)
    result = evaluate(cfg, tmp_path / "test", progress=False)
    assert result.n_query_slices > 0 and result.class_ids() == [4]
    assert all(np.isfinite(s.dice) for s in result.scores)
    summary = json.loads((tmp_path / "test" / "results.json").read_text())
    assert summary["method"] == "qnet" and (tmp_path / "test" / "results.csv").is_file()
    assert list((tmp_path / "test" / "predictions").glob("*.nii.gz"))

    # the same weights saved under the reference Q-Net's key names give the same predictions
    state = torch.load(snapshot, map_location="cpu", weights_only=True)["model"]
    rename = {"encoder.reduce.layer3.": "encoder.reduce1.", "encoder.reduce.layer4.": "encoder.reduce2.",
              "encoder.threshold.": "encoder.reduce1d."}
    ref = {}
    for key, value in state.items():
        prefix = next((p for p in rename if key.startswith(p)), "")
        ref[(rename[prefix] if prefix else "") + key[len(prefix):]] = value
    torch.save(ref, tmp_path / "30000.pth")
    cfg["evaluation"]["checkpoint"] = str(tmp_path / "30000.pth")
    again = evaluate(cfg, None, progress=False)
    assert [(s.tp, s.fp, s.fn) for s in again.scores] == [(s.tp, s.fp, s.fn) for s in result.scores]


def test_batched_evaluation_equals_slice_by_slice(phantoms):
    """Refinement over a chunk's slices at once gives the predictions of one slice per call."""
    cfg = _config(phantoms, phantoms / "runs", data={"n_sv": 300}, test_labels=[4],
                  evaluation={"checkpoint": "untrained"})
    torch.manual_seed(0)
    exp = Experiment.from_config(cfg)
    model = build_model(exp.encoder, exp.head, load_weights=False)
    batched = evaluate(cfg, None, progress=False, model=model)
    cfg["evaluation"]["batch_size"] = 1
    single = evaluate(cfg, None, progress=False, model=model)
    assert batched.n_query_slices == single.n_query_slices > 1
    for key, pred in batched.predictions.items():
        assert np.array_equal(pred, single.predictions[key])


def test_real_chaos_scan_with_refinement(chaos_dir, tmp_path):
    """Real data at full size (256 x 256 slices; 512 x 64 x 64 and 512 x 32 x 32 features), with an
    untrained encoder: the pipeline, not the accuracy. One support and one query scan of fold 0
    (the whole fold takes minutes on 2 CPU cores), spleen only; refinement on."""
    from data.core.specs import Fold
    from evaluation.protocol import ProtocolOptions
    from models.engine.builders import dataset_spec, volume_store
    from models.engine.evaluation import Evaluator

    exp = Experiment.from_config(_config(chaos_dir, tmp_path, dataset="CHAOST2", test_labels=[4]))
    spec = dataset_spec(exp)
    torch.manual_seed(0)
    model = build_model(exp.encoder, exp.head, load_weights=False)
    assert model.head.refine_steps == 7
    evaluator = Evaluator(model, volume_store(exp, spec), spec, Fold(0, (1, 8), ()),
                          ProtocolOptions(supp_idx=-1, n_part=3, chunking="count", scored="labelled",
                                          batch_size=2),  # small batches beat 16 on 2 CPU cores (measured)
                          progress=False)
    result = evaluator.run([4])
    assert result.support_id == 8 and result.query_ids == (1,)
    assert result.n_query_slices == 14                          # spleen on slices 18-31 of scan 1
    assert result.predictions[(1, 4)].shape == (37, 256, 256)
    assert all(np.isfinite(s.dice) and 0 <= s.dice <= 1 for s in result.scores)
