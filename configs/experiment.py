"""The Sacred experiment shared by training.py and validation.py.

Configuration is assembled in layers, lowest first:

1. configs/base.yaml: every key with its default (the top-level ones too: method, dataset, setting,
   eval_fold, seed, device, log_dir, ...; null for the derived ones: data_dir, eval_dataset (the
   training dataset), eval_data_dir (data_dir in-domain), test_labels, exp_name);
2. configs/methods/<method>.yaml: the method's encoder, head, sampler, losses and schedule, then its
   `overrides` whose `when` matches the run (keys setting, dataset, region), e.g. Q-Net's alpha
   in setting 2 or DSPNet's BCMA constants for cardiac data;
3. the dataset (configs/datasets/<name>.yaml, or the dataset.json of your own data): data_dir,
   supervoxel size, test classes;
4. named configs and `key=value` updates on the command line, which always win.

Every named config in configs/methods, configs/datasets and configs/protocols is registered by its
file name (`with qnet chaost2 protocol_qnet`), and configs/demo.yaml as `demo`. A key that is not
one of the experiment's (models.engine.experiment), in any YAML layer or a config file of your own,
is an error naming the file, the key and the closest known key; so is an unknown named config.

Every value is checked before Sacred records a run (`check_config`, from the config hook, before the
run folder exists): its kind (that of its default), its word choices (CHOICES, AUTO_CHOICES), that
every number is finite, its range (RANGES), the fold and support scan against the dataset, names that
become folders (method, dataset, exp_name), and the head's options by the head's own constructor.
Every YAML file is read without aliases (data.core.specs.read_yaml).
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import math
import os
import re
import types
from functools import lru_cache
from pathlib import Path

import torch
from sacred import Experiment
from sacred.config import config_files
from sacred.utils import NamedConfigNotFoundError
from sacred.utils import apply_backspaces_and_linefeeds

from configs.runs import ResumableFileStorageObserver
from data.core.errors import fixable_error
from data.core.io import SAFE_NAME_RULE, ConfigError, UserError, check_output_folder, is_safe_name
from data.core.specs import DatasetSpec, load_spec, read_yaml, read_yaml_file
from evaluation.protocol import match_classes
from models.encoder import LAYOUTS, ResNetEncoder
from models.engine.builders import supp_idx_problem
from models.engine.experiment import SECTIONS as TYPED_SECTIONS
from models.engine.experiment import Experiment as TypedExperiment
from models.engine.experiment import did_you_mean
from models.engine.experiment import head_name_and_options
from models.engine.trainer import OPTIMIZERS
from models.heads import HEADS, build_head, head_options
from models.heads.contract import ENCODER_ARGUMENTS

CONFIG_DIR = Path(__file__).resolve().parent
BASE_FILE = CONFIG_DIR / "base.yaml"
METHOD_DIR = CONFIG_DIR / "methods"
DATASET_DIR = CONFIG_DIR / "datasets"
PROTOCOL_DIR = CONFIG_DIR / "protocols"
SECTIONS = ("encoder", "head", "loss", "sampler", "augment", "optim", "train", "evaluation", "data")
_METHOD_META = ("description", "overrides")


def load_yaml(path: Path) -> dict:
    """A YAML layer, read without aliases (data.core.specs.read_yaml: a ConfigError names the file)."""
    return read_yaml_file(path) or {}


TOP_LEVEL_KEYS = TypedExperiment.top_level_keys()
# top-level keys whose null default is derived from others (default_data_dir, the training dataset and
# its folder for the evaluated one, the dataset's classes, experiment_name)
DERIVED_KEYS = ("data_dir", "eval_dataset", "eval_data_dir", "test_labels", "exp_name")


def _all_head_options() -> set[str]:
    return {"name"} | {option for name in HEADS for option in head_options(name)}


def key_tree(head: str | None = None) -> dict:
    """Every key of the experiment: {top-level key: None, section: {key: None}}; the head's options are
    those of `head` (of every head when None)."""
    tree: dict = {k: None for k in TOP_LEVEL_KEYS}
    for name, section in TYPED_SECTIONS.items():
        if section is dict:
            options = {"name", *head_options(head)} if head in HEADS else _all_head_options()
            tree[name] = {k: None for k in sorted(options)}
        else:
            tree[name] = {k: None for k in section.keys()}
    return tree


def layer_problems(values, tree: dict, source: str, prefix: str = "") -> list[str]:
    """The keys of a YAML layer that are not keys of the experiment, each with the closest known key."""
    if not isinstance(values, dict):
        return [f"{source}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys, got {values!r}"]
    problems = []
    for key, value in values.items():
        if key not in tree:
            problems.append(f"{source}: unknown config key '{prefix}{key}'" + did_you_mean(prefix + str(key),
                                                                                  [prefix + k for k in tree]))
        elif isinstance(tree[key], dict) and isinstance(value, dict):
            problems += layer_problems(value, tree[key], source, f"{prefix}{key}.")
        elif isinstance(tree[key], dict):
            problems.append(f"{source}: '{prefix}{key}' is a section with keys ({', '.join(tree[key])}), "
                            f"got {value!r}")
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems) + ". `python training.py print_config` lists every key.")


def _missing_base_keys(base: dict, source: str) -> list[str]:
    missing = [k for k in TOP_LEVEL_KEYS if k not in base]
    for name, section in TYPED_SECTIONS.items():
        if section is dict:
            continue
        values = base.get(name) if isinstance(base.get(name), dict) else {}
        missing += [f"{name}.{k}" for k in section.keys() if k not in values and k not in section.OPTIONAL]
    return [f"{source}: the default of '{k}' is missing (every key has its default in this file)" for k in missing]


@lru_cache(maxsize=4)
def _base_cached(path: str, mtime_ns: int) -> dict:
    base = load_yaml(Path(path))
    _raise(layer_problems(base, key_tree(), path) or _missing_base_keys(base, path))
    return base


def base_defaults() -> dict:
    """configs/base.yaml, checked: every key of the experiment with its default, and no other key."""
    return copy.deepcopy(_base_cached(str(BASE_FILE), BASE_FILE.stat().st_mtime_ns))


def base_default(key: str):
    """The default of a top-level key, from configs/base.yaml."""
    return base_defaults()[key]


def check_config_file(values, path: str) -> dict:
    """A config file given as a named config (`with my_experiment.yaml`, configs/protocols/, demo.yaml):
    every key must be one of the experiment's."""
    _raise(layer_problems(values or {}, key_tree(), str(path)))
    return values or {}


def deep_update(base: dict, update: dict) -> dict:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def method_names() -> list[str]:
    return sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))


def _method_yaml(method: str) -> dict:
    path = METHOD_DIR / f"{method}.yaml"
    if method not in method_names():
        close = difflib.get_close_matches(method, method_names(), n=1)
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(method_names())}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
    m = load_yaml(path)
    source = f"configs/methods/{method}.yaml"
    head = (m.get("head") or {}).get("name") if isinstance(m.get("head"), dict) else None
    tree = {k: v for k, v in key_tree(head).items() if k in SECTIONS}
    problems = []
    for key, value in m.items():
        if key in _METHOD_META:
            continue
        problems += layer_problems({key: value}, tree, source)
    for i, rule in enumerate(m.get("overrides") or []):
        if not isinstance(rule, dict) or set(rule) - {"when", "set"}:
            problems.append(f"{source}: overrides[{i}] takes 'when' and 'set', got {rule!r}")
            continue
        problems += layer_problems(rule.get("set") or {}, tree, f"{source} (overrides[{i}].set)")
    _raise(problems)
    return m


def _matches(when: dict, context: dict) -> bool:
    for key, want in when.items():
        if key not in context:
            raise ConfigError(f"override condition on unknown key {key!r}; use {sorted(context)}")
        wanted = want if isinstance(want, list) else [want]
        if context[key] not in wanted and str(context[key]).upper() not in [str(w).upper() for w in wanted]:
            return False
    return True


@lru_cache(maxsize=32)
def _defaults_cached(method: str, dataset: str, setting: int, data_dir: str | None, base_mtime_ns: int) -> dict:
    spec = load_spec(dataset, data_dir)
    cfg = {k: v for k, v in base_defaults().items() if k in SECTIONS}
    m = _method_yaml(method)
    deep_update(cfg, {k: v for k, v in m.items() if k in SECTIONS})
    context = {"setting": setting, "dataset": spec.name, "region": spec.region, "modality": spec.modality}
    for rule in m.get("overrides", []):
        if _matches(rule.get("when", {}), context):
            deep_update(cfg, rule.get("set", {}))
    if cfg["data"].get("n_sv") is None:
        cfg["data"]["n_sv"] = int(spec.defaults.get("n_sv", 1000))
    for key, value in spec.defaults.items():
        if key != "n_sv" and key in cfg["sampler"] and cfg["sampler"][key] is None:
            cfg["sampler"][key] = value
    cfg["test_labels"] = list(spec.eval_labels if setting == 1 else spec.setting2_groups[0])
    return cfg


def method_defaults(method: str, dataset: str, setting: int = 1, data_dir: str | None = None) -> dict:
    """All defaults for a method on a dataset and setting (layers 1-3 of the module docstring)."""
    _raise(name_problems({"method": method, "dataset": dataset}))
    if setting not in (1, 2):
        raise ConfigError(f"setting must be 1 or 2, got {setting!r}")
    return copy.deepcopy(_defaults_cached(str(method), str(dataset), int(setting),
                                          None if data_dir is None else str(data_dir),
                                          BASE_FILE.stat().st_mtime_ns))


def default_data_dir(dataset: str) -> str:
    return f"./data/{dataset.upper()}"


def default_eval_data_dir(dataset: str, data_dir: str, eval_dataset: str) -> str:
    """The evaluated dataset's folder: the training's data_dir when it is the training dataset (in-domain),
    else ./data/<EVAL_DATASET> as data_dir is derived."""
    return data_dir if str(eval_dataset).upper() == str(dataset).upper() else default_data_dir(eval_dataset)


def experiment_name(method, dataset, setting, test_labels, eval_fold) -> str:
    labels = "-".join(str(i) for i in test_labels)
    return f"{method}_{dataset}_setting{setting}_labels{labels}_fold{eval_fold}"


def experiment_config():
    # Sacred config scope: every key of the experiment, its default read from configs/base.yaml
    # (README, "Configuration keys"); then the method's and the dataset's layers.
    method = base_default("method")
    dataset = base_default("dataset")
    data_dir = base_default("data_dir") or default_data_dir(dataset)
    eval_dataset = base_default("eval_dataset") or dataset
    eval_data_dir = base_default("eval_data_dir") or default_eval_data_dir(dataset, data_dir, eval_dataset)
    setting = base_default("setting")
    test_labels = base_default("test_labels") or method_defaults(method, dataset, setting, data_dir)["test_labels"]
    exclude_rule = base_default("exclude_rule")
    eval_fold = base_default("eval_fold")
    seed = base_default("seed")
    device = base_default("device")
    log_dir = base_default("log_dir")
    exp_name = base_default("exp_name") or experiment_name(method, dataset, setting, test_labels, eval_fold)
    encoder = method_defaults(method, dataset, setting, data_dir)["encoder"]
    head = method_defaults(method, dataset, setting, data_dir)["head"]
    loss = method_defaults(method, dataset, setting, data_dir)["loss"]
    sampler = method_defaults(method, dataset, setting, data_dir)["sampler"]
    augment = method_defaults(method, dataset, setting, data_dir)["augment"]
    optim = method_defaults(method, dataset, setting, data_dir)["optim"]
    train = method_defaults(method, dataset, setting, data_dir)["train"]
    evaluation = method_defaults(method, dataset, setting, data_dir)["evaluation"]
    data = method_defaults(method, dataset, setting, data_dir)["data"]


def build_config(method: str, dataset: str, data_dir, log_dir="./runs", setting: int = 1,
                 updates: dict | None = None) -> dict:
    """A complete experiment config, as `python training.py with <method> <dataset> ...` assembles it,
    for code that runs without the Sacred command line (benchmark, tests). `updates` use dotted
    keys, e.g. {"train.n_steps": 2}; the result is checked like a command-line config."""
    d = method_defaults(method, dataset, setting, str(data_dir))
    base = base_defaults()
    cfg = {**{k: base[k] for k in TOP_LEVEL_KEYS}, "method": method, "dataset": dataset, "data_dir": str(data_dir),
           "setting": setting, "log_dir": str(log_dir), **d}
    cfg["test_labels"] = base["test_labels"] or cfg["test_labels"]
    for key, value in (updates or {}).items():
        node = cfg
        *path, last = key.split(".")
        for depth, part in enumerate(path):
            node = node.setdefault(part, {})      # an unknown section is named by check_config below
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: '{'.'.join(path[:depth + 1])}' is a value, not a section "
                                  f"with keys. `python training.py print_config` lists every key.")
        node[last] = value
    cfg["eval_dataset"] = cfg["eval_dataset"] or dataset
    cfg["eval_data_dir"] = cfg["eval_data_dir"] or default_eval_data_dir(dataset, cfg["data_dir"], cfg["eval_dataset"])
    if "exp_name" not in (updates or {}):
        cfg["exp_name"] = base["exp_name"] or experiment_name(method, cfg["dataset"], setting, cfg["test_labels"],
                                                               cfg["eval_fold"])
    check_config(cfg)
    return cfg


def known_keys(config: dict) -> dict:
    """The key tree the defaults define for this run's method, dataset and setting."""
    d = method_defaults(config["method"], config["dataset"], config["setting"], config.get("data_dir"))
    base = base_defaults()
    tree = {k: base[k] for k in TOP_LEVEL_KEYS}
    tree.update({s: d[s] for s in SECTIONS})
    return tree


def unknown_keys(config: dict, tree: dict, prefix: str = "") -> list[tuple[str, list[str]]]:
    found = []
    for key, value in config.items():
        if key not in tree:
            found.append((prefix + key, [prefix + k for k in tree]))
        elif isinstance(value, dict) and isinstance(tree[key], dict) and tree[key]:
            found += unknown_keys(value, tree[key], prefix + key + ".")
    return found


def _positive_int_or_auto(value) -> bool:
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


# the "auto" keys of base.yaml: what else each accepts (a test keeps this in step with base.yaml)
def _device_name(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


AUTO_CHOICES = {
    "device": (_device_name, "'auto', 'cpu', 'cuda' or 'cuda:<index>'"),
    "train.batch_episodes": (_positive_int_or_auto, "'auto' or a positive whole number"),
    "evaluation.batch_size": (_positive_int_or_auto, "'auto' or a positive whole number"),
    "train.amp": (lambda v: v in ("auto", "bf16", "off"), "'auto', 'bf16' or 'off'"),
    "train.channels_last": (lambda v: v == "auto" or isinstance(v, bool), "'auto', True or False"),
}


# keys that take one of a few words (each a string default that wrong_types cannot judge by kind)
CHOICES = {
    "evaluation.amp": ("off", "bf16", "auto"),
    "exclude_rule": ("any", "all"),
    "optim.name": OPTIMIZERS,
    "encoder.layout": tuple(LAYOUTS),
    "encoder.bn_statistics": ("batch", "episode"),
    "sampler.name": ("supervoxel", "superpixel"),
    "sampler.pair_rule": ("adnet", "qnet"),
    "sampler.id_draw": ("present", "reference"),
    "evaluation.chunking": ("zrange", "count"),
    "evaluation.scored": ("range", "labelled"),
    "evaluation.fold_scheme": ("alpnet", "qnet"),
    "data.normalize": ("volume", "dataset"),
}


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar(test):
    """A range test of a number; a value of another kind passes here (wrong_types names it)."""
    return lambda value: not _number(value) or test(value)


def _ordered_range(value) -> bool:
    """[lo, hi] with 0 < lo <= hi (augment.gamma, augment.scale)."""
    if not isinstance(value, (list, tuple)):
        return True                                      # wrong_types: "must be a list"
    return len(value) == 2 and all(_number(v) for v in value) and 0 < value[0] <= value[1]


def _betas(value) -> bool:
    if not isinstance(value, (list, tuple)):
        return True
    return len(value) == 2 and all(_number(v) and 0 <= v < 1 for v in value)


def _loss_weights(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _number(v) and v >= 0 for k, v in value.items())


# the range of every number whose meaning bounds it (README, "Configuration keys"): key -> (test, what
# the value must be); a test sees the value as configured, and one of another kind is left to wrong_types.
# A key that only some methods have (sampler.superpixel_min_size) is checked where it is present.
RANGES = {
    "loss.bg_weight": (_scalar(lambda v: v >= 0), ">= 0 (the background's class weight)"),
    "loss.ignore_index": (_scalar(lambda v: v not in (0, 1)), "a label value other than the classes 0 and 1 (255)"),
    "loss.weights": (_loss_weights, "a mapping of auxiliary losses to weights >= 0, like {align: 1.0}"),
    "sampler.min_size": (_scalar(lambda v: v >= 0), ">= 0 (pixels)"),
    "sampler.reverse_p": (_scalar(lambda v: 0 <= v <= 1), "a probability in [0, 1]"),
    "sampler.superpixel_min_size": (_scalar(lambda v: v >= 1), ">= 1 (pixels; the folder superpixels_<this>)"),
    "augment.gamma": (_ordered_range, "a range [lo, hi] with 0 < lo <= hi"),
    "augment.scale": (_ordered_range, "a range [lo, hi] with 0 < lo <= hi"),
    "augment.rotate": (_scalar(lambda v: v >= 0), ">= 0 (degrees, +-)"),
    "augment.shift": (_scalar(lambda v: v >= 0), ">= 0 (pixels, +-)"),
    "augment.shear": (_scalar(lambda v: v >= 0), ">= 0 (degrees, +-)"),
    "augment.elastic_alpha": (_scalar(lambda v: v >= 0), ">= 0"),
    "augment.elastic_sigma": (_scalar(lambda v: v > 0), "> 0 (the Gaussian's sigma, pixels)"),
    "optim.lr": (_scalar(lambda v: v > 0), "> 0"),
    "optim.momentum": (_scalar(lambda v: 0 <= v < 1), "in [0, 1)"),
    "optim.weight_decay": (_scalar(lambda v: v >= 0), ">= 0"),
    "optim.betas": (_betas, "two numbers [beta1, beta2], each in [0, 1)"),
    "optim.eps": (_scalar(lambda v: v > 0), "> 0"),
    "optim.warmup_episodes": (_scalar(lambda v: v >= 0), ">= 0 (episodes; 0: no warm-up)"),
    "optim.lr_step_gamma": (_scalar(lambda v: 0 < v <= 1), "in (0, 1] (the lr's factor every lr_step_every episodes)"),
    "optim.lr_step_every": (_scalar(lambda v: v >= 1), ">= 1 (episodes)"),
    "train.n_steps": (_scalar(lambda v: v >= 1), ">= 1 (training episodes)"),
    "train.snapshot_every": (_scalar(lambda v: v >= 1), ">= 1 (episodes)"),
    "train.print_every": (_scalar(lambda v: v >= 1), ">= 1 (episodes)"),
    "train.checkpoint_every": (_scalar(lambda v: v >= 1), ">= 1 (episodes)"),
    "train.num_workers": (_scalar(lambda v: v >= 0), ">= 0 (0: episodes drawn in the training process)"),
    "evaluation.supp_idx": (_scalar(lambda v: v >= -1), "-1 (the scan after the test scans) or a scan index >= 0"),
    "evaluation.n_part": (_scalar(lambda v: v >= 1), ">= 1 (support slices per class)"),
    "evaluation.n_shot": (_scalar(lambda v: v >= 1), ">= 1 (support scans; 1: the 1-shot protocol)"),
    "evaluation.n_overlays": (_scalar(lambda v: v >= 0), ">= 0"),
    "data.n_sv": (_scalar(lambda v: v >= 1), ">= 1 (voxels; the folder supervoxels_<this>)"),
}

EXP_NAME_MAX = 200
# exp_name is a folder of <log_dir>/<train|test>/: data.core.io's safe-name characters, up to EXP_NAME_MAX
_EXP_NAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.+ -]{0,%d}[A-Za-z0-9_.+-])?" % (EXP_NAME_MAX - 2))


def name_problems(config: dict) -> list[str]:
    """method, dataset, eval_dataset and exp_name become file and folder names: each must be a simple name (no path
    separator, not '.' or '..'), so that no run is read or written outside its folder."""
    found = []
    for key in ("method", "dataset", "eval_dataset"):
        if key in config and not is_safe_name(config[key]):
            found.append(f"{key} must be a simple name ({SAFE_NAME_RULE}), got {config[key]!r}")
    name = config.get("exp_name", "")
    if "exp_name" in config and not (isinstance(name, str) and _EXP_NAME_RE.fullmatch(name)):
        found.append(f"exp_name must be a simple name (up to {EXP_NAME_MAX} letters, digits, spaces, '_', '-', "
                     f"'+' and '.', starting with a letter, digit or '_'; no path), got {name!r}")
    return found


def _value(config: dict, key: str):
    """The value of a dotted key, or None where the config does not hold it."""
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _names(problems: list[str], key: str) -> bool:
    return any(p.startswith((f"{key} ", f"'{key}' ", f"unknown config key '{key}'")) for p in problems)


def non_finite(value, name: str) -> list[str]:
    """Every NaN or infinite number in `value` (sections, lists, head options), by its key."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{name}.{k}" if name else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{name}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{name} must be a finite number, got {value!r}"]
    return []


def wrong_ranges(config: dict, named: list[str]) -> list[str]:
    """Numbers outside their RANGES, and train.batch_episodes above train.n_steps (keys `named` by an
    earlier problem are not judged again)."""
    found = []
    for key, (test, rule) in RANGES.items():
        value = _value(config, key)
        if value is not None and not _names(named, key) and not test(value):
            found.append(f"{key} must be {rule}, got {value!r}")
    batch, n_steps = _value(config, "train.batch_episodes"), _value(config, "train.n_steps")
    if _number(batch) and _number(n_steps) and not _names(named + found, "train.n_steps") and batch > n_steps:
        found.append(f"train.batch_episodes must be at most train.n_steps ({n_steps} episodes: one step would "
                     f"hold fewer episodes than its lr is scaled for), got {batch!r}")
    return found


def _scans_per_fold(spec: DatasetSpec, fold: int, data_dir) -> int | None:
    """How many scans fold `fold` holds: the dataset's explicit folds, or the fold of the scans its
    folder lists (file names only; expected_ids are not used: the data may hold other scans, e.g. the
    phantoms). None where neither says (check_run_inputs checks supp_idx against the data then)."""
    if spec.folds is not None:
        return len(spec.folds[fold])
    try:
        return len(spec.fold(spec.scan_ids(data_dir), fold).test_ids)
    except (UserError, ValueError, OSError, TypeError):
        return None


def fold_problems(config: dict, named: list[str]) -> list[str]:
    """eval_fold below the dataset's number of folds, and evaluation.supp_idx within the fold's scans
    where the dataset's description or folder says how many it holds."""
    fold, supp_idx = config.get("eval_fold"), _value(config, "evaluation.supp_idx")
    if not _whole(fold) or fold < 0 or _names(named, "eval_fold"):
        return []
    try:
        spec = load_spec(config["dataset"], config.get("data_dir"))
    except UserError:
        return []           # known_keys read it already; a dataset.json that changed since is read again later
    if fold >= spec.n_folds:
        return [f"eval_fold must be a fold index 0..{spec.n_folds - 1} ({spec.name} has {spec.n_folds} folds), "
                f"got {fold!r}"]
    n_scans = _scans_per_fold(spec, fold, config.get("data_dir"))
    if n_scans is None or not _whole(supp_idx) or _names(named, "evaluation.supp_idx"):
        return []
    problem = supp_idx_problem(supp_idx, n_scans, fold, spec.name)
    return [problem] if problem else []


def cross_domain_problems(config: dict, named: list[str]) -> list[str]:
    """An evaluated dataset other than the training one: it must be a dataset, and hold every test class,
    matched by organ name (evaluation.protocol.match_classes); eval_fold within its folds."""
    train, evaluated = config.get("dataset"), config.get("eval_dataset")
    if not isinstance(evaluated, str) or str(evaluated).upper() == str(train).upper() \
            or _names(named, "eval_dataset") or _names(named, "test_labels"):
        return []
    try:
        train_spec = load_spec(train, config.get("data_dir"))
        eval_spec = load_spec(evaluated, config.get("eval_data_dir"))
    except UserError as err:
        return [f"eval_dataset={evaluated!r}: {err}"]
    try:
        match_classes(train_spec, eval_spec, config.get("test_labels") or ())
    except ConfigError as err:
        return [str(err)]
    fold = config.get("eval_fold")
    if _whole(fold) and not _names(named, "eval_fold") and fold >= eval_spec.n_folds:
        return [f"eval_fold must be a fold index of both datasets: {eval_spec.name} (eval_dataset) has "
                f"{eval_spec.n_folds} folds, 0..{eval_spec.n_folds - 1}; got {fold!r}"]
    return []


@lru_cache(maxsize=None)
def encoder_channels(layout: str) -> dict[str, int]:
    """ResNetEncoder(layout).channels ({map: C}, what build_model gives the head), computed from the
    layout alone: the property reads only the layout, so no ResNet-101 is built for it."""
    return dict(ResNetEncoder.channels.fget(types.SimpleNamespace(layout_name=layout, layout=LAYOUTS[layout])))


def head_problems(config: dict) -> list[str]:
    """The head's own refusal of its options: the head is built on the meta device (no memory, no
    random draws) with the channels of the configured encoder, as build_model builds it."""
    layout = _value(config, "encoder.layout")
    if layout not in LAYOUTS:
        return []                                       # CHOICES names it
    name, options, _ = head_name_and_options(config["head"])
    try:
        with torch.device("meta"):
            build_head(name, channels=encoder_channels(layout), **options)
    except (ValueError, TypeError) as err:
        message = str(err).rstrip(".")
        return [message if "head." in message else f"head ({name}): {message}"]
    return []


def wrong_run_keys(config: dict) -> list[str]:
    """The top-level keys without a typed default: fold, seed, evaluated classes, word choices."""
    found = []
    if not (_whole(config.get("eval_fold")) and config["eval_fold"] >= 0):
        found.append(f"eval_fold must be a whole number >= 0 (a fold index, 0-4), got {config.get('eval_fold')!r}")
    if not (_whole(config.get("seed")) and 0 <= config["seed"] < 2 ** 63):
        found.append(f"seed must be a whole number >= 0, got {config.get('seed')!r}")
    labels = config.get("test_labels")
    if not isinstance(labels, (list, tuple)) or not labels or not all(_whole(v) for v in labels) \
            or len(set(labels)) != len(labels):
        found.append(f"test_labels must be a non-empty list of distinct class ids like [1, 4], got {labels!r}")
    for key, words in CHOICES.items():
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node not in words:
            found.append(f"{key} must be one of {', '.join(repr(w) for w in words)}, got {node!r}")
    return found


def wrong_types(config: dict, tree: dict, prefix: str = "") -> list[str]:
    """Values whose kind contradicts the default's: a bool must stay a bool (on the command line
    `key=false` is the string 'false'; Sacred wants Python literals, `key=False`), numbers stay
    numbers, lists stay lists."""
    found = []
    for key, default in tree.items():
        if key not in config or default is None:
            continue
        value, name = config[key], prefix + key
        if isinstance(default, dict):
            if isinstance(value, dict):
                found += wrong_types(value, default, name + ".")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                found.append(f"{name} must be True or False (Python literals), got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                found.append(f"{name} must be a number, got {value!r}")
            elif isinstance(default, int) and isinstance(value, float) and not value.is_integer():
                found.append(f"{name} counts something: a whole number, got {value!r}")
        elif default == "auto" and name in AUTO_CHOICES:
            if not AUTO_CHOICES[name][0](value):
                found.append(f"{name} must be {AUTO_CHOICES[name][1]}, got {value!r}")
        elif isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
            found.append(f"{name} must be a list like {list(default)!r}, got {value!r}")
    return found


def check_config(config: dict) -> None:
    """Reject keys no layer defines (typos) and values of the wrong kind, out of range or not finite,
    naming the fix: everything Sacred will record is checked here, before the run folder exists."""
    _raise(name_problems({k: config.get(k) for k in ("method", "dataset")}))    # before any file is read by them
    tree = known_keys(config)
    head_name = config.get("head", {}).get("name")
    if head_name in HEADS:
        tree["head"] = {"name": None, **head_options(head_name)}
    problems = []
    for key, candidates in unknown_keys(config, tree):
        if key.startswith("head.") and key[len("head."):] in ENCODER_ARGUMENTS:
            problems.append(f"'{key}' is not a config key: the head gets it from the encoder "
                            f"(encoder.layout={config.get('encoder', {}).get('layout')!r})")
            continue
        problems.append(f"unknown config key '{key}'" + did_you_mean(key, candidates))
    problems += wrong_types(config, tree)
    problems += wrong_run_keys(config)
    problems += name_problems({"exp_name": config.get("exp_name"),
                               **({"eval_dataset": config["eval_dataset"]} if config.get("eval_dataset") else {})})
    problems += [p for p in non_finite(config, "") if not _names(problems, p.split(" ", 1)[0])]
    problems += wrong_ranges(config, problems)
    problems += fold_problems(config, problems)
    problems += cross_domain_problems(config, problems)
    if head_name in HEADS and not any(p.startswith(("head.", "'head.", "unknown config key 'head.")) for p in problems):
        problems += head_problems(config)
    _raise(problems)


class _AutoKeyTypeChangeFilter(logging.Filter):
    """Sacred warns when an update changes a value's type. For the "auto" keys that change is how
    they are meant to be set (`train.batch_episodes=4`), and check_config checks the value, so the
    warning would only teach users to ignore warnings."""

    def __init__(self):
        super().__init__()
        self.quoted = tuple(f'"{key}"' for key in AUTO_CHOICES)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Changed type of config entry") and any(q in message for q in self.quoted))


def _silence_auto_key_type_changes() -> None:
    root = logging.getLogger()
    if not any(isinstance(f, _AutoKeyTypeChangeFilter) for f in root.filters):
        root.addFilter(_AutoKeyTypeChangeFilter())


@contextlib.contextmanager
def user_errors():
    """Print an error the user can fix (`data.core.io.UserError`) as its message alone, without a
    traceback, and exit with status 1.

    SystemExit passes through Sacred's exception printing (Python prints its text to stderr); inside
    a run Sacred still records the run as FAILED with the message as its fail_trace."""
    try:
        yield
    except (UserError, OSError) as err:
        fixable = fixable_error(err)
        if fixable is None:
            raise
        raise SystemExit(f"error: {fixable}") from None


def _refuse_pickle_config(fp) -> dict:
    """Sacred's loader for `with <file>.pickle`, replaced: it would unpickle the file."""
    with user_errors():
        raise ConfigError(f"refusing to load the config file {fp.name}: it is a pickle, and unpickling a file "
                          f"can run arbitrary code. Only YAML (.yaml, .yml) and JSON (.json) config files are "
                          f"accepted; write the keys into a YAML file instead (e.g. `train: {{n_steps: 1000}}`)")


def _read_config_files_as_plain_data() -> None:
    """Config files named on the command line (`with my_experiment.yaml`) or as named configs are read
    as plain data only, so a config file someone sends cannot run code.

    Sacred 0.8 would unpickle `.pickle` files, decode `.json` with jsonpickle (whose "py/reduce"
    entries call any function) and read YAML with FullLoader; here `.pickle` is refused before the
    file is read, JSON is plain json.load and YAML is yaml.safe_load without aliases (read_yaml, as
    configs/*.yaml are read).
    Writing (Sacred's save_config) is unchanged."""
    handlers = config_files.HANDLER_BY_EXT
    handlers[".pickle"] = config_files.Handler(_refuse_pickle_config, handlers[".pickle"].dump, "b")
    handlers[".json"] = config_files.Handler(_checked_reader(json.load), handlers[".json"].dump, "")
    for extension in config_files.yaml_extensions:
        if extension in handlers:
            handlers[extension] = config_files.Handler(_checked_reader(_read_yaml_config), handlers[extension].dump, "")


def _read_yaml_config(fp):
    """A YAML config file as plain data, refusing aliases (data.core.specs.read_yaml)."""
    return read_yaml(fp, getattr(fp, "name", "config file"))


def _checked_reader(read):
    """A config-file reader whose keys are checked (naming the file) before Sacred sees them."""
    def load(fp) -> dict:
        with user_errors():
            return check_config_file(read(fp), getattr(fp, "name", "config file"))
    return load


class FewShotExperiment(Experiment):
    """Sacred's Experiment whose runs report `UserError`s as one clear message and exit status 1
    (config scopes, hooks and main alike; Sacred would print a traceback), and an unknown named config
    as one line with the closest name."""

    def run(self, *args, **kwargs):
        with user_errors():
            try:
                return super().run(*args, **kwargs)
            except NamedConfigNotFoundError as err:
                found = re.search(r'not found: "(.*)"\. Available', str(err))
                name = found.group(1) if found else str(err)
                raise ConfigError(unknown_named_config(name, self.named_configs)) from None


def unknown_named_config(name: str, known) -> str:
    """`with qnte`: which named configs there are, and the closest one."""
    groups = {"methods": method_names(), "datasets": [p.stem for p in sorted(DATASET_DIR.glob("*.yaml"))],
              "protocols": [f"protocol_{p.stem}" for p in sorted(PROTOCOL_DIR.glob("*.yaml"))]}
    return (f"unknown named config {name!r}" + did_you_mean(name, list(known)) + "; named configs are the methods ("
            + ", ".join(groups["methods"]) + "), datasets (" + ", ".join(groups["datasets"]) + "), protocols ("
            + ", ".join(groups["protocols"]) + ") and demo, or a .yaml/.json file of your own")


def make_experiment(name: str, record: str | None = None) -> Experiment:
    """The Sacred experiment with every named config; `record` ("train" or "test") makes its main
    command record runs under <log_dir>/<record>/<exp_name>/ (see add_observer)."""
    _read_config_files_as_plain_data()
    ex = FewShotExperiment(name, save_git_info=False)
    _silence_auto_key_type_changes()
    ex.captured_out_filter = apply_backspaces_and_linefeeds
    ex.config(experiment_config)
    for path in sorted(METHOD_DIR.glob("*.yaml")):
        ex.add_named_config(path.stem, {"method": path.stem})
    for path in sorted(DATASET_DIR.glob("*.yaml")):
        ex.add_named_config(path.stem, {"dataset": load_yaml(path)["name"]})
    for path in sorted(PROTOCOL_DIR.glob("*.yaml")):
        ex.add_named_config(f"protocol_{path.stem}", str(path))
    ex.add_named_config("demo", str(CONFIG_DIR / "demo.yaml"))

    @ex.config_hook
    def _validate(config, command_name, logger):
        check_config(config)
        if record is not None and command_name == "main":
            add_observer(ex, config, record)
        return {}

    return ex


def add_observer(ex: Experiment, config: dict, kind: str) -> Path:
    """Runs go to <log_dir>/<kind>/<exp_name>/<run id>/ (kind: train or test).

    A training run with train.resume=<run folder> continues in that folder. Under torchrun only
    rank 0 records the run.
    """
    base = Path(config["log_dir"]) / kind / config["exp_name"]
    if int(os.environ.get("RANK", "0")) != 0:
        return base
    resume = config.get("train", {}).get("resume") if kind == "train" else None
    with user_errors():
        check_output_folder(resume or base, "the run folder")
    ex.observers.append(ResumableFileStorageObserver(str(base), resume_dir=resume, copy_sources=False))
    return base
