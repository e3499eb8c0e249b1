"""Load checkpoints written by the reference training code (Q-Net, ADNet 2-D, RPT, GMRD) into our models.

Each head declares its reference checkpoints beside its code: `REFERENCE_CHECKPOINT` in its file under
models/heads/ (a `ReferenceFormat`: the reference key -> our key table, the keys that identify the
format, the keys dropped by design; the tables are in each head file's docstring). This module is
the generic part: it detects the format of a state dict by asking every registered head
(`models.heads.reference_formats`), renames it through that head's table and loads it strictly.

Every key of the file must map to a tensor of our model and every tensor of our model must be
provided, except the keys a format drops by name (ADNet's dead ASPP tensors), which are reported as
ignored by design. Anything else raises `CheckpointError` naming the keys.

The format is detected from keys only one format has (`FORMATS[...].signature`); a file that
matches none is treated as one of our own state dicts (models/engine/checkpoints.py).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.core.errors import CheckpointError
from models.heads import HEADS, reference_formats
from models.heads.reference_format import ReferenceFormat

log = logging.getLogger(__name__)


@functools.cache
def formats() -> dict[str, ReferenceFormat]:
    """format name (= the head's name) -> the ReferenceFormat its head file declares. Imports every
    head once, on first use, so that importing this module imports none."""
    return reference_formats()


def __getattr__(name: str):
    if name == "FORMATS":             # module attribute, computed on first use (formats())
        return formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _table(fmt: str) -> str:
    """Where a format's key table is declared, for messages."""
    return f"REFERENCE_CHECKPOINT in {HEADS[fmt].split(':')[0].replace('.', '/')}.py"


@dataclass
class LoadReport:
    format: str
    loaded: int
    ignored: list[str] = field(default_factory=list)   # dropped by design (ADNet's dead ASPP)


def detect_format(state: dict) -> str | None:
    """The reference format of a checkpoint (a FORMATS name: the name of the head that declares it),
    None for anything else (e.g. our snapshots).

    A format matches when the file holds any of its signature keys. Methods built on Q-Net's code
    (RPT, GMRD) save Q-Net's encoder keys plus their head's, so their signatures include Q-Net's: of
    several matches, the one whose signature contains all the others' and matches in full wins."""
    known = formats()
    keys = set(state)
    found = [name for name, fmt in known.items() if fmt.signature & keys]
    if len(found) > 1:
        full = [n for n in found if known[n].signature <= keys]    # a Q-Net file half-matches RPT's
        widest = [n for n in full if all(known[m].signature <= known[n].signature for m in full)]
        if len(widest) != 1:
            raise CheckpointError(f"checkpoint has keys of several reference formats ({', '.join(found)}); "
                                  f"cannot tell how to rename it")
        found = widest
    return found[0] if found else None


def _listing(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def convert_state(state: dict, fmt: str) -> tuple[dict, list[str]]:
    """Rename a reference state dict to our keys: -> (our state dict, reference keys ignored by design).

    Raises CheckpointError naming every key the table does not cover.
    """
    f = formats()[fmt]
    converted, ignored, unknown = {}, [], []
    for key, value in state.items():
        if key in f.dead:
            ignored.append(key)
        elif (ours := f.our_key(key)) is not None:
            converted[ours] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) of this {f.title} checkpoint are not in the reference key "
                              f"table ({_table(fmt)}): {_listing(sorted(unknown))}")
    return converted, sorted(ignored)


def load_reference_state(model: torch.nn.Module, state: dict, fmt: str | None = None,
                         source: str | Path = "checkpoint") -> LoadReport:
    """Rename a reference checkpoint's state dict and load it strictly into `model`.

    Missing, unknown and wrongly shaped keys raise CheckpointError with both names (reference and
    ours); ADNet's dead ASPP keys are the only ones dropped (logged, and listed in the report).
    """
    known = formats()
    fmt = fmt or detect_format(state)
    if fmt is None:
        titles = ", ".join(f.title for f in known.values())
        raise CheckpointError(f"{source} is not a reference checkpoint of {titles} (none of the keys "
                              f"{', '.join(sorted(set().union(*(f.signature for f in known.values()))))})")
    f = known[fmt]
    try:
        converted, ignored = convert_state(state, fmt)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    own = model.state_dict()
    problems = []
    missing = sorted(set(own) - set(converted))
    if missing:
        problems.append(f"{len(missing)} tensor(s) of our model are not in the file: " + _listing(
            [f"{k} (reference name {f.reference_key(k) or 'none: no reference counterpart'})" for k in missing]))
    unexpected = sorted(set(converted) - set(own))
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) of the file have no tensor in our model: " + _listing(
            [f"{f.reference_key(k)} (renamed {k})" for k in unexpected]))
    for key in sorted(set(own) & set(converted)):
        value, want = converted[key], own[key].shape
        if value.shape == want:
            continue
        if key in f.reshape and value.numel() == own[key].numel():
            converted[key] = value.reshape(want)
        else:
            problems.append(f"{f.reference_key(key)} has shape {tuple(value.shape)}, our {key} has {tuple(want)}")
    if problems:
        layout = getattr(getattr(model, "encoder", None), "layout_name", "?")
        head = type(getattr(model, "head", None)).__name__
        raise CheckpointError(
            f"{source} is a {f.title} checkpoint that does not fit this model (encoder {layout}, head {head}): "
            + "; ".join(problems) + f". {f.title} checkpoints load into `with {f.method}`.")
    model.load_state_dict(converted, strict=True)
    if ignored:
        log.info("%s: ignored by design %d unused %s tensors (%s)", source, len(ignored), f.title, _listing(ignored, 3))
    log.info("loaded %s checkpoint %s: %d tensors renamed to our keys", f.title, source, len(converted))
    return LoadReport(fmt, len(converted), ignored)
