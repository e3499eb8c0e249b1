"""Prototype heads, one file each. A head is built by name from the `head` section of the config.

Every head keeps the contract written in models/heads/contract.py (`Head`, a typing.Protocol):

    head(support: {map name: B x S x C x h x w}, support_masks: B x S x H x W,
         query: {map name: B x Q x C x h x w}) -> HeadOutput(log_probs B x Q x 2 x H x W, aux_losses)

declares the encoder maps it reads in `feature_maps`, and may have `lr_multipliers` and
`branch_counts`. Its constructor arguments are its config options (`head.<option>`), except those
the encoder supplies (contract.ENCODER_ARGUMENTS: `channels`), which `build_head` receives from
build_model. Adding a method means one head file, one entry in HEADS below and one YAML file in
configs/methods/.

A head file whose reference code released checkpoints also declares how to read them, at module
level: `REFERENCE_CHECKPOINT`, a models.heads.reference_format.ReferenceFormat (the key table and
the keys that identify the format). `reference_formats()` collects them; models/engine/
reference_checkpoints.py detects, renames and loads such checkpoints with them.
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping

from models.heads.contract import check_head, config_options, constructor_parameters
from models.heads.reference_format import ReferenceFormat

# head name -> "module:Class"; imported lazily so that one head's dependencies never burden another
HEADS = {
    "adnet": "models.heads.adnet:ADNetHead",
    "alpnet": "models.heads.alp:ALPNetHead",
    "dspnet": "models.heads.dspnet:DSPNetHead",
    "gmrd": "models.heads.gmrd:GMRDHead",
    "qnet": "models.heads.qnet:QNetHead",
    "rpt": "models.heads.rpt:RPTHead",
}


def head_module(name: str):
    """The module of a registered head (imported on first use)."""
    if name not in HEADS:
        close = difflib.get_close_matches(name, list(HEADS), n=1)
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    return importlib.import_module(HEADS[name].split(":")[0])


def head_class(name: str):
    module = head_module(name)
    return getattr(module, HEADS[name].split(":")[1])


def reference_formats() -> dict[str, ReferenceFormat]:
    """head name -> the `REFERENCE_CHECKPOINT` its file declares, for every registered head that
    declares one (in HEADS order). Imports every head."""
    formats = {}
    for name in HEADS:
        fmt = getattr(head_module(name), "REFERENCE_CHECKPOINT", None)
        if fmt is not None:
            if not isinstance(fmt, ReferenceFormat):
                raise TypeError(f"{HEADS[name].split(':')[0]}.REFERENCE_CHECKPOINT must be a ReferenceFormat, "
                                f"got {type(fmt).__name__}")
            formats[name] = fmt
    return formats


def head_options(name: str) -> dict:
    """The options a head takes from the config (`head.<option>`), with their defaults; the
    arguments the encoder supplies (`channels`) are not among them."""
    return config_options(head_class(name))


def build_head(name: str, channels: Mapping[str, int] | int | None = None, **options):
    """Build a head from its config options.

    `channels`: the encoder's channels per map ({map: C}, ResNetEncoder.channels), given to heads
    whose constructor takes `channels` (restricted to the maps the head reads); an int is passed as
    it is (a head built by hand). Heads that do not take it ignore it."""
    cls = head_class(name)
    known = head_options(name)
    unknown = [k for k in options if k not in known]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, list(known), n=1)) else k
                 for k in unknown]
        raise ValueError(f"head '{name}' has no option(s) {', '.join(hints)}; its options are "
                         f"{', '.join(known)}")
    if channels is not None and "channels" in constructor_parameters(cls):
        if isinstance(channels, Mapping):
            channels = {m: int(channels[m]) for m in cls.feature_maps if m in channels}
        options["channels"] = channels
    head = cls(**options)
    check_head(head)
    return head
