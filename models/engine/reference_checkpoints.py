"""Load checkpoints written by the reference training code (Q-Net, ADNet 2-D, RPT, GMRD) into our models.

A reference checkpoint is renamed key by key through an explicit table, then loaded strictly:
every key of the file must map to a tensor of our model and every tensor of our model must be
provided, except ADNet's dead ASPP tensors, which are dropped by name and reported as ignored by
design. Anything else raises `CheckpointError` naming the keys.

| reference key (as saved)                | our key (`FewShotSegmenter.state_dict()`) |
|-----------------------------------------|-------------------------------------------|
| **Q-Net** (`torch.save(model.state_dict())`, plain keys; ZJLAB-AMMI/Q-Net models/encoder.py)      |
| `encoder.backbone.<conv1,bn1,layer1-4,fc>.*` | `encoder.backbone.<same>.*`          |
| `encoder.reduce1.weight` (layer3 1x1, 1024->512) | `encoder.reduce.layer3.weight`     |
| `encoder.reduce2.weight` (layer4 1x1, 2048->512) | `encoder.reduce.layer4.weight`     |
| `encoder.reduce1d.{weight,bias}` (Linear 1000->1) | `encoder.threshold.{weight,bias}` |
| **ADNet 2-D** (`nn.DataParallel`, so a `module.` prefix; sha168/ADNet models/fewshot_anom.py)  |
| `module.encoder.backbone.<conv1,bn1,layer1-4>.*` | `encoder.backbone.<same>.*`        |
| `module.encoder.localconv.weight` (1x1, 2048->256) | `encoder.reduce.layer4.weight`   |
| `module.t` (shape [1])                  | `head.threshold` (shape [], reshaped)     |
| `module.encoder.asppconv.weight`, `module.encoder.aspp_out.*` (37) | dropped, ignored by design |
| **RPT** (YazhouZhu19/RPT, plain keys): Q-Net's encoder keys as above, plus                        |
| `MHA.{w_qs,w_ks,w_vs,fc,layer_norm}.*`  | `head.attention.{w_q,w_k,w_v,fc,norm}.*`  |
| `MLP.mlp.{0,2}.*`, `MLP.norm.*`, `layer_norm.*` | `head.mlp.{fc1,fc2}.*`, `head.mlp.norm.*`, `head.norm.*` |
| **GMRD** (zmcheng9/GMRD, plain keys): Q-Net's encoder keys as above, plus                         |
| `mlp{1,2}.reduce.{0,2}.*`               | `head.{fg,bg}_mlp.{spatial,mix}.*`        |
| `decoder{1,2}.{res1.0,res2.0,res2.2,down.0,down.3}.*` | `head.{fg,bg}_decoder.{reduce,res1,res2,hidden,logit}.*` |

`aspp_out` is torchvision's ASPP followed by the DeepLab head's 3x3 conv; like `asppconv` it is
never used in ADNet's forward pass (use_aspp=False), so these 38 tensors are the only ones dropped.

The format is detected from keys only one format has (`FORMATS[...].signature`); a file that
matches none is treated as one of our own state dicts (models/engine/checkpoints.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.core.errors import CheckpointError

log = logging.getLogger(__name__)


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _adnet_dead_aspp_keys() -> frozenset[str]:
    """ADNet's `asppconv` and `aspp_out` = Sequential(torchvision ASPP(2048, [12, 24, 36]), 3x3 conv):
    created, put in the optimiser, saved, never used (use_aspp=False)."""
    aspp = [f"0.convs.{i}.0.weight" for i in range(4)] + [k for i in range(4) for k in _bn(f"0.convs.{i}.1")]
    aspp += ["0.convs.4.1.weight", *_bn("0.convs.4.2"), "0.project.0.weight", *_bn("0.project.1"), "1.weight"]
    return frozenset(["module.encoder.asppconv.weight"] + [f"module.encoder.aspp_out.{k}" for k in aspp])


@dataclass(frozen=True)
class ReferenceFormat:
    """How one reference codebase names its tensors.

    rules: (reference key, our key) pairs; a reference key ending in "." is a prefix whose
    remainder is kept, any other is an exact name. dead: reference keys dropped by name.
    reshape: our keys whose tensor may be reshaped to our shape (same number of elements).
    """
    name: str
    title: str
    method: str                       # our method whose model these checkpoints fit
    rules: tuple[tuple[str, str], ...]
    signature: frozenset[str]
    dead: frozenset[str] = frozenset()
    reshape: frozenset[str] = frozenset()

    def our_key(self, key: str) -> str | None:
        return _rename(key, self.rules)

    def reference_key(self, ours_key: str) -> str | None:
        return _rename(ours_key, ((ours, ref) for ref, ours in self.rules))


def _rename(key: str, pairs) -> str | None:
    """The first (source, target) pair that names `key`: a source ending in "." is a prefix whose
    remainder is kept, any other an exact name. None when no pair does."""
    for source, target in pairs:
        if source.endswith("."):
            if key.startswith(source):
                return target + key[len(source):]
        elif key == source:
            return target
    return None


# Q-Net's encoder as Q-Net, RPT and GMRD save it (models/encoder.py of each: the same Res101Encoder)
_QNET_ENCODER_RULES = (("encoder.backbone.", "encoder.backbone."),
                       ("encoder.reduce1.", "encoder.reduce.layer3."),
                       ("encoder.reduce2.", "encoder.reduce.layer4."),
                       ("encoder.reduce1d.", "encoder.threshold."))
_QNET_SIGNATURE = frozenset({"encoder.reduce1.weight", "encoder.reduce2.weight", "encoder.reduce1d.weight"})

FORMATS = {
    "qnet": ReferenceFormat(
        name="qnet", title="Q-Net (ZJLAB-AMMI/Q-Net)", method="qnet",
        rules=_QNET_ENCODER_RULES,
        signature=_QNET_SIGNATURE,
    ),
    "adnet": ReferenceFormat(
        name="adnet", title="ADNet 2-D (sha168/ADNet)", method="adnet",
        rules=(("module.encoder.backbone.", "encoder.backbone."),
               ("module.encoder.localconv.", "encoder.reduce.layer4."),
               ("module.t", "head.threshold")),
        signature=frozenset({"module.encoder.localconv.weight", "module.t"}),
        dead=_adnet_dead_aspp_keys(),
        reshape=frozenset({"head.threshold"}),
    ),
    # GMRD saves Q-Net's encoder (reduce2 unused, still saved) plus its MLPs and decoders (models/moudles.py)
    "gmrd": ReferenceFormat(
        name="gmrd", title="GMRD (zmcheng9/GMRD)", method="gmrd",
        rules=_QNET_ENCODER_RULES + (
               ("mlp1.reduce.0.", "head.fg_mlp.spatial."),          # Linear(H*W -> 100)
               ("mlp1.reduce.2.", "head.fg_mlp.mix."),              # Linear(100 -> 100)
               ("mlp2.reduce.0.", "head.bg_mlp.spatial."),          # Linear(H*W -> 600)
               ("mlp2.reduce.2.", "head.bg_mlp.mix."),
               ("decoder1.res1.0.", "head.fg_decoder.reduce."),     # 1x1 conv 102 -> 100
               ("decoder1.res2.0.", "head.fg_decoder.res1."),       # 3x3 convs of the residual block
               ("decoder1.res2.2.", "head.fg_decoder.res2."),
               ("decoder1.down.0.", "head.fg_decoder.hidden."),     # 3x3 conv -> 100
               ("decoder1.down.3.", "head.fg_decoder.logit."),      # 1x1 conv 100 -> 1
               ("decoder2.res1.0.", "head.bg_decoder.reduce."),     # the same for the background (602 -> 600)
               ("decoder2.res2.0.", "head.bg_decoder.res1."),
               ("decoder2.res2.2.", "head.bg_decoder.res2."),
               ("decoder2.down.0.", "head.bg_decoder.hidden."),
               ("decoder2.down.3.", "head.bg_decoder.logit.")),
        signature=_QNET_SIGNATURE | {"mlp1.reduce.0.weight"},
    ),
    # RPT saves Q-Net's encoder (reduce2 unused, still saved) plus its transformer (models/attention.py)
    "rpt": ReferenceFormat(
        name="rpt", title="RPT (YazhouZhu19/RPT)", method="rpt",
        rules=_QNET_ENCODER_RULES + (
               ("MHA.w_qs.", "head.attention.w_q."),
               ("MHA.w_ks.", "head.attention.w_k."),
               ("MHA.w_vs.", "head.attention.w_v."),
               ("MHA.fc.", "head.attention.fc."),
               ("MHA.layer_norm.", "head.attention.norm."),
               ("MLP.mlp.0.", "head.mlp.fc1."),
               ("MLP.mlp.2.", "head.mlp.fc2."),
               ("MLP.norm.", "head.mlp.norm."),
               ("layer_norm.", "head.norm.")),
        signature=_QNET_SIGNATURE | {"MHA.w_qs.weight"},
    ),
}


@dataclass
class LoadReport:
    format: str
    loaded: int
    ignored: list[str] = field(default_factory=list)   # dropped by design (ADNet's dead ASPP)


def detect_format(state: dict) -> str | None:
    """The reference format of a checkpoint (a FORMATS name), None for anything else (e.g. our snapshots).

    A format matches when the file holds any of its signature keys. Methods built on Q-Net's code
    (RPT, GMRD) save Q-Net's encoder keys plus their head's, so their signatures include Q-Net's: of
    several matches, the one whose signature contains all the others' and matches in full wins."""
    keys = set(state)
    found = [name for name, fmt in FORMATS.items() if fmt.signature & keys]
    if len(found) > 1:
        full = [n for n in found if FORMATS[n].signature <= keys]    # a Q-Net file half-matches RPT's
        widest = [n for n in full if all(FORMATS[m].signature <= FORMATS[n].signature for m in full)]
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
    f = FORMATS[fmt]
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
                              f"table (models/engine/reference_checkpoints.py): {_listing(sorted(unknown))}")
    return converted, sorted(ignored)


def load_reference_state(model: torch.nn.Module, state: dict, fmt: str | None = None,
                         source: str | Path = "checkpoint") -> LoadReport:
    """Rename a reference checkpoint's state dict and load it strictly into `model`.

    Missing, unknown and wrongly shaped keys raise CheckpointError with both names (reference and
    ours); ADNet's dead ASPP keys are the only ones dropped (logged, and listed in the report).
    """
    fmt = fmt or detect_format(state)
    if fmt is None:
        titles = ", ".join(f.title for f in FORMATS.values())
        raise CheckpointError(f"{source} is not a reference checkpoint of {titles} (none of the keys "
                              f"{', '.join(sorted(set().union(*(f.signature for f in FORMATS.values()))))})")
    f = FORMATS[fmt]
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
