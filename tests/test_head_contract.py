"""The head contract (models/heads/contract.py): every registered head keeps it, channels come from the
encoder, and a head that breaks it is refused with a message naming the breach."""
import pytest
import torch
import torch.nn as nn

from configs.experiment import METHOD_DIR, load_yaml, method_defaults, method_names
from models.encoder import ResNetEncoder
from models.engine.builders import build_model
from models.engine.experiment import EncoderConfig
from models.fewshot import FewShotSegmenter
from models.heads import HEADS, build_head, head_class, head_options
from models.heads.common import HeadOutput
from models.heads.contract import (
    ENCODER_ARGUMENTS,
    HasSupportState,
    Head,
    branch_counts,
    check_head,
    check_head_class,
    lr_multipliers,
    prepare_support,
    segment_prepared,
)


def _method_of(head_name: str) -> str:
    """A method whose YAML uses this head (every registered head has one)."""
    for method in method_names():
        if method_defaults(method, "SYNTH")["head"]["name"] == head_name:
            return method
    raise AssertionError(f"no configs/methods/*.yaml uses head {head_name!r}")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_registered_head_keeps_the_contract(name):
    cls = head_class(name)
    check_head_class(cls)
    cfg = method_defaults(_method_of(name), "SYNTH")
    torch.manual_seed(0)
    model = build_model(EncoderConfig.from_config(cfg["encoder"]), cfg["head"], load_weights=False)
    head = model.head
    assert isinstance(head, Head) and isinstance(head, nn.Module)
    check_head(head)
    assert set(head.feature_maps) <= set(model.encoder.output_names)
    assert all(isinstance(v, float) for v in lr_multipliers(head).values())
    # the forward signature with the documented shapes, in training and evaluation
    B, S, Q, H = 2, 1, 2, 64
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, S + Q, 3, H, H, generator=g)
    masks = torch.zeros(B, S, H, H)
    masks[..., 16:48, 20:44] = 1
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            features = model.encode_grouped(images)
        assert set(features) == set(head.feature_maps)
        support = {k: v[:, :S] for k, v in features.items()}
        query = {k: v[:, S:] for k, v in features.items()}
        for k, v in query.items():
            assert v.shape[:2] == (B, Q) and v.shape[2] == model.encoder.channels[k]
        with torch.enable_grad():
            out = head(support, masks, query)
        assert isinstance(out, HeadOutput)
        assert tuple(out.log_probs.shape) == (B, Q, 2, H, H)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.aux_losses.values())
        assert torch.isfinite(out.log_probs).all()
        assert bool(out.aux_losses) == training         # auxiliary losses in training only (all align there)
    _support_state_gives_the_forward_predictions(head, support, masks, query)


def _support_state_gives_the_forward_predictions(head, support, masks, query):
    """Evaluation's support work once (contract: prepare_support / segment): the head's own pair, and
    the state reused over query batches of 1 and 2 gives the log-probabilities of forward, episode
    by episode (B = 1 as the predictor calls it), the random draws included."""
    assert isinstance(head, HasSupportState), f"{type(head).__name__} has no prepare_support/segment pair"
    head.eval()
    for b in range(support[head.feature_maps[0]].shape[0]):
        s = {k: v[b:b + 1] for k, v in support.items()}
        q = {k: v[b:b + 1] for k, v in query.items()}
        _restart_draws(head)
        expected = head(s, masks[b:b + 1], q).log_probs
        _restart_draws(head)
        state = prepare_support(head, s, masks[b:b + 1])
        parts = [segment_prepared(head, state, {k: v[:, i:j] for k, v in q.items()}).log_probs
                 for i, j in ((0, 1), (1, None))]
        torch.testing.assert_close(torch.cat(parts, dim=1), expected, rtol=1e-5, atol=1e-5)


def _restart_draws(head):
    """The same random draws for forward and the pair: torch's generator seeded, and eval mode
    re-entered, which restarts a head's own evaluation stream (RPT's RandomState(fps_seed))."""
    torch.manual_seed(3)
    head.train().eval()


def test_method_yamls_set_only_head_options():
    """No method YAML repeats what the encoder knows (channels) or sets an option the head lacks."""
    for method in method_names():
        head = load_yaml(METHOD_DIR / f"{method}.yaml")["head"]
        options = set(head_options(head["name"]))
        assert set(head) - {"name"} <= options, method
        assert not set(head) & set(ENCODER_ARGUMENTS), method
        for rule in load_yaml(METHOD_DIR / f"{method}.yaml").get("overrides", []):
            assert set(rule.get("set", {}).get("head", {})) <= options, (method, rule)


def test_channels_come_from_the_encoder():
    assert "channels" not in head_options("dspnet")
    assert ResNetEncoder("deeplab_r101").channels == {"out": 256}
    assert ResNetEncoder("qnet_r101").channels == {"layer3": 512, "layer4": 512, "threshold": 1}
    head = build_head("dspnet", channels={"out": 16, "layer3": 512})
    assert head.channels == 16 and head.cal.shape == (16, 16)
    assert not hasattr(build_head("adnet", channels={"out": 256}), "channels")   # heads that do not take it


def test_head_channels_in_a_config():
    """A user's head.channels is refused by the config check; a snapshot's config written before channels came
    from the encoder (DSPNet's head.channels: 256) still builds, unless it contradicts the encoder."""
    from configs.experiment import build_config
    from data.core.io import ConfigError
    with pytest.raises(ConfigError, match="'head.channels' is not a config key: the head gets it from the encoder"):
        build_config("dspnet", "SYNTH", "data/SYNTH", updates={"head.channels": 256})
    cfg = method_defaults("dspnet", "SYNTH")
    cfg["head"]["channels"] = 256
    encoder = EncoderConfig.from_config(cfg["encoder"])
    assert build_model(encoder, cfg["head"], load_weights=False).head.cal.shape == (256, 256)
    cfg["head"]["channels"] = 128
    with pytest.raises(ConfigError, match="head.channels=128 is not a config key"):
        build_model(encoder, cfg["head"], load_weights=False)


def test_optional_members_have_defaults():
    adnet, alp, dsp = build_head("adnet"), build_head("alpnet"), build_head("dspnet", channels=8)
    assert lr_multipliers(adnet) == {} and lr_multipliers(dsp) == {"head.cal": 1e-4}
    assert branch_counts(adnet) == {} and branch_counts(alp) == {}


class _Good(nn.Module):
    feature_maps = ("out",)

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, support, support_masks, query):
        q = query["out"]
        fg = torch.sigmoid(self.scale * q.mean(2))
        p = nn.functional.interpolate(fg, size=support_masks.shape[-2:])
        return HeadOutput(torch.log(torch.stack([1 - p, p], 2).clamp_min(1e-6)))


def test_a_head_that_breaks_the_contract_is_refused():
    check_head(_Good())
    FewShotSegmenter(ResNetEncoder("deeplab_r101"), _Good())

    class NoMaps(_Good):
        feature_maps = "out"

    class WrongForward(_Good):
        def forward(self, features, masks):
            return None

    class NoDefault(_Good):
        def __init__(self, scale):
            super().__init__(scale)

    class BadMultipliers(_Good):
        lr_multipliers = {"head.x": "fast"}

    for cls, message in ((NoMaps, "feature_maps must be a non-empty tuple"),
                         (WrongForward, "forward must take support, support_masks, query"),
                         (NoDefault, "option 'scale' has no default")):
        with pytest.raises(TypeError, match=message):
            check_head_class(cls)
    with pytest.raises(TypeError, match="lr_multipliers must map"):
        FewShotSegmenter(ResNetEncoder("deeplab_r101"), BadMultipliers())
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        check_head_class(object)


def test_query_labels_reach_only_heads_that_take_them_and_only_in_training():
    """The contract's optional `query_labels`: the training step passes the episode's query labels;
    a head without the argument is called as before; evaluation (segment) passes none."""
    seen = []

    class TakesLabels(_Good):
        def forward(self, support, support_masks, query, query_labels=None):
            seen.append(None if query_labels is None else query_labels.clone())
            return super().forward(support, support_masks, query)

    torch.manual_seed(0)
    encoder = ResNetEncoder("deeplab_r101").eval()
    images = torch.randn(1, 2, 3, 32, 32)
    masks, labels = torch.ones(1, 1, 32, 32), torch.randint(0, 2, (1, 1, 32, 32))
    labels[0, 0, 0, 0] = 255
    with torch.no_grad():
        FewShotSegmenter(encoder, TakesLabels())(images[:, :1], masks, images[:, 1:], query_labels=labels)
        FewShotSegmenter(encoder, _Good())(images[:, :1], masks, images[:, 1:], query_labels=labels)   # no error
        model = FewShotSegmenter(encoder, TakesLabels())
        model.segment(model.encode_grouped(images[:, :1]), masks, model.encode_grouped(images[:, 1:]))
    assert len(seen) == 2 and torch.equal(seen[0], labels) and seen[1] is None


@pytest.mark.parametrize("name", sorted(HEADS))
def test_only_layers_feeding_unread_maps_are_frozen(name):
    """A head that reads part of the encoder's maps (RPT, GMRD: Q-Net's layer3 and threshold) leaves
    the other reductions without gradients; they are frozen so DistributedDataParallel does not wait
    for them, and kept in the state dict (reference checkpoints)."""
    cfg = method_defaults(_method_of(name), "SYNTH")
    model = build_model(EncoderConfig.from_config(cfg["encoder"]), cfg["head"], load_weights=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    read = set(model.head.feature_maps)
    map_of = {"qnet_r101": {"layer3": "layer3", "layer4": "layer4"}, "deeplab_r101": {"layer4": "out"}}
    expected = {f"encoder.reduce.{layer}.weight" for layer, name in map_of[model.encoder.layout_name].items()
                if name not in read}
    assert frozen == expected and (expected != set()) == (name in ("rpt", "gmrd"))
    assert all(k in model.state_dict() for k in expected)
