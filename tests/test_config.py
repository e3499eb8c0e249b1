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


# ----------------------------------------------------------------------------- every value checked
@pytest.mark.parametrize("method, updates, message", [
    ("adnet", {"head.scaler": float("nan")}, "head.scaler must be a finite number, got nan"),
    ("adnet", {"optim.lr": float("inf")}, "optim.lr must be a finite number, got inf"),
    ("qnet", {"head.alpha": [0.9, float("nan")]}, "head.alpha[1] must be a finite number, got nan"),
    ("adnet", {"augment.gamma": [float("-inf"), 1.5]}, "augment.gamma[0] must be a finite number, got -inf"),
    ("adnet", {"train.n_steps": 0}, "train.n_steps must be >= 1"),
    ("adnet", {"train.n_steps": -3}, "train.n_steps must be >= 1"),
    ("adnet", {"optim.lr": -0.001}, "optim.lr must be > 0, got -0.001"),
    ("adnet", {"optim.lr": float("nan")}, "optim.lr must be a finite number, got nan"),
    ("adnet", {"sampler.reverse_p": -3}, "sampler.reverse_p must be a probability in [0, 1], got -3"),
    ("adnet", {"sampler.min_size": -5}, "sampler.min_size must be >= 0"),
    ("adnet", {"evaluation.n_part": 0}, "evaluation.n_part must be >= 1"),
    ("adnet", {"evaluation.supp_idx": -5}, "evaluation.supp_idx must be -1 (the scan after the test scans) or"),
    ("adnet", {"evaluation.supp_idx": -2}, "evaluation.supp_idx must be -1"),
    ("adnet", {"eval_fold": 7}, "eval_fold must be a fold index 0..4 (CHAOST2 has 5 folds), got 7"),
    ("adnet", {"train.batch_episodes": 100000}, "train.batch_episodes must be at most train.n_steps (50000"),
    ("adnet", {"train.snapshot_every": 0}, "train.snapshot_every must be >= 1"),
    ("adnet", {"train.print_every": 0}, "train.print_every must be >= 1"),
    ("adnet", {"train.checkpoint_every": -1}, "train.checkpoint_every must be >= 1"),
    ("adnet", {"train.num_workers": -1}, "train.num_workers must be >= 0"),
    ("adnet", {"optim.weight_decay": -1e-4}, "optim.weight_decay must be >= 0"),
    ("adnet", {"optim.momentum": 1.0}, "optim.momentum must be in [0, 1)"),
    ("adnet", {"optim.betas": [0.9, 1.5]}, "optim.betas must be two numbers [beta1, beta2], each in [0, 1)"),
    ("adnet", {"optim.eps": 0.0}, "optim.eps must be > 0"),
    ("adnet", {"optim.lr_step_gamma": 0.0}, "optim.lr_step_gamma must be in (0, 1]"),
    ("adnet", {"optim.lr_step_gamma": 1.5}, "optim.lr_step_gamma must be in (0, 1]"),
    ("adnet", {"optim.lr_step_every": 0}, "optim.lr_step_every must be >= 1"),
    ("adnet", {"optim.warmup_episodes": -10}, "optim.warmup_episodes must be >= 0"),
    ("adnet", {"augment.gamma": [1.5, 0.5]}, "augment.gamma must be a range [lo, hi] with 0 < lo <= hi"),
    ("adnet", {"augment.scale": [0.0, 1.2]}, "augment.scale must be a range [lo, hi] with 0 < lo <= hi"),
    ("adnet", {"augment.elastic_sigma": 0.0}, "augment.elastic_sigma must be > 0"),
    ("adnet", {"augment.rotate": -5.0}, "augment.rotate must be >= 0"),
    ("adnet", {"loss.bg_weight": -0.1}, "loss.bg_weight must be >= 0"),
    ("adnet", {"loss.weights": {"align": -1.0}}, "loss.weights must be a mapping of auxiliary losses to weights >= 0"),
    ("adnet", {"loss.ignore_index": 1}, "loss.ignore_index must be a label value other than the classes 0 and 1"),
    ("adnet", {"evaluation.n_overlays": -1}, "evaluation.n_overlays must be >= 0"),
    ("adnet", {"data.n_sv": 0}, "data.n_sv must be >= 1"),
    ("alpnet", {"sampler.superpixel_min_size": 0}, "sampler.superpixel_min_size must be >= 1"),
    ("adnet", {"evaluation.chunking": "zrnage"}, "evaluation.chunking must be one of 'zrange', 'count'"),
    ("adnet", {"encoder.layout": "resnet50"}, "encoder.layout must be one of 'deeplab_r101', 'qnet_r101'"),
    # the heads' own checks, run by building the head on the meta device
    ("gmrd", {"head.n_fg": 0}, "head.n_fg must be >= 1, got 0"),
    ("gmrd", {"head.n_bg": 0}, "head.n_bg must be >= 1, got 0"),
    ("rpt", {"head.fg_num": 0}, "head.fg_num must be >= 1, got 0"),
    ("qnet", {"head.refine_steps": -1}, "head.refine_steps must be >= 0"),
    ("qnet", {"head.refine_lr": 0.0}, "head.refine_lr must be > 0"),
    ("adnet", {"head.scaler": 0.0}, "head.scaler must be > 0"),
    ("adnet", {"head.kappa": -0.5}, "head.kappa must be > 0"),
    ("alpnet", {"head.window": 0}, "head.window must be >= 1"),
    ("alpnet", {"head.fg_thresh": 1.5}, "head.fg_thresh must be in [0, 1]"),
    ("alpnet", {"head.map_eps": 0.0}, "head.map_eps must be > 0"),
    ("dspnet", {"head.min_seeds": 9}, "head.min_seeds must be in [1, 5], got 9"),
    ("dspnet", {"head.seed_stride": 0}, "head.seed_stride must be >= 1"),
    ("dspnet", {"head.cluster_feature_scale": 0.0}, "head.cluster_feature_scale must be > 0"),
    ("dspnet", {"head.w": [0.2, 0.8]}, "head.w must be three numbers"),
    ("gmrd", {"head.mlp_dropout": 1.0}, "head.mlp_dropout must be a probability in [0, 1)"),
    ("rpt", {"head.dropout": -0.1}, "head.dropout must be in [0, 1)"),
    # names that become folders
    ("adnet", {"exp_name": "../x"}, "exp_name must be a simple name"),
    ("adnet", {"exp_name": "a/b"}, "exp_name must be a simple name"),
    ("adnet", {"exp_name": ".."}, "exp_name must be a simple name"),
    ("adnet", {"exp_name": "x" * 201}, "exp_name must be a simple name (up to 200"),
])
def test_each_impossible_value_is_refused_with_its_key(method, updates, message):
    from configs.experiment import build_config
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(method, "CHAOST2", "./data/X", updates=updates)


@pytest.mark.parametrize("method, dataset", [("../base", "CHAOST2"), ("adnet", "../base"), ("adnet", "a/b")])
def test_method_and_dataset_must_be_simple_names(method, dataset):
    from configs.experiment import build_config
    key = "method" if method != "adnet" else "dataset"
    with pytest.raises(ConfigError, match=f"{key} must be a simple name"):
        build_config(method, dataset, "./data/X")


def test_every_problem_is_named_in_one_error():
    from configs.experiment import build_config
    with pytest.raises(ConfigError) as err:
        build_config("adnet", "CHAOST2", "./data/X", updates={"train.n_steps": 0, "optim.lr": float("nan"),
                                                              "sampler.reverse_p": 2.0})
    message = str(err.value)
    assert message.count(" must be ") == 3, message       # one message per key, none twice
    assert "train.n_steps" in message and "optim.lr" in message and "sampler.reverse_p" in message


def test_valid_configs_pass_and_edge_values_are_accepted():
    from configs.experiment import build_config
    for method in ("adnet", "qnet", "alpnet", "dspnet", "rpt", "gmrd"):
        for dataset in ("CHAOST2", "SABS", "CMR", "SYNTH"):
            for setting in (1, 2):
                build_config(method, dataset, "./data/X", setting=setting)
    build_config("adnet", "CHAOST2", "./data/X", updates={
        "train.n_steps": 4, "train.batch_episodes": 4, "sampler.reverse_p": 1.0, "sampler.min_size": 0,
        "optim.momentum": 0.0, "optim.lr_step_gamma": 1.0, "evaluation.supp_idx": 4, "eval_fold": 4,
        "exp_name": "my run+1.v2", "head.init_threshold": -1e6, "loss.weights": {}})


def test_supp_idx_is_checked_against_the_fold_the_data_gives(tmp_path):
    """Without explicit folds, a fold's size comes from the scans in the folder: TOY's 7 scans make fold 0
    hold 2 (block 0 + the next scan). The pre-flight check of the run (check_run_inputs) says the same."""
    import dataclasses

    from configs.experiment import build_config
    from models.engine.builders import check_run_inputs
    from models.engine.experiment import Experiment
    from tests.helpers import write_dataset
    root = write_dataset(tmp_path / "toy")
    ok = build_config("adnet", "TOY", root, updates={"evaluation.supp_idx": 1})
    for supp_idx in (2, 99):
        with pytest.raises(ConfigError, match=re.escape(f"evaluation.supp_idx must be -1 or 0..1 (fold 0 of TOY holds "
                                                        f"2 scans), got {supp_idx}")):
            build_config("adnet", "TOY", root, updates={"evaluation.supp_idx": supp_idx})
    with pytest.raises(ConfigError, match=re.escape("eval_fold must be a fold index 0..4 (TOY has 5 folds), got 7")):
        build_config("adnet", "TOY", root, updates={"eval_fold": 7})
    exp = Experiment.from_config(ok)
    bad = dataclasses.replace(exp, evaluation=dataclasses.replace(exp.evaluation, supp_idx=5))
    with pytest.raises(ConfigError, match=re.escape("evaluation.supp_idx must be -1 or 0..1")):
        check_run_inputs(bad, "test")
    check_run_inputs(exp, "test")


def test_the_head_check_uses_the_encoders_channels():
    import torch

    from configs.experiment import encoder_channels
    from models.encoder import LAYOUTS, ResNetEncoder
    for layout in LAYOUTS:
        with torch.device("meta"):
            assert encoder_channels(layout) == ResNetEncoder(layout).channels


@pytest.mark.parametrize("head, options, message", [
    ("adnet", {"scaler": float("nan")}, "head.scaler must be a finite number"),
    ("adnet", {"init_threshold": float("inf")}, "head.init_threshold must be a finite number"),
    ("qnet", {"kappa": 0}, "head.kappa must be > 0"),
    ("qnet", {"alpha": (float("nan"), 0.1)}, "head.alpha must be a finite number"),
    ("rpt", {"fg_num": 0}, "head.fg_num must be >= 1"),
    ("rpt", {"iterations": float("inf")}, "head.iterations must be a finite whole number"),
    ("gmrd", {"n_fg": 0}, "head.n_fg must be >= 1"),
    ("gmrd", {"image_size": 2.5}, "head.image_size must be a finite whole number"),
    ("alpnet", {"cos_eps": -1e-4}, "head.cos_eps must be > 0"),
    ("dspnet", {"attention_eps": 0.0}, "head.attention_eps must be > 0"),
    ("dspnet", {"cal_lr_multiplier": -1.0}, "head.cal_lr_multiplier must be >= 0"),
    ("dspnet", {"max_seeds": 0}, "head.max_seeds must be >= 1"),
])
def test_each_head_refuses_its_impossible_options(head, options, message):
    import torch

    from configs.experiment import encoder_channels
    from models.heads import build_head
    layout = "qnet_r101" if head in ("qnet", "rpt", "gmrd") else "deeplab_r101"
    with pytest.raises(ValueError, match=re.escape(message)), torch.device("meta"):
        build_head(head, channels=encoder_channels(layout), **options)


# ----------------------------------------------------------------------------- YAML files
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path):
    import time

    from sacred.config import config_files

    import configs.experiment as experiment
    from data.core.specs import read_yaml
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)                                   # 9^10 strings once expanded
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=re.escape(f"{path}: YAML aliases are not accepted (found *a")):
        experiment.load_yaml(path)                          # configs/*.yaml
    experiment._read_config_files_as_plain_data()           # `with bomb.yaml`
    with pytest.raises(SystemExit, match=re.escape(f"{path}: YAML aliases are not accepted")):
        config_files.load_config_file(str(path))
    with pytest.raises(ConfigError, match="dataset.yaml: YAML aliases are not accepted"):
        read_yaml("name: &n TOY\nother: *n\n", "dataset.yaml")   # data.core.specs reads dataset YAMLs so
    assert time.perf_counter() - start < 2.0
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        read_yaml("train: [1", "bad.yaml")


def test_no_shipped_yaml_uses_aliases():
    from configs.experiment import CONFIG_DIR, load_yaml
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        load_yaml(path)
