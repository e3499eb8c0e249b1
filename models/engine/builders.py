"""Build the objects of an experiment from its configuration (models, data, samplers, devices).

training.py and validation.py call these; tests and the benchmark call them too, so that every
entry point builds exactly the same thing from the same config.
"""
from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from data.core.io import ConfigError, DataError
from data.core.specs import DatasetSpec, load_spec
from dataloaders.augment import AugmentParams
from evaluation.protocol import ProtocolOptions
from dataloaders.superpixel_episodes import SuperpixelEpisodes
from dataloaders.supervoxel_episodes import SupervoxelEpisodes
from dataloaders.volumes import VolumeStore
from models.encoder import ResNetEncoder
from models.engine.experiment import (
    AugmentConfig,
    DataConfig,
    EncoderConfig,
    EvaluationConfig,
    Experiment,
    SamplerConfig,
    TrainConfig,
    head_name_and_options,
)
from models.episode_norm import use_episode_batchnorm
from models.fewshot import FewShotSegmenter
from models.heads import build_head

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX): then bf16 convolutions are about
    twice as fast as fp32 on the CPU; without it they are emulated and slower."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(amp: str, device: torch.device, key: str = "train.amp") -> torch.dtype | None:
    """bf16 autocast for the encoder with amp "bf16", or "auto" on CUDA and on CPUs with native bf16.

    Training defaults to "auto" (train.amp); evaluation has its own key, evaluation.amp, "off" by
    default, because bf16 moves per-patient Dice away from the references' fp32 numbers."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"{key} must be auto, bf16 or off, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda" and not cpu_has_fast_bf16()):
        return None
    return torch.bfloat16


def use_channels_last(setting, device: torch.device) -> bool:
    """channels_last by default: faster convolutions with cuDNN and with oneDNN on the CPU."""
    return True if setting == "auto" else bool(setting)


def resolve_auto(value, device: torch.device, cuda: int, cpu: int) -> int:
    """An integer setting that may be "auto": the measured best on each device kind."""
    if value == "auto":
        return cuda if device.type == "cuda" else cpu
    return int(value)


def episodes_per_step(train: TrainConfig, device: torch.device) -> int:
    """train.batch_episodes; "auto" is 8 on CUDA and 1 on the CPU, where larger batches of 256 x 256
    images are slower per image (README, Performance: "Choosing B")."""
    return resolve_auto(train.batch_episodes, device, cuda=8, cpu=1)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (training, and evaluation of heads that
    draw at random, e.g. GMRD's descriptor fill, so that an evaluation gives the same numbers twice)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_model(encoder_config: EncoderConfig, head: dict, load_weights: bool = True) -> FewShotSegmenter:
    """The encoder of `encoder_config` (with its pretrained weights unless `load_weights` is False) and the
    head named by `head` with its options."""
    encoder = ResNetEncoder(encoder_config.layout)
    if load_weights:
        encoder.load_pretrained(encoder_config.weights, allow_partial=bool(encoder_config.allow_partial))
    stats = encoder_config.bn_statistics
    if stats == "episode":
        use_episode_batchnorm(encoder)
    elif stats != "batch":
        raise ValueError(f"encoder.bn_statistics must be 'batch' or 'episode', got {stats!r}")
    name, head_cfg, given = head_name_and_options(head)
    if given is not None:
        # configs saved before channels came from the encoder (DSPNet snapshots) hold head.channels:
        # accepted when it says what the encoder says. A user's head.channels never gets here
        # (check_config refuses it: not a head option).
        if sorted(set(encoder.channels.values()) - {1}) != [given]:
            raise ConfigError(f"head.channels={given!r} is not a config key: a head's channels come from the "
                              f"encoder ('{encoder.layout_name}': {encoder.channels}); remove it")
    # channel counts come from the encoder (the head contract's `channels` argument)
    return FewShotSegmenter(encoder, build_head(name, channels=encoder.channels, **head_cfg))


def dataset_spec(exp: Experiment) -> DatasetSpec:
    return load_spec(exp.dataset, exp.data_dir)


def volume_store(exp: Experiment, spec: DatasetSpec | None = None, stats_ids=None) -> VolumeStore:
    spec = spec or dataset_spec(exp)
    return VolumeStore(spec, exp.data_dir, normalize=exp.data.normalize, stats_ids=stats_ids)


# The data a command's pre-flight check loaded, kept for its run (one entry; see fold_data).
_loaded_fold_data: list[tuple[tuple, tuple]] = []


def _files_signature(folders) -> tuple:
    """Name, size and modification time of every file in `folders`: a changed file changes it."""
    files = []
    for folder in folders:
        if Path(folder).is_dir():
            for p in sorted(Path(folder).iterdir()):
                st = p.stat()
                files.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(files)


def fold_data(exp: Experiment):
    """(spec, store, fold) for the configured dataset and eval_fold.

    With data.normalize=dataset (SSL-ALPNet's CT rule) the mean and std come from the fold's
    training scans, in training and evaluation alike.

    The last result is reused while the dataset's files are unchanged, so the scans a command's
    pre-flight check (`check_run_inputs`) read are not read again by its run.
    """
    check_data_dir(exp)
    spec = dataset_spec(exp)
    key = (exp.dataset, str(Path(exp.data_dir).resolve()), int(exp.eval_fold),
           exp.evaluation.fold_scheme, repr(sorted(exp.data.to_config().items())),
           _files_signature([spec.image_folder(exp.data_dir),
                             Path(exp.data_dir) / pseudolabel_folder(exp.data, exp.sampler)]))
    if _loaded_fold_data and _loaded_fold_data[0][0] == key:
        return _loaded_fold_data[0][1]
    ids = spec.scan_ids(exp.data_dir)
    fold = spec.fold(ids, int(exp.eval_fold), exp.evaluation.fold_scheme)
    store = volume_store(exp, spec, stats_ids=fold.train_ids)
    _loaded_fold_data[:] = [(key, (spec, store, fold))]
    return spec, store, fold


def check_encoder_weights(encoder_config: EncoderConfig) -> None:
    """Read and match encoder.weights as training will, on an encoder on the meta device (no
    memory, no random draws, so the run's RNG stream is untouched): a missing, unsafe, partial or
    mismatched file is refused before the run records anything."""
    with torch.device("meta"):
        encoder = ResNetEncoder(encoder_config.layout)
    with warnings.catch_warnings():     # copying into meta tensors is a no-op, and torch says so
        warnings.simplefilter("ignore")
        encoder.load_pretrained(encoder_config.weights, bool(encoder_config.allow_partial), report=False)


def supp_idx_problem(supp_idx: int, n_scans: int, fold: int, dataset: str) -> str | None:
    """What is wrong with evaluation.supp_idx for a fold of `n_scans` scans (None: nothing): -1 (the
    scan after the test block) or an index into the fold's scans."""
    if supp_idx == -1 or 0 <= supp_idx < n_scans:
        return None
    return (f"evaluation.supp_idx must be -1 or 0..{n_scans - 1} (fold {fold} of {dataset} holds {n_scans} "
            f"scans), got {supp_idx!r}")


def check_run_inputs(exp: Experiment, kind: str) -> None:
    """Read (and so check) every data file a training ("train") or evaluation ("test") run of this
    config will read, before the run records anything: a truncated, NaN-holding, constant or
    misshapen scan or pseudolabel file is refused while the run folder does not exist yet; so is an
    evaluation.supp_idx outside the fold's scans (configs.experiment.check_config checks it already
    where the dataset's description says how many scans a fold holds)."""
    spec, store, fold = fold_data(exp)
    spec.check_label_ids(exp.test_labels, "test_labels")
    problem = supp_idx_problem(int(exp.evaluation.supp_idx), len(fold.test_ids), fold.index, spec.name)
    if problem:
        raise ConfigError(problem)
    if kind == "train":
        check_encoder_weights(exp.encoder)
        folder = pseudolabel_folder(exp.data, exp.sampler)
        for scan_id in fold.train_ids:
            store.scan(scan_id)
            if not exp.sampler.use_gt:
                store.pseudolabels(scan_id, folder)
    else:
        store.preload(fold.test_ids)


def eval_batch_size(evaluation: EvaluationConfig, device: torch.device) -> int:
    """evaluation.batch_size; "auto" is 16 query slices on CUDA and 1 on the CPU, where larger
    batches were no faster (README, Performance). Each slice is still encoded once for all classes."""
    return resolve_auto(evaluation.batch_size, device, cuda=16, cpu=1)


def protocol_options(evaluation: EvaluationConfig, device: torch.device) -> ProtocolOptions:
    e = evaluation
    return ProtocolOptions(supp_idx=int(e.supp_idx), n_part=int(e.n_part), chunking=e.chunking,
                           scored=e.scored, fold_scheme=e.fold_scheme, batch_size=eval_batch_size(e, device),
                           cache_features=bool(e.cache_features))


def pseudolabel_folder(data: DataConfig, sampler: SamplerConfig) -> str:
    if data.pseudolabels:
        return str(data.pseudolabels)
    if sampler.name == "supervoxel":
        return f"supervoxels_{int(data.n_sv)}"
    return f"superpixels_{int(sampler.superpixel_min_size)}"


def augment_params(augment: AugmentConfig) -> AugmentParams:
    """The augmentation's parameter ranges (the draws), from the augment section."""
    return AugmentParams.from_config(augment.to_config())


def build_episode_dataset(exp: Experiment, store: VolumeStore, train_ids, seed: int):
    """The training episode sampler chosen by sampler.name."""
    s = exp.sampler
    augment = augment_params(exp.augment) if exp.augment.enabled else None
    test_labels = store.spec.check_label_ids(exp.test_labels, "test_labels")
    if s.name == "supervoxel":
        return SupervoxelEpisodes(
            store, train_ids, pseudolabel_folder(exp.data, s), pair_rule=s.pair_rule, min_size=int(s.min_size),
            reverse_p=float(s.reverse_p), test_labels=test_labels, exclude_rule=exp.exclude_rule,
            setting=int(exp.setting), use_gt=bool(s.use_gt), qnet_set_order=bool(s.qnet_set_order),
            augment=augment, augment_on_device=bool(exp.augment.on_device), seed=seed)
    if s.name == "superpixel":
        return SuperpixelEpisodes(store, train_ids, pseudolabel_folder(exp.data, s), id_draw=s.id_draw,
                                  min_size=int(s.min_size), test_labels=test_labels,
                                  exclude_rule=exp.exclude_rule, setting=int(exp.setting), augment=augment,
                                  augment_on_device=bool(exp.augment.on_device), seed=seed)
    raise ValueError(f"unknown sampler {s.name!r}")


def check_data_dir(exp: Experiment) -> Path:
    path = Path(exp.data_dir)
    if not path.is_dir():
        hint = (" Generate the synthetic phantoms with `python -m data.phantoms " + str(path) + "`."
                if str(exp.dataset).upper() == "SYNTH" else " See data/README.md for how to prepare it.")
        raise DataError(f"data directory not found: {path} (dataset {exp.dataset}).{hint}")
    return path
