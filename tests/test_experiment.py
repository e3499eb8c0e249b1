"""The typed experiment (models/engine/experiment.py): the config dict converted once and given back
unchanged, every key required, unknown keys named with the closest one, older stored configs upgraded."""
import dataclasses

import pytest
import torch

from configs.experiment import build_config, method_names
from data.core.errors import ConfigError
from data.core.run_folder import TRAIN, config_fingerprint
from models.engine.experiment import (
    ADDED_KEYS,
    SECTIONS,
    Experiment,
    OptimConfig,
    upgrade_config,
)


def _config(method="adnet", **updates):
    return build_config(method, "SYNTH", "data/SYNTH", "runs", updates={"device": "cpu", **updates})


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("setting", [1, 2])
def test_the_config_comes_back_unchanged(method, setting):
    cfg = build_config(method, "SYNTH", "data/SYNTH", "runs", setting)
    exp = Experiment.from_config(cfg)
    assert exp.to_config() == cfg
    assert config_fingerprint(exp.to_config(), TRAIN) == config_fingerprint(cfg, TRAIN)
    assert upgrade_config(cfg) == cfg                    # a current config has every key
    assert exp.head["name"] == cfg["head"]["name"] and exp.optim.lr == cfg["optim"]["lr"]


def test_no_field_has_a_default():
    """Every default lives in YAML: the dataclasses have none."""
    for cls in [Experiment, *(s for s in SECTIONS.values() if s is not dict)]:
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING, \
                f"{cls.__name__}.{field.name}"


def test_unknown_and_missing_keys_are_named():
    cfg = _config()
    cfg["train"]["n_stpes"] = cfg["train"].pop("n_steps")
    cfg["seeed"] = cfg.pop("seed")
    with pytest.raises(ConfigError) as err:
        Experiment.from_config(cfg)
    message = str(err.value)
    assert "unknown config key 'train.n_stpes' (did you mean 'train.n_steps'?)" in message
    assert "missing config key 'train.n_steps'" in message
    assert "unknown config key 'seeed' (did you mean 'seed'?)" in message and "missing config key 'seed'" in message
    cfg = _config()
    cfg["optim"] = 0.1
    with pytest.raises(ConfigError, match="config key 'optim' is a section with keys"):
        Experiment.from_config(cfg)
    cfg = _config()
    del cfg["head"]["name"]
    with pytest.raises(ConfigError, match="missing config key 'head.name'"):
        Experiment.from_config(cfg)
    with pytest.raises(ConfigError, match="missing config key 'optim.warmup_episodes'"):
        OptimConfig.from_config({k: v for k, v in _config()["optim"].items() if k != "warmup_episodes"})


def test_superpixel_keys_are_needed_only_by_the_superpixel_sampler():
    assert Experiment.from_config(_config("alpnet")).sampler.id_draw == "present"
    adnet = Experiment.from_config(_config("adnet"))
    assert adnet.sampler.id_draw is None and "id_draw" not in adnet.to_config()["sampler"]
    with pytest.raises(ConfigError, match="sampler.name='superpixel' reads sampler.superpixel_min_size and "
                                          "sampler.id_draw"):
        Experiment.from_config(_config("adnet", **{"sampler.name": "superpixel"}))


def _stored_before_the_added_keys(cfg: dict) -> dict:
    old = upgrade_config(cfg)
    for dotted in ADDED_KEYS:
        section, key = dotted.split(".")
        del old[section][key]
    return old


def test_an_older_stored_config_is_upgraded():
    old = _stored_before_the_added_keys(_config())
    with pytest.raises(ConfigError, match="missing config key 'optim.name'"):
        Experiment.from_config(old)
    exp = Experiment.from_config(upgrade_config(old))
    assert (exp.optim.name, exp.optim.warmup_episodes, exp.optim.scale_lr_with_batch) == ("sgd", 0, False)
    assert (exp.encoder.allow_partial, exp.encoder.bn_statistics, exp.augment.on_device) == (False, "batch", False)
    assert (exp.evaluation.amp, exp.evaluation.cache_features, exp.train.resume) == ("off", True, None)
    assert upgrade_config({"optim": {"lr": 0.1}}) == {"optim": {"lr": 0.1, **{
        k.split(".")[1]: v for k, v in ADDED_KEYS.items() if k.startswith("optim.")}}}   # sections it lacks stay out


def test_a_resume_point_written_before_keys_were_added_resumes(tmp_path):
    """The resume check compares the stored config, upgraded, with the new one."""
    from models.engine.trainer import check_resume, save_snapshot
    run = tmp_path / "run"
    cfg = _config(**{"augment.on_device": False, "optim.scale_lr_with_batch": False, "train.resume": str(run)})
    stored = _stored_before_the_added_keys({**cfg, "train": {**cfg["train"], "resume": None}})
    model = torch.nn.Linear(2, 2)
    save_snapshot(run / "snapshots" / "last.pth", model, torch.optim.SGD(model.parameters(), lr=0.1), 2, stored)
    assert check_resume(cfg)["episodes"] == 2
    changed = {**cfg, "augment": {**cfg["augment"], "on_device": True}}   # what the old run did not do
    with pytest.raises(ConfigError, match=r"augment.on_device: False -> True"):
        check_resume(changed)


def test_a_snapshot_written_before_evaluation_amp_is_read_as_fp32(tmp_path):
    from models.engine.segmentation import read_snapshot
    path = tmp_path / "100.pth"
    torch.save({"model": {}, "config": _stored_before_the_added_keys(_config())}, path)
    exp, state = read_snapshot(path)
    assert exp.evaluation.amp == "off" and state == {}
