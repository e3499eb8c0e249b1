"""ResNet-101 encoders in the two layouts the methods use, and pretrained-weight loading.

Layouts (for a 256 x 256 input):

- ``deeplab_r101`` (ADNet, SSL-ALPNet, DSPNet): torchvision ResNet-101 with
  ``replace_stride_with_dilation=[False, True, True]`` (output stride 8, as DeepLabv3's backbone),
  then a 1x1 convolution 2048 -> 256 without bias on layer4.
  Returns ``{"out": N x 256 x 32 x 32}``.
- ``qnet_r101`` (Q-Net): ``replace_stride_with_dilation=[True, True, False]``; layer3 is
  1024 x 64 x 64 and layer4 2048 x 32 x 32, each reduced by a 1x1 convolution (no bias) to 512
  channels, plus the query-informed threshold branch
  ``t = Linear(1000 -> 1)(fc(GAP(layer4)))`` (ResNet's own fc 2048 -> 1000, no nonlinearity).
  Returns ``{"layer3": N x 512 x 64 x 64, "layer4": N x 512 x 32 x 32, "threshold": N x 1}``.

In a model (models/fewshot.py) the encoder computes only what its head reads (``freeze_unread``):
RPT and GMRD read ``layer3`` and ``threshold``, so the layer4 reduction is skipped, while layer4
itself still runs because the threshold branch pools it; a head reading layer3 alone would skip
layer4 too. The skipped layers keep their weights in the state dict, frozen. ``forward(images, maps)``
computes a subset of the read maps: evaluation encodes GMRD's query slices with ``layer3`` alone, skipping
layer4, when no support it is segmented with is empty (models/heads/contract.py ``query_maps``).

``ResNetEncoder.channels`` gives the channels of each map (``{"out": 256}``, ...): heads get their
channel counts from it (models.engine.builders.build_model), never from their config.

Pretrained weights (``weights``): ``imagenet`` (torchvision ``resnet101-63fe2227.pth``),
``deeplabv3_coco`` (``deeplabv3_resnet101_coco-586e9e4e.pth``, the DeepLabv3 backbone trained on
COCO), a path to a checkpoint file, or ``none``. Named weights are looked up in the torch hub cache,
``$TORCH_HOME/hub/checkpoints/``, with TORCH_HOME defaulting to ``./pretrained_model`` as in the
reference code; nothing is downloaded. Loading reports how many tensors matched, and matching none
is an error rather than a silent random initialisation (Q-Net's "resnet101" option silently
matched 0 keys); so is matching only part of the trunk (e.g. ResNet-50 weights leave layer3.6+
random) unless ``encoder.allow_partial=True``. Files are read with torch.load(weights_only=True)
(models.engine.checkpoints.load_checkpoint_file), and a training snapshot of this project is refused
with the keys that take one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.core.checkpoint_files import load_checkpoint_file
from data.core.errors import CheckpointError, UserError
from data.core.run_folder import RunFolder
from models.tv import resnet101

log = logging.getLogger(__name__)

PRETRAINED_FILES = {
    "imagenet": "resnet101-63fe2227.pth",
    "deeplabv3_coco": "deeplabv3_resnet101_coco-586e9e4e.pth",
}
_BODY = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


class PretrainedWeightsError(UserError):
    """A pretrained-weights file is missing, unreadable or does not fit the encoder."""


@dataclass(frozen=True)
class Layout:
    dilation: tuple[bool, bool, bool]
    reduce: dict[str, int]            # tapped layer -> reduced channels
    threshold_branch: bool
    init: str                         # "torchvision" or "kaiming_fan_out" (Q-Net's _init_weights)


LAYOUTS = {
    "deeplab_r101": Layout((False, True, True), {"layer4": 256}, False, "torchvision"),
    "qnet_r101": Layout((True, True, False), {"layer3": 512, "layer4": 512}, True, "kaiming_fan_out"),
}
_OUTPUT_NAMES = {"deeplab_r101": {"layer4": "out"}, "qnet_r101": {"layer3": "layer3", "layer4": "layer4"}}
_IN_CHANNELS = {"layer3": 1024, "layer4": 2048}


def torch_home() -> Path:
    return Path(os.environ.get("TORCH_HOME", "./pretrained_model"))


def pretrained_path(weights: str) -> Path:
    """Where a named pretrained checkpoint must be (the torch hub cache layout)."""
    return torch_home() / "hub" / "checkpoints" / PRETRAINED_FILES[weights]


class ResNetEncoder(nn.Module):
    """ResNet-101 trunk with 1x1 reductions on the tapped layers (see module docstring).

    forward(images: N x 3 x H x W) -> dict of named maps, each N x C x h x w (threshold: N x 1).
    """

    def __init__(self, layout: str = "deeplab_r101"):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown encoder layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        self.layout_name = layout
        self.layout = LAYOUTS[layout]
        trunk = resnet101(weights=None, replace_stride_with_dilation=list(self.layout.dilation))
        self.backbone = nn.ModuleDict({name: getattr(trunk, name) for name in _BODY})
        if self.layout.threshold_branch:
            self.backbone["fc"] = trunk.fc
            self.threshold = nn.Linear(1000, 1)
        self.reduce = nn.ModuleDict({
            layer: nn.Conv2d(_IN_CHANNELS[layer], ch, kernel_size=1, bias=False)
            for layer, ch in self.layout.reduce.items()
        })
        if self.layout.init == "kaiming_fan_out":
            self._init_like_qnet()
        self.read: tuple[str, ...] | None = None     # the maps forward computes (None: all; freeze_unread)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.channels)

    @property
    def channels(self) -> dict[str, int]:
        """Output channels per map, in output order: {"out": 256} (deeplab_r101); {"layer3": 512,
        "layer4": 512, "threshold": 1} (qnet_r101; the threshold is one value per image, N x 1).
        build_model gives these to the head (its `channels` argument), so no config repeats them."""
        names = _OUTPUT_NAMES[self.layout_name]
        out = {names[layer]: ch for layer, ch in self.layout.reduce.items()}
        return out | ({"threshold": 1} if self.layout.threshold_branch else {})

    def freeze_unread(self, read: tuple[str, ...]) -> None:
        """Compute and train only what feeds the maps a head reads (RPT and GMRD read Q-Net's layer3 and
        threshold, not its layer4 reduction). From now on forward returns only the read maps and skips
        the layers that feed nothing read (`computed_layers`): an unread reduction, the threshold branch,
        layer4 itself when neither its reduction nor the threshold is read. Those layers are frozen:
        their weights would get no gradient anyway, and a parameter without one makes
        DistributedDataParallel fail. They stay in the state dict, so checkpoints keep the reference
        layout (a reference checkpoint loads, and unfreezing restores the whole encoder)."""
        unknown = [m for m in read if m not in self.output_names]
        if unknown:
            raise ValueError(f"the '{self.layout_name}' encoder has no maps {unknown} (it has {self.output_names})")
        self.read = tuple(read)
        names = _OUTPUT_NAMES[self.layout_name]
        for layer, conv in self.reduce.items():
            conv.requires_grad_(names[layer] in read)
        if self.layout.threshold_branch and "threshold" not in read:
            self.threshold.requires_grad_(False)
            self.backbone["fc"].requires_grad_(False)
        body = self.computed_layers()
        for name in _BODY:
            if name not in body:
                self.backbone[name].requires_grad_(False)

    def wanted_maps(self, maps: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The maps a forward computes: `maps`, or all read maps when None (all maps before
        freeze_unread). A map outside `read` is a ValueError: its layers may be frozen or skipped."""
        read = self.output_names if self.read is None else self.read
        if maps is None:
            return read
        unread = [m for m in maps if m not in read]
        if unread:
            raise ValueError(f"the '{self.layout_name}' encoder does not compute the maps {unread}: it computes "
                             f"{read} (the maps its head reads, freeze_unread); ask for a subset of those")
        return tuple(maps)

    def computed_layers(self, maps: tuple[str, ...] | None = None) -> tuple[str, ...]:
        """The trunk layers forward(images, maps) runs, in order: up to the deepest one whose reduction or
        threshold branch is wanted (`wanted_maps`; all of _BODY before freeze_unread with maps None)."""
        wanted = self.wanted_maps(maps)
        names = _OUTPUT_NAMES[self.layout_name]
        needed = [layer for layer in self.reduce if names[layer] in wanted]
        if self.layout.threshold_branch and "threshold" in wanted:
            needed.append("layer4")
        last = max((_BODY.index(layer) for layer in needed), default=-1)
        return _BODY[:last + 1]

    def _init_like_qnet(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, maps: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The maps in `read` (all before freeze_unread), or only `maps` (a subset of them; evaluation's
        query slices, models/engine/predictor.py), computing only the layers that feed them. A map's
        values do not depend on which other maps are computed."""
        wanted = self.wanted_maps(maps)
        x = images
        taps = {}
        for name in self.computed_layers(wanted):
            x = self.backbone[name](x)
            taps[name] = x
        names = _OUTPUT_NAMES[self.layout_name]
        out = {names[layer]: conv(taps[layer]) for layer, conv in self.reduce.items() if names[layer] in wanted}
        if self.layout.threshold_branch and "threshold" in wanted:
            pooled = F.adaptive_avg_pool2d(taps["layer4"], 1).flatten(1)
            out["threshold"] = self.threshold(self.backbone["fc"](pooled))
        return out

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, weights: str | os.PathLike | None, allow_partial: bool = False,
                        report: bool = True) -> int:
        """Load backbone weights; returns the number of tensors loaded (0 only for 'none').
        `allow_partial` (encoder.allow_partial) accepts a file that fits only part of the trunk;
        `report`: say what was loaded (a pre-flight check on the meta device says nothing, so each run
        says it once)."""
        if weights in (None, "none", "None", ""):
            if report:
                log.info("encoder: no pretrained weights (random initialisation)")
            return 0
        weights = str(weights)
        if weights in PRETRAINED_FILES:
            path = pretrained_path(weights)
            if not path.is_file():
                raise PretrainedWeightsError(
                    f"pretrained weights '{weights}' not found: expected {path}. Download "
                    f"{PRETRAINED_FILES[weights]} from torchvision (the URL is in README.md, "
                    f"'Pretrained weights') into {path.parent}/, set TORCH_HOME to the folder that "
                    f"holds hub/checkpoints/, or set encoder.weights=none to train from scratch.")
        else:
            path = Path(weights)
            if not path.is_file():
                raise PretrainedWeightsError(
                    f"pretrained weights file not found: {path}. encoder.weights takes "
                    f"{', '.join(PRETRAINED_FILES)}, none, or the path of a checkpoint file.")
        try:
            state = load_checkpoint_file(path, what="pretrained weights")
        except CheckpointError as err:
            raise PretrainedWeightsError(f"encoder.weights: {err}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        _refuse_training_snapshot(state, path)
        return self._load_backbone_state(state, source=path, allow_partial=allow_partial, report=report)

    def _load_backbone_state(self, state: dict, source: Path, allow_partial: bool = False, report: bool = True) -> int:
        """Copy tensors whose names match the trunk, from torchvision classifier
        (``layer1.0.conv1.weight``) or segmentation (``backbone.layer1.0.conv1.weight``) checkpoints.

        Trunk tensors the file lacks would silently stay random in a "pretrained" encoder, so that is
        an error unless `allow_partial` (see _expected_in_weights for the tensors a file may lack)."""
        own = self.backbone.state_dict()
        loaded, mismatched = {}, []
        for key, value in state.items():
            name = key[len("backbone."):] if key.startswith("backbone.") else key
            if name not in own:
                continue
            if own[name].shape != value.shape:
                mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(own[name].shape)}")
                continue
            loaded[name] = value
        if mismatched:
            raise PretrainedWeightsError(f"{source}: {len(mismatched)} tensors have the wrong shape, e.g. "
                                         + "; ".join(mismatched[:3]))
        if not loaded:
            raise PretrainedWeightsError(
                f"{source}: none of its {len(state)} tensors matches the ResNet-101 encoder "
                f"(expected names like 'layer1.0.conv1.weight' or 'backbone.layer1.0.conv1.weight'); "
                f"refusing to continue with a randomly initialised encoder")
        expected = [k for k in own if _expected_in_weights(k)]
        left = [k for k in expected if k not in loaded]
        if left and not allow_partial:
            raise PretrainedWeightsError(
                f"encoder.weights: {source} fits only part of the ResNet-101 encoder: {len(expected) - len(left)} "
                f"of its {len(expected)} backbone tensors matched, and {len(left)} would stay at their random "
                f"initialisation ({', '.join(left[:4])}{', ...' if len(left) > 4 else ''}). Weights of another "
                f"network do this, e.g. a ResNet-50 (6 blocks in layer3 instead of 23). Use ResNet-101 weights, "
                f"or set encoder.allow_partial=True to train with the unmatched tensors left at initialisation")
        self.backbone.load_state_dict(loaded, strict=False)
        not_loaded = sorted(set(own) - set(loaded))
        log.log(logging.INFO if report else logging.DEBUG, "encoder: loaded %d of %d backbone tensors from %s%s",
                len(loaded), len(own), source,
                f" (left at initialisation: {', '.join(not_loaded[:4])}{'...' if len(not_loaded) > 4 else ''})"
                if not_loaded else "")
        return len(loaded)


def _expected_in_weights(name: str) -> bool:
    """Whether a ResNet-101 weights file must hold this trunk tensor. Not the classifier `fc`
    (segmentation checkpoints such as DeepLabv3's have none; only Q-Net's threshold branch uses it,
    which then starts from its initialisation as in the reference), nor BatchNorm's
    `num_batches_tracked` counters (absent from older torchvision files; they change no output)."""
    return not name.startswith("fc.") and not name.endswith("num_batches_tracked")


def _refuse_training_snapshot(state, path: Path) -> None:
    """A snapshot written by training.py is a whole few-shot model with its config, not encoder
    weights; passing it as encoder.weights is a mix-up of keys, so say which key takes it."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "config" in state:
        run = f" ({RunFolder.of_snapshot(path)})" if RunFolder.is_snapshot_file(path) else ""
        raise PretrainedWeightsError(
            f"encoder.weights: {path} is a training snapshot of this project (a whole model with its config), "
            f"not pretrained encoder weights. To evaluate it, use evaluation.checkpoint={path}; to continue "
            f"its training, use train.resume=<its run folder>{run}")
