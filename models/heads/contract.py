"""The head contract: what the rest of the pipeline may assume about a prototype head.

A head is a `torch.nn.Module` that conforms to the `Head` protocol below. It is a `typing.Protocol`
(structural), not an abstract base class, because:

- a head needs no common base class: each head file stays independent (DSPNet subclasses ALPNet's head
  for its code, not for a type), and a head ported from another code base conforms by its shape;
- half of the contract is optional (`lr_multipliers`, `branch_counts`, `query_maps`), which an ABC
  cannot require either; here each optional member is a protocol of its own with an accessor that gives
  the default (`lr_multipliers(head)`, `branch_counts(head)`, `query_maps(head, masks)`), so no caller
  reads it with an ad-hoc `getattr`;
- type checkers check the call sites against `Head` (FewShotSegmenter.head is a `Head`).

Support state (evaluation): everything a head computes from the support alone (prototypes, regions,
descriptors, thresholds) is computed once per support slice and class and reused for every query
slice and batch. A head provides the pair

    prepare_support(support, support_masks) -> state      (B x S support features and masks as forward)
    segment(state, query) -> HeadOutput                     (B x Q query features as forward)

in evaluation mode (`self.training` False), such that `segment(prepare_support(s, m), q)` gives the
log-probabilities `forward(s, m, q)` gives, bit-identical or at float rounding, for any split of the
queries into calls (so a random draw per query image stays one draw per query image, in the order of
the query images). The state is the head's own: a dict of tensors (and plain values), read only by
its `segment`, never changed by it. `prepare_support(head, ...)` / `segment_prepared(head, ...)`
call the pair, and fall back to `forward` for a head without it (its state is then just the
support features and masks).

Query maps (evaluation): a head may say which of its `feature_maps` it reads from the query for given
support masks, `query_maps(support_masks B x S x H x W) -> names`, so the encoder computes only those
for the query slices (GMRD reads Q-Net's threshold only for an episode whose supports are all empty,
so its queries skip layer4). `query_maps(head, support_masks)` gives it, all of `feature_maps` for a
head without the method.

Precision: heads compute in float32; the segmenter turns autocast off around every head call
(`float32_head_region`, models/heads/common.py), recording the caller's autocast. A head may run one
heavy part that tolerates bf16 in that autocast, read with `caller_autocast()` (GMRD's decoders with
`head.decoder_bf16=auto`), so that train.amp / evaluation.amp decide it as they decide the encoder's.

`isinstance(x, Head)` only checks that the members exist, so `check_head_class` / `check_head` check
the rest (an nn.Module, `feature_maps` a tuple of names, the forward signature, constructor options
with defaults, the optional members' types). FewShotSegmenter calls `check_head` when it is built and
tests/test_head_contract.py runs every registered head through both.

Constructor arguments: a head is built by `models.heads.build_head(name, channels=..., **options)`.
Every constructor argument but those in ENCODER_ARGUMENTS is a config option (`head.<name>`, with the
constructor's default; `models.heads.head_options`). ENCODER_ARGUMENTS are filled by
`models.engine.builders.build_model` from the encoder and are not config keys: `channels` receives
`{map name: C}` for the maps in the head's `feature_maps` (ResNetEncoder.channels), so no method YAML
repeats a channel count the encoder already knows.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from models.heads.common import HeadOutput

# constructor arguments filled from the encoder by build_model, never from the config
ENCODER_ARGUMENTS = ("channels",)
FORWARD_ARGUMENTS = ("support", "support_masks", "query")
QUERY_LABELS_ARGUMENT = "query_labels"     # optional forward argument: the query labels, in training only


@runtime_checkable
class Head(Protocol):
    """A prototype head (an nn.Module).

    feature_maps: the names of the encoder maps the head reads, e.g. ("out",) for the deeplab_r101
        layout, ("layer3", "layer4", "threshold") for Q-Net. The segmenter passes exactly these.

    forward(support, support_masks, query) -> HeadOutput, for B episodes of S support and Q query images
    of H x W pixels, on feature maps of h x w cells with C channels:

        support:        {map: B x S x C x h x w} support features (float32; the segmenter runs heads in fp32)
        support_masks:  B x S x H x W support masks, 1 foreground, 0 background (values in between are
                        allowed; the samplers give 0/1)
        query:          {map: B x Q x C x h x w} query features; a vector map (Q-Net's "threshold") is B x Q x 1
        returns HeadOutput(
            log_probs:  B x Q x 2 x H x W log-probabilities of [background, foreground]
                        (the prediction is the argmax, a tie goes to background),
            aux_losses: {name: scalar} auxiliary losses averaged over the episodes (only in training,
                        weighted by loss.weights.<name>),
            extras:     diagnostics (thresholds, counts), never used for the loss)

    Optional: a head whose forward also takes `query_labels` (a keyword argument with default None) is
    given the query labels in training, B x Q x H x W with 1 foreground, 0 background and the ignore
    index 255 (RPT's query-prototype loss uses them); evaluation never passes them (None).

    Episodes are independent: a batch of B episodes gives the outputs of the B episodes one by one.
    A head must not move tensors between devices (`.cuda()`); it follows its inputs.
    """

    feature_maps: tuple[str, ...]

    def __call__(self, support: Mapping[str, torch.Tensor], support_masks: torch.Tensor,
                 query: Mapping[str, torch.Tensor]) -> HeadOutput: ...


@runtime_checkable
class HasLrMultipliers(Protocol):
    """Optional: some parameters train at a scaled learning rate, with any optimizer (optim.name).

    lr_multipliers: {parameter-name fragment: factor}; a parameter of the whole model (names like
    "head.cal", "encoder.backbone.layer1.0.conv1.weight") whose name contains a fragment trains at
    lr x factor (the first matching fragment wins), e.g. DSPNet's {"head.cal": 1e-4}."""

    lr_multipliers: Mapping[str, float]


@runtime_checkable
class HasBranchCounts(Protocol):
    """Optional: running counts of the branches the head took (SSL-ALPNet / DSPNet fallbacks).

    branch_counts(reset=False) -> {name: count} since construction or the last reset."""

    def branch_counts(self, reset: bool = False) -> dict[str, int]: ...


@runtime_checkable
class HasSupportState(Protocol):
    """Optional: the support work once (see the module docstring), evaluation mode only."""

    def prepare_support(self, support: Mapping[str, torch.Tensor], support_masks: torch.Tensor) -> dict: ...

    def segment(self, state: dict, query: Mapping[str, torch.Tensor]) -> HeadOutput: ...


@runtime_checkable
class HasQueryMaps(Protocol):
    """Optional (evaluation mode): the maps of `feature_maps` that segment / forward read from the query
    when segmenting with these support masks (B x S x H x W, on any device); the others may be missing
    from the query's features."""

    def query_maps(self, support_masks: torch.Tensor) -> tuple[str, ...]: ...


_FALLBACK_STATE = "__forward_inputs__"


def prepare_support(head, support: Mapping[str, torch.Tensor], support_masks: torch.Tensor) -> dict:
    """The head's support state (evaluation mode): its own `prepare_support`, or for a head without one
    the support features and masks themselves, which `segment_prepared` hands to its forward."""
    if isinstance(head, HasSupportState):
        return head.prepare_support(support, support_masks)
    return {_FALLBACK_STATE: (dict(support), support_masks)}


def segment_prepared(head, state: dict, query: Mapping[str, torch.Tensor]) -> HeadOutput:
    """The query segmented with a support state from `prepare_support(head, ...)`: equal to
    head(support, support_masks, query) in evaluation mode."""
    if _FALLBACK_STATE in state:
        support, support_masks = state[_FALLBACK_STATE]
        return head(support, support_masks, query)
    return head.segment(state, query)


def lr_multipliers(head) -> dict[str, float]:
    """The head's {parameter-name fragment: lr factor}; {} for a head without `lr_multipliers`."""
    return {str(k): float(v) for k, v in (head.lr_multipliers if isinstance(head, HasLrMultipliers) else {}).items()}


def branch_counts(head, reset: bool = False) -> dict[str, int]:
    """The head's branch counters; {} for a head without `branch_counts`."""
    return head.branch_counts(reset=reset) if isinstance(head, HasBranchCounts) else {}


def query_maps(head, support_masks: torch.Tensor) -> tuple[str, ...]:
    """The maps the head reads from the query when segmenting with `support_masks` (B x S x H x W), in
    `feature_maps` order; all of `feature_maps` for a head without `query_maps`. A name outside
    `feature_maps` is a TypeError (the encoder would not compute it)."""
    if not isinstance(head, HasQueryMaps):
        return tuple(head.feature_maps)
    wanted = tuple(head.query_maps(support_masks))
    unknown = [m for m in wanted if m not in head.feature_maps]
    if unknown:
        raise TypeError(f"head {type(head).__name__}.query_maps returned {unknown}, which are not in its "
                        f"feature_maps {tuple(head.feature_maps)}; return a subset of feature_maps")
    return tuple(m for m in head.feature_maps if m in wanted)


def takes_query_labels(head) -> bool:
    """Whether the head's forward takes the query labels (training only; see `Head`)."""
    return QUERY_LABELS_ARGUMENT in inspect.signature(type(head).forward).parameters


def constructor_parameters(cls) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def config_options(cls) -> dict:
    """The head's config options with their defaults: its constructor arguments but ENCODER_ARGUMENTS."""
    return {k: p.default for k, p in constructor_parameters(cls).items() if k not in ENCODER_ARGUMENTS}


def check_head_class(cls) -> None:
    """Raise TypeError naming every way the class breaks the contract (see the module docstring)."""
    name = getattr(cls, "__name__", repr(cls))
    problems = []
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        problems.append("it is not a torch.nn.Module subclass")
    maps = getattr(cls, "feature_maps", None)
    if not (isinstance(maps, tuple) and maps and all(isinstance(m, str) for m in maps)):
        problems.append(f"feature_maps must be a non-empty tuple of map names, got {maps!r}")
    forward = getattr(cls, "forward", None)
    if forward is None or forward is nn.Module.forward:
        problems.append("it has no forward")
    else:
        params = [k for k in inspect.signature(forward).parameters if k != "self"]
        if tuple(params[:3]) != FORWARD_ARGUMENTS or any(
                inspect.signature(forward).parameters[k].default is inspect.Parameter.empty for k in params[3:]):
            problems.append(f"forward must take {', '.join(FORWARD_ARGUMENTS)} (further arguments need defaults), "
                            f"got ({', '.join(params)})")
    for key, p in constructor_parameters(cls).items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            problems.append(f"constructor argument *{key} hides the options from the config check; name them")
        elif p.default is inspect.Parameter.empty and key not in ENCODER_ARGUMENTS:
            problems.append(f"constructor option {key!r} has no default (head_options lists defaults)")
    maps_method = getattr(cls, "query_maps", None)
    if maps_method is not None and not (callable(maps_method) and [
            k for k in inspect.signature(maps_method).parameters if k != "self"] == ["support_masks"]):
        problems.append("query_maps must be a method query_maps(support_masks) -> tuple of map names")
    if problems:
        raise TypeError(f"head {name} breaks the head contract (models/heads/contract.py): " + "; ".join(problems))


def check_head(head) -> None:
    """check_head_class on the head's class, plus the types of the optional members it has."""
    check_head_class(type(head))
    problems = []
    if hasattr(head, "lr_multipliers"):
        m = head.lr_multipliers
        if not (isinstance(m, Mapping) and all(isinstance(k, str) and isinstance(v, (int, float))
                                               and not isinstance(v, bool) for k, v in m.items())):
            problems.append(f"lr_multipliers must map parameter-name fragments to numbers, got {m!r}")
    pair = [hasattr(head, m) and callable(getattr(head, m)) for m in ("prepare_support", "segment")]
    if any(pair) and not all(pair):
        problems.append("a head with a support state needs both prepare_support(support, support_masks) and "
                        "segment(state, query)")
    if hasattr(head, "branch_counts") and not callable(head.branch_counts):
        problems.append("branch_counts must be a method branch_counts(reset=False) -> {name: count}")
    if hasattr(head, "query_maps") and not callable(head.query_maps):
        problems.append("query_maps must be a method query_maps(support_masks) -> tuple of map names")
    if problems:
        raise TypeError(f"head {type(head).__name__} breaks the head contract: " + "; ".join(problems))
