"""Prototype heads, one file each. A head is built by name from the `head` section of the config.

Every head has the same interface (see models/heads/common.py: HeadOutput):

    head(support: {map name: B x S x C x h x w}, support_masks: B x S x H x W,
         query: {map name: B x Q x C x h x w}) -> HeadOutput(log_probs B x Q x 2 x H x W, aux_losses)

and declares the encoder maps it reads in `feature_maps`. Adding a method means one head file,
one entry in HEADS below and one YAML file in configs/methods/.
"""
from __future__ import annotations

import difflib
import importlib
import inspect

# head name -> "module:Class"; imported lazily so that one head's dependencies never burden another
HEADS = {
    "adnet": "models.heads.adnet:ADNetHead",
    "alpnet": "models.heads.alp:ALPNetHead",
    "dspnet": "models.heads.dspnet:DSPNetHead",
    "qnet": "models.heads.qnet:QNetHead",
}


def head_class(name: str):
    if name not in HEADS:
        close = difflib.get_close_matches(name, list(HEADS), n=1)
        raise ValueError(f"unknown head {name!r}; available: {', '.join(sorted(HEADS))}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    module, cls = HEADS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def head_options(name: str) -> dict:
    """The options a head takes, with their defaults."""
    params = inspect.signature(head_class(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def build_head(name: str, **options):
    known = head_options(name)
    unknown = [k for k in options if k not in known]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, list(known), n=1)) else k
                 for k in unknown]
        raise ValueError(f"head '{name}' has no option(s) {', '.join(hints)}; its options are "
                         f"{', '.join(known)}")
    return head_class(name)(**options)
