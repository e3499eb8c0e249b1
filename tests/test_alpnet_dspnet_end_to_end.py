"""SSL-ALPNet and DSPNet end to end on synthetic phantoms: 2-D superpixels, 2 training steps, evaluation."""
import json

import numpy as np
import pytest
import torch

from configs.experiment import check_config, method_defaults


@pytest.fixture(scope="module")
def superpixel_phantoms(tmp_path_factory):
    from data.phantoms import generate_phantoms
    from data.pseudolabels import generate_pseudolabels
    root = tmp_path_factory.mktemp("alp_phantoms") / "SYNTH"
    generate_phantoms(root, n_scans=6, size=64, slices=12, n_sv=300, progress=False)
    generate_pseudolabels(root, "SYNTH", kind="superpixels", progress=False, summary=False)
    return root


def _config(method, data_dir, log_dir, setting=1):
    d = method_defaults(method, "SYNTH", setting)
    cfg = {"method": method, "dataset": "SYNTH", "data_dir": str(data_dir), "setting": setting,
           "test_labels": d.pop("test_labels"), "exclude_rule": "any", "eval_fold": 0, "seed": 1,
           "device": "cpu", "log_dir": str(log_dir), "exp_name": f"{method}_e2e", **d}
    check_config(cfg)
    cfg["encoder"]["weights"] = "none"
    cfg["train"].update(n_steps=2, snapshot_every=2, print_every=1, checkpoint_every=2)
    cfg["evaluation"].update(batch_size=6, n_overlays=0)
    return cfg


@pytest.mark.parametrize("method, setting", [("alpnet", 2), ("dspnet", 1)])
def test_train_two_steps_then_evaluate(superpixel_phantoms, tmp_path, method, setting):
    from models.engine.evaluation import evaluate
    from models.engine.trainer import train
    cfg = _config(method, superpixel_phantoms, tmp_path / "runs", setting)
    assert (superpixel_phantoms / "superpixels_400").is_dir()
    torch.manual_seed(0)
    snapshot = train(cfg, tmp_path / "train", progress=False)
    assert snapshot.name == "2.pth" and snapshot.is_file()
    state = torch.load(snapshot, map_location="cpu", weights_only=True)["model"]
    assert ("head.cal" in state) == (method == "dspnet")

    cfg["evaluation"]["checkpoint"] = str(snapshot)
    result = evaluate(cfg, tmp_path / "test", progress=False)
    assert result.class_ids() == cfg["test_labels"]
    assert all(np.isfinite(s.dice) for s in result.scores) and np.isfinite(result.mean())
    summary = json.loads((tmp_path / "test" / "results.json").read_text())
    assert np.isfinite(summary["mean_dice"]) and summary["method"] == method
    assert (tmp_path / "test" / "results.csv").is_file()
    assert len(list((tmp_path / "test" / "predictions").glob("*.nii.gz"))) == len(result.predictions)
