"""Configuration: layered defaults, per-setting values, and errors for typos and unknown names."""
import subprocess
import sys

import pytest

from configs.experiment import ConfigError, check_config, experiment_name, method_defaults
from tests.conftest import PROJECT_ROOT


def _config(method="adnet", dataset="CHAOST2", setting=1, **top):
    d = method_defaults(method, dataset, setting)
    cfg = {"method": method, "dataset": dataset, "data_dir": "./data/X", "setting": setting,
           "test_labels": d.pop("test_labels"), "exclude_rule": "any", "eval_fold": 0, "seed": 1,
           "device": "cpu", "log_dir": "runs", "exp_name": "x", **d}
    cfg.update(top)
    return cfg


def test_method_and_dataset_layers():
    chaos = method_defaults("adnet", "CHAOST2")
    cmr = method_defaults("adnet", "CMR")
    assert chaos["head"]["name"] == "adnet" and chaos["optim"]["lr_step_gamma"] == 0.95
    assert chaos["data"]["n_sv"] == 5000 and cmr["data"]["n_sv"] == 1000
    assert chaos["test_labels"] == [1, 2, 3, 4] and cmr["test_labels"] == [1, 2, 3]


def test_setting2_defaults_to_the_first_label_group():
    assert method_defaults("adnet", "CHAOST2", 2)["test_labels"] == [2, 3]
    assert method_defaults("adnet", "SABS", 2)["test_labels"] == [2, 3]


def test_typos_are_errors_with_a_suggestion():
    cfg = _config()
    cfg["train"]["n_stpes"] = 3
    with pytest.raises(ConfigError, match="unknown config key 'train.n_stpes' \\(did you mean 'train.n_steps'\\?\\)"):
        check_config(cfg)
    cfg = _config()
    cfg["head"]["init_treshold"] = 1.0
    with pytest.raises(ConfigError, match="head.init_treshold.*head.init_threshold"):
        check_config(cfg)
    check_config(_config())


def test_values_of_the_wrong_kind():
    cfg = _config()
    cfg["head"]["align"] = "false"          # what `head.align=false` gives on the command line
    cfg["train"]["n_steps"] = "1000"
    with pytest.raises(ConfigError, match=r"head.align must be True or False.*train.n_steps must be a number"):
        check_config(cfg)


@pytest.mark.parametrize("key, value, message", [
    ("train.batch_episodes", "abc", "train.batch_episodes must be 'auto' or a positive whole number"),
    ("evaluation.batch_size", 0, "evaluation.batch_size must be 'auto' or a positive whole number"),
    ("train.amp", "fp16", "train.amp must be 'auto', 'bf16' or 'off'"),
    ("train.channels_last", "yes", "train.channels_last must be 'auto', True or False"),
    ("train.n_steps", 1.5, "train.n_steps counts something: a whole number"),
])
def test_auto_keys_and_counts_are_checked(key, value, message):
    section, name = key.split(".")
    cfg = _config()
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
    cfg = _config()
    cfg["train"].update(batch_episodes=4, amp="off", channels_last=False, n_steps=2000.0)
    cfg["evaluation"]["batch_size"] = 2
    check_config(cfg)


def test_every_auto_key_of_base_yaml_has_its_check():
    import yaml
    from configs.experiment import AUTO_CHOICES, CONFIG_DIR

    def autos(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from autos(value, f"{prefix}{key}.")
            elif value == "auto":
                yield prefix + key
    assert set(autos(yaml.safe_load((CONFIG_DIR / "base.yaml").read_text()))) == set(AUTO_CHOICES)


def test_unknown_method_and_dataset():
    with pytest.raises(ConfigError, match="unknown method 'adnett'.*did you mean 'adnet'"):
        method_defaults("adnett", "CHAOST2")
    with pytest.raises(Exception, match="unknown dataset 'CHAOS'"):
        method_defaults("adnet", "CHAOS")
    with pytest.raises(ConfigError, match="setting must be 1 or 2"):
        method_defaults("adnet", "CHAOST2", 3)


def test_experiment_name_says_what_ran():
    assert experiment_name("qnet", "CMR", 2, [1, 2, 3], 4) == "qnet_CMR_setting2_labels1-2-3_fold4"


def _cli(*args):
    return subprocess.run([sys.executable, "training.py", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_print_config_and_typo_on_the_command_line():
    ok = _cli("print_config", "with", "adnet", "chaost2", "setting=2")
    assert ok.returncode == 0, ok.stderr
    assert "test_labels = [2, 3]" in ok.stdout and "n_sv = 5000" in ok.stdout
    bad = _cli("print_config", "with", "chaost2", "optim.lrr=0.1")
    assert bad.returncode != 0 and "unknown config key 'optim.lrr'" in bad.stderr + bad.stdout
    # setting an "auto" key to a number is how it is meant to be used: no type-change warning
    auto = _cli("print_config", "with", "adnet", "train.batch_episodes=4", "train.channels_last=False")
    assert auto.returncode == 0 and "Changed type" not in auto.stderr + auto.stdout, auto.stderr
