"""Build the objects of an experiment from its configuration (models, data, samplers, devices).

training.py and validation.py call these; tests and the benchmark call them too, so that every
entry point builds exactly the same thing from the same config.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from data.io import DataError
from dataloaders.augment import AugmentParams
from dataloaders.protocol import ProtocolOptions
from dataloaders.specs import DatasetSpec, load_spec
from dataloaders.volumes import VolumeStore
from models.encoder import ResNetEncoder
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


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for the encoder: on CUDA, and on CPUs with native bf16, by default."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"train.amp must be auto, bf16 or off, got {amp!r}")
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


def episodes_per_step(cfg: dict, device: torch.device) -> int:
    """train.batch_episodes; "auto" is 8 on CUDA and 1 on the CPU, where larger batches of 256 x 256
    images are slower per image (measured: 1.3 s per image at 8 episodes against 0.8 s at 1)."""
    return resolve_auto(cfg["train"]["batch_episodes"], device, cuda=8, cpu=1)


def build_model(cfg: dict, load_weights: bool = True) -> FewShotSegmenter:
    encoder = ResNetEncoder(cfg["encoder"]["layout"])
    if load_weights:
        encoder.load_pretrained(cfg["encoder"]["weights"])
    stats = cfg["encoder"].get("bn_statistics", "batch")
    if stats == "episode":
        use_episode_batchnorm(encoder)
    elif stats != "batch":
        raise ValueError(f"encoder.bn_statistics must be 'batch' or 'episode', got {stats!r}")
    head_cfg = dict(cfg["head"])
    name = head_cfg.pop("name", None)
    if name is None:
        raise ValueError("head.name is not set; the method's YAML must name its head")
    return FewShotSegmenter(encoder, build_head(name, **head_cfg))


def dataset_spec(cfg: dict) -> DatasetSpec:
    return load_spec(cfg["dataset"], cfg["data_dir"])


def volume_store(cfg: dict, spec: DatasetSpec | None = None, stats_ids=None) -> VolumeStore:
    spec = spec or dataset_spec(cfg)
    return VolumeStore(spec, cfg["data_dir"], normalize=cfg["data"]["normalize"], stats_ids=stats_ids)


def fold_data(cfg: dict):
    """(spec, store, fold) for the configured dataset and eval_fold.

    With data.normalize=dataset (SSL-ALPNet's CT rule) the mean and std come from the fold's
    training scans, in training and evaluation alike.
    """
    check_data_dir(cfg)
    spec = dataset_spec(cfg)
    ids = spec.scan_ids(cfg["data_dir"])
    fold = spec.fold(ids, int(cfg["eval_fold"]), cfg["evaluation"]["fold_scheme"])
    store = volume_store(cfg, spec, stats_ids=fold.train_ids)
    return spec, store, fold


def eval_batch_size(cfg: dict, device: torch.device) -> int:
    """evaluation.batch_size; "auto" is 16 query slices on CUDA and 1 on the CPU. Measured on 2 cores
    at 256 x 256: batches of 4 are no faster for ADNet (13.1-13.5 against 12.4-13.0 slices/s) and
    slower for Q-Net (1.4-1.6 against 2.4-2.6 slices/s; likely its 512 x 64 x 64 maps outgrowing the
    caches, not profiled). Each slice is still encoded once for all classes."""
    return resolve_auto(cfg["evaluation"]["batch_size"], device, cuda=16, cpu=1)


def protocol_options(cfg: dict, device: torch.device | None = None) -> ProtocolOptions:
    e = cfg["evaluation"]
    device = device or resolve_device(cfg["device"])
    return ProtocolOptions(supp_idx=int(e["supp_idx"]), n_part=int(e["n_part"]), chunking=e["chunking"],
                           scored=e["scored"], fold_scheme=e["fold_scheme"], batch_size=eval_batch_size(cfg, device),
                           cache_features=bool(e["cache_features"]))


def pseudolabel_folder(cfg: dict) -> str:
    if cfg["data"]["pseudolabels"]:
        return str(cfg["data"]["pseudolabels"])
    if cfg["sampler"]["name"] == "supervoxel":
        return f"supervoxels_{int(cfg['data']['n_sv'])}"
    return f"superpixels_{int(cfg['sampler'].get('superpixel_min_size', 400))}"


def build_episode_dataset(cfg: dict, store: VolumeStore, train_ids, seed: int):
    """The training episode sampler chosen by sampler.name."""
    s = cfg["sampler"]
    augment = AugmentParams.from_config(cfg["augment"]) if cfg["augment"]["enabled"] else None
    test_labels = store.spec.check_label_ids(cfg["test_labels"], "test_labels")
    if s["name"] == "supervoxel":
        from dataloaders.supervoxel_episodes import SupervoxelEpisodes
        return SupervoxelEpisodes(
            store, train_ids, pseudolabel_folder(cfg), pair_rule=s["pair_rule"], min_size=int(s["min_size"]),
            reverse_p=float(s["reverse_p"]), test_labels=test_labels, exclude_rule=cfg["exclude_rule"],
            setting=int(cfg["setting"]), use_gt=bool(s["use_gt"]), qnet_set_order=bool(s["qnet_set_order"]),
            augment=augment, augment_on_device=bool(cfg["augment"]["on_device"]), seed=seed)
    if s["name"] == "superpixel":
        from dataloaders.superpixel_episodes import SuperpixelEpisodes
        return SuperpixelEpisodes.from_config(cfg, store, train_ids, seed)
    raise ValueError(f"unknown sampler {s['name']!r}")


def check_data_dir(cfg: dict) -> Path:
    path = Path(cfg["data_dir"])
    if not path.is_dir():
        hint = (" Generate the synthetic phantoms with `python -m data.phantoms " + str(path) + "`."
                if str(cfg["dataset"]).upper() == "SYNTH" else " See data/README.md for how to prepare it.")
        raise DataError(f"data directory not found: {path} (dataset {cfg['dataset']}).{hint}")
    return path
