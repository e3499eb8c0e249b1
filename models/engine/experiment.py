"""The experiment as typed, frozen sections: what the commands hand to the engine instead of Sacred's
nested config dict.

`Experiment.from_config(config)` converts the resolved config (configs/experiment.py assembles it
from configs/base.yaml, the method's and the dataset's YAML and the command line) once, at a
command's edge; `to_config()` gives the plain dict back (config.json, provenance, snapshots,
fingerprints). This module is the only one that reads the config dict by key.

Every key has its default in YAML (configs/base.yaml, configs/methods/<method>.yaml): the dataclasses
have none, and a missing or unknown key is a ConfigError that names it. Values are kept as the config
holds them (configs.experiment.check_config has checked their kinds and choices), so `to_config()`
gives back exactly the dict that was converted, and so the same fingerprint.

A config stored by an older version (a snapshot's or a resume point's) lacks the keys added since:
`upgrade_config` fills each with the value the code assumed before the key existed.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from typing import ClassVar

from data.core.errors import ConfigError

_EVERY_KEY = "`python training.py print_config` lists every key."


def did_you_mean(key, candidates) -> str:
    """' (did you mean 'x'?)' with the closest of `candidates` to `key`, or '' (every config message)."""
    close = difflib.get_close_matches(str(key), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _key_problems(given: dict, expected, prefix: str = "", optional=()) -> list[str]:
    """Unknown keys of `given` (with the closest expected key) and missing expected keys."""
    known = [prefix + k for k in expected]
    problems = [f"unknown config key '{prefix}{k}'" + did_you_mean(prefix + str(k), known)
                for k in given if k not in expected]
    problems += [f"missing config key '{prefix}{k}'" for k in expected if k not in given and k not in optional]
    return problems


@dataclass(frozen=True)
class Section:
    """A section of the config: its fields are the section's keys, in configs/base.yaml's order."""

    NAME: ClassVar[str] = ""
    # keys that only some methods' YAML define: None here when the config has none (see `required`)
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def problems(cls, values) -> list[str]:
        if not isinstance(values, dict):
            return [f"config key '{cls.NAME}' is a section with keys ({', '.join(cls.keys())}), got {values!r}"]
        problems = _key_problems(values, cls.keys(), cls.NAME + ".", cls.OPTIONAL)
        if not problems:
            problems = cls.required({k: values.get(k) for k in cls.keys()})
        return problems

    @classmethod
    def required(cls, values: dict) -> list[str]:
        """Optional keys that these values need after all (a section overrides this)."""
        return []

    @classmethod
    def from_config(cls, values: dict):
        """The section from its plain dict (e.g. `config["optim"]`); a missing or unknown key is an error."""
        problems = cls.problems(values)
        if problems:
            raise ConfigError("; ".join(problems) + ". " + _EVERY_KEY)
        return cls(**{k: copy.deepcopy(values.get(k)) for k in cls.keys()})

    def to_config(self) -> dict:
        """The section as the plain dict it came from (an optional key the config did not have stays out)."""
        out = {}
        for key in self.keys():
            value = getattr(self, key)
            if not (key in self.OPTIONAL and value is None):
                out[key] = copy.deepcopy(value)
        return out


@dataclass(frozen=True)
class EncoderConfig(Section):
    NAME: ClassVar[str] = "encoder"
    layout: str                 # deeplab_r101 | qnet_r101 (models/encoder.py)
    weights: str                # imagenet | deeplabv3_coco | none | path of a checkpoint
    allow_partial: bool         # accept weights that fit only part of the encoder
    bn_statistics: str          # batch | episode: BatchNorm statistics per step or per episode


@dataclass(frozen=True)
class LossConfig(Section):
    NAME: ClassVar[str] = "loss"
    bg_weight: float            # background's class weight in the query loss (foreground 1.0)
    ignore_index: int
    weights: dict[str, float]   # multiplier of each auxiliary loss the head returns (one not named: 1.0)


@dataclass(frozen=True)
class SamplerConfig(Section):
    NAME: ClassVar[str] = "sampler"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("superpixel_min_size", "id_draw")
    name: str                   # supervoxel | superpixel
    pair_rule: str              # supervoxel: adnet | qnet
    min_size: int               # pixels of the pseudolabel needed on the tested slice(s)
    reverse_p: float            # probability of swapping support and query slices
    use_gt: bool                # train on ground truth minus the test classes (Q-Net option)
    qnet_set_order: bool        # Q-Net's unsorted slice list
    superpixel_min_size: int | None   # superpixel: the pseudolabel folder superpixels_<this> (superpixel methods' YAML)
    id_draw: str | None               # superpixel: present | reference (superpixel methods' YAML)

    @classmethod
    def required(cls, values: dict) -> list[str]:
        if values["name"] != "superpixel":
            return []
        missing = [f"sampler.{k}" for k in cls.OPTIONAL if values[k] is None]
        if not missing:
            return []
        return [f"sampler.name='superpixel' reads {' and '.join(missing)}, which only the superpixel methods' YAML "
                f"define (alpnet, dspnet): train one of them for superpixel episodes"]


@dataclass(frozen=True)
class AugmentConfig(Section):
    NAME: ClassVar[str] = "augment"
    enabled: bool
    on_device: bool             # apply the draws on the training device (False: OpenCV in the loader)
    gamma: list[float]          # [lo, hi]
    rotate: float               # degrees, +-
    shift: float                # pixels, +-
    shear: float                # degrees, +-
    scale: list[float]          # [lo, hi]
    elastic_alpha: float
    elastic_sigma: float


@dataclass(frozen=True)
class OptimConfig(Section):
    NAME: ClassVar[str] = "optim"
    name: str                   # sgd | adamw
    lr: float                   # base lr (x episodes per step with scale_lr_with_batch)
    momentum: float             # sgd
    weight_decay: float
    betas: list[float]          # adamw
    eps: float                  # adamw
    warmup_episodes: int        # linear warm-up over this many episodes (0: none)
    lr_step_gamma: float        # lr x gamma every lr_step_every episodes
    lr_step_every: int
    scale_lr_with_batch: bool


@dataclass(frozen=True)
class TrainConfig(Section):
    NAME: ClassVar[str] = "train"
    n_steps: int                # training episodes
    batch_episodes: int | str   # episodes per step per process, or "auto"
    snapshot_every: int         # episodes between snapshots
    print_every: int            # episodes between progress lines
    num_workers: int            # DataLoader workers
    checkpoint_every: int       # episodes between resume points
    resume: str | None          # a run folder to continue
    amp: str                    # auto | bf16 | off: the encoder's autocast in training
    channels_last: bool | str   # True | False | "auto"


@dataclass(frozen=True)
class EvaluationConfig(Section):
    NAME: ClassVar[str] = "evaluation"
    checkpoint: str | None      # a snapshot, "untrained", or None: the last snapshot of the newest training run
    supp_idx: int               # support scan in the fold's block (-1: the scan after the test scans)
    n_shot: int                 # support scans K (evaluation/protocol.py: support_scans)
    n_part: int                 # support slices / query chunks per class
    chunking: str               # zrange | count
    scored: str                 # range | labelled
    fold_scheme: str            # alpnet | qnet
    batch_size: int | str       # query slices per forward pass, or "auto"
    amp: str                    # off | bf16 | auto: the encoder's precision in evaluation
    cache_features: bool        # encode each slice once (False: the references' loop)
    save_predictions: bool
    n_overlays: int             # PNG overlays per class


@dataclass(frozen=True)
class DataConfig(Section):
    NAME: ClassVar[str] = "data"
    normalize: str              # volume | dataset
    pseudolabels: str | None    # training pseudolabel folder; None: supervoxels_<n_sv> / superpixels_<size>
    n_sv: int | None            # supervoxel minimum size (the dataset's default, filled in by the config)


SECTIONS: dict[str, type] = {      # the sections, in the config's order; head stays a dict
    "encoder": EncoderConfig, "head": dict, "loss": LossConfig, "sampler": SamplerConfig,
    "augment": AugmentConfig, "optim": OptimConfig, "train": TrainConfig, "evaluation": EvaluationConfig,
    "data": DataConfig}


@dataclass(frozen=True)
class Experiment:
    """One run's whole configuration (README, "Configuration keys")."""

    method: str                 # adnet | qnet | alpnet | dspnet | rpt | gmrd
    dataset: str                # CHAOST2 | SABS | CMR | SYNTH | the name in a dataset.json
    data_dir: str
    eval_dataset: str           # the dataset evaluated: `dataset` (in-domain) or another (cross-domain)
    eval_data_dir: str          # its folder (data_dir when it is the training dataset)
    setting: int                # 1 | 2
    test_labels: list[int]      # classes evaluated (and, in setting 2, removed from training)
    exclude_rule: str           # any | all (setting 2)
    eval_fold: int
    seed: int
    device: str                 # auto | cpu | cuda | cuda:N
    log_dir: str
    exp_name: str
    encoder: EncoderConfig
    head: dict                  # name + the head's constructor options (checked against it by check_config)
    loss: LossConfig
    sampler: SamplerConfig
    augment: AugmentConfig
    optim: OptimConfig
    train: TrainConfig
    evaluation: EvaluationConfig
    data: DataConfig

    @classmethod
    def top_level_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS)

    @classmethod
    def from_config(cls, config: dict) -> "Experiment":
        """The experiment of a resolved config dict; every missing or unknown key is named in one ConfigError."""
        if not isinstance(config, dict):
            raise ConfigError(f"an experiment config is a mapping of keys, got {type(config).__name__}")
        # the evaluated dataset and its folder default to the training's (in-domain) in a config that
        # names neither (built by hand, or stored before they existed; to_config() then holds them)
        config = {**{k: config[source] for k, source in ADDED_DERIVED_KEYS.items()
                     if k not in config and source in config}, **config}
        expected = cls.top_level_keys() + tuple(SECTIONS)
        problems = _key_problems(config, expected)
        for name, section in SECTIONS.items():
            if name not in config:
                continue
            if section is dict:
                head = config[name]
                if not isinstance(head, dict):
                    problems.append(f"config key 'head' is a section with the head's options, got {head!r}")
                elif "name" not in head:
                    problems.append("missing config key 'head.name': the method's YAML names its head")
            else:
                problems += section.problems(config[name])
        if problems:
            raise ConfigError("; ".join(problems) + ". " + _EVERY_KEY)
        values = {k: copy.deepcopy(config[k]) for k in cls.top_level_keys()}
        values.update({name: copy.deepcopy(config[name]) if section is dict else section.from_config(config[name])
                       for name, section in SECTIONS.items()})
        return cls(**values)

    def to_config(self) -> dict:
        """The plain config dict (what `from_config` converted): for config.json, provenance, snapshots
        and fingerprints."""
        out = {k: copy.deepcopy(getattr(self, k)) for k in self.top_level_keys()}
        for name, section in SECTIONS.items():
            value = getattr(self, name)
            out[name] = copy.deepcopy(value) if section is dict else value.to_config()
        return out


def as_experiment(config: Experiment | dict) -> Experiment:
    """An Experiment as it is, a config dict converted (entry points that tests call with a dict)."""
    return config if isinstance(config, Experiment) else Experiment.from_config(config)


def head_name_and_options(head: dict) -> tuple[str, dict, int | None]:
    """The head's name, its constructor options (a copy), and the head.channels that configs saved
    before a head's channels came from the encoder hold (DSPNet snapshots; None in any other config)."""
    options = dict(head)
    name = options.pop("name")
    legacy_channels = options.pop("channels", None)
    return name, options, legacy_channels


# Keys added to configs/base.yaml after configs were first stored (snapshots, resume points), each
# with the value the code assumed before the key existed (git log -p configs/base.yaml).
ADDED_KEYS = {
    "encoder.allow_partial": False,         # d99880c: weights had to fit the whole encoder
    "encoder.bn_statistics": "batch",       # 553d1fc: BatchNorm over the whole step
    "augment.on_device": False,             # 2ee0fc1: the draws were applied with OpenCV in the loader
    "optim.name": "sgd",                    # 1ee2bf5: SGD was the only optimizer
    "optim.betas": [0.9, 0.999],            # 1ee2bf5 (AdamW only)
    "optim.eps": 1.0e-8,                    # 1ee2bf5 (AdamW only)
    "optim.warmup_episodes": 0,             # 1ee2bf5: no warm-up
    "optim.scale_lr_with_batch": False,     # 553d1fc: the lr did not grow with the episodes per step
    "train.checkpoint_every": 1000,         # f34cdb6: no resume points before (decides no number)
    "train.resume": None,                   # f34cdb6
    "evaluation.cache_features": True,      # 39ec8aa: each slice was encoded once
    "evaluation.amp": "off",                # d99880c: a config without it is evaluated in fp32 (segment.py did so)
    "evaluation.n_shot": 1,                 # K-shot evaluation: every evaluation before it was 1-shot
}
# Top-level keys added since, each filled with the value of the key it was before (in-domain evaluation:
# the evaluated dataset was the training dataset, read from its data_dir).
ADDED_DERIVED_KEYS = {"eval_dataset": "dataset", "eval_data_dir": "data_dir"}


def upgrade_config(config: dict) -> dict:
    """A stored config (a snapshot's, a resume point's) with the keys added since it was written filled
    in (ADDED_KEYS, ADDED_DERIVED_KEYS); a section it lacks stays absent. Returns a copy; a current config comes back equal."""
    config = copy.deepcopy(config)
    if isinstance(config, dict):
        for key, source in ADDED_DERIVED_KEYS.items():
            if key not in config and source in config:
                config[key] = copy.deepcopy(config[source])
    for dotted, value in ADDED_KEYS.items():
        section, key = dotted.split(".")
        node = config.get(section) if isinstance(config, dict) else None
        if isinstance(node, dict) and key not in node:
            node[key] = copy.deepcopy(value)
    return config
