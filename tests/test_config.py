"""Configuration: layered defaults, per-setting values, and errors for typos and unknown names."""
import re
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


# ----------------------------------------------------------------------------- every default in YAML
def _project_copy(tmp_path):
    """The code and configs of the project in tmp_path (to edit a YAML layer as a user would)."""
    import shutil
    for name in ("configs", "models", "data", "dataloaders", "evaluation", "launch"):
        shutil.copytree(PROJECT_ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "[A-Z]*[A-Z0-9]"))   # no dataset folders
    for name in ("training.py", "validation.py"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    return tmp_path


def _cli_in(root, *args):
    return subprocess.run([sys.executable, "training.py", *args], cwd=root, capture_output=True, text=True,
                          timeout=120)


def test_editing_base_yaml_is_the_same_as_with_key_value(tmp_path):
    root = _project_copy(tmp_path)
    base = root / "configs" / "base.yaml"
    base.write_text(base.read_text().replace("\nsetting: 1 ", "\nsetting: 2 "))
    edited = _cli_in(root, "print_config", "with", "qnet", "chaost2")
    typed = _cli("print_config", "with", "qnet", "chaost2", "setting=2")
    assert edited.returncode == 0 == typed.returncode, edited.stderr
    for line in ("setting = 2", "test_labels = [2, 3]", "alpha = [0.6, 0.4]"):   # what follows the setting too
        assert line in edited.stdout and line in typed.stdout, line
    plain = lambda text: re.sub(r"\x1b\[[0-9;]*m", "", text)       # print_config colours what `with` changed
    assert plain(edited.stdout) == plain(typed.stdout)

    base.write_text(base.read_text() + "settting: 2\n")
    bad = _cli_in(root, "print_config", "with", "qnet", "chaost2")
    assert bad.returncode != 0
    assert "base.yaml: unknown config key 'settting' (did you mean 'setting'?)" in bad.stderr, bad.stderr


@pytest.mark.parametrize("layer, line, message", [
    ("methods/qnet.yaml", "optim:\n  lr_stp_gamma: 0.9\n", "qnet.yaml: unknown config key 'optim.lr_stp_gamma' "
                                                          "(did you mean 'optim.lr_step_gamma'?)"),
    ("methods/qnet.yaml", "head_: {}\n", "qnet.yaml: unknown config key 'head_' (did you mean 'head'?)"),
    ("methods/qnet.yaml", ("set: {head: {alpha:", "set: {head: {alpah:"),
     "qnet.yaml (overrides[0].set): unknown config key 'head.alpah' (did you mean 'head.alpha'?)"),
    ("datasets/chaost2.yaml", "eval_label: [1]\n", "chaost2.yaml: unknown key 'eval_label' "
                                                   "(did you mean 'eval_labels'?)"),
    ("protocols/qnet.yaml", "  supp_ix: 2\n", "qnet.yaml: unknown config key 'evaluation.supp_ix' "
                                               "(did you mean 'evaluation.supp_idx'?)"),
])
def test_a_misspelt_key_in_any_yaml_layer_names_the_file_and_the_key(tmp_path, monkeypatch, layer, line, message):
    import shutil

    import yaml
    from sacred.config import config_files

    import configs.experiment as experiment
    import data.core.specs as specs
    configs = tmp_path / "configs"
    shutil.copytree(experiment.CONFIG_DIR, configs, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    path = configs / layer
    text = path.read_text().replace(*line) if isinstance(line, tuple) else path.read_text().rstrip("\n") + "\n" + line
    path.write_text(text)
    monkeypatch.setattr(experiment, "METHOD_DIR", configs / "methods")
    monkeypatch.setattr(specs, "BUILTIN_SPEC_DIR", configs / "datasets")
    with pytest.raises((ConfigError, SystemExit), match=re.escape(message)):
        if layer.startswith("methods/"):
            experiment._method_yaml("qnet")
        elif layer.startswith("datasets/"):
            specs.load_spec("CHAOST2")
        else:
            experiment._read_config_files_as_plain_data()      # how Sacred reads `with protocol_qnet`
            config_files.load_config_file(str(path))
    assert yaml.safe_load(text) is not None


def test_a_config_file_of_your_own_is_checked_and_named(tmp_path):
    own = tmp_path / "my_experiment.yaml"
    own.write_text("setting: 2\ntrain:\n  n_stesp: 3\n")
    bad = _cli("print_config", "with", "adnet", str(own))
    assert bad.returncode != 0
    assert f"{own}: unknown config key 'train.n_stesp' (did you mean 'train.n_steps'?)" in bad.stderr, bad.stderr
    own.write_text("setting: 2\ntrain:\n  n_steps: 3\n")
    ok = _cli("print_config", "with", "adnet", str(own))
    assert ok.returncode == 0 and "setting = 2" in ok.stdout and "n_steps = 3" in ok.stdout


def test_a_misspelt_named_config_is_one_line_with_the_closest_name():
    bad = _cli("print_config", "with", "qnte", "chaost2")
    assert bad.returncode != 0
    lines = (bad.stdout + bad.stderr).strip().splitlines()
    assert len(lines) <= 3 and "did you mean 'qnet'" in lines[-1] and lines[-1].startswith("error: "), lines


def test_no_default_is_written_twice():
    """base.yaml holds every key of the typed experiment, top-level ones included, and the config that
    training.py builds for a method equals build_config's (both read the defaults from the YAML)."""
    from configs.experiment import TOP_LEVEL_KEYS, base_defaults, build_config
    base = base_defaults()
    assert set(TOP_LEVEL_KEYS) <= set(base)
    cfg = build_config("qnet", "CHAOST2", "./data/CHAOST2")
    assert {k: cfg[k] for k in ("seed", "eval_fold", "device", "exclude_rule")} == \
        {k: base[k] for k in ("seed", "eval_fold", "device", "exclude_rule")}
