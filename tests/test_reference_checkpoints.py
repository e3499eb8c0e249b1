"""Checkpoints written by the reference Q-Net and ADNet training code load into our models.

The reference state dicts are built here from our own model's weights renamed with the reference
key names (written out below from the reference code, independently of the module's table), so
loading them must reproduce our model's outputs exactly.
"""
import functools

import pytest
import torch
import torch.nn as nn

from models.encoder import ResNetEncoder
from models.engine.checkpoints import CheckpointError, load_state, read_checkpoint
from models.engine.reference_checkpoints import FORMATS, detect_format, load_reference_state
from models.heads import head_module
from models.fewshot import FewShotSegmenter, split_features
from models.heads.adnet import ADNetHead
from models.heads.qnet import QNetHead
from models.tv import import_torchvision

DeepLabHead = import_torchvision().models.segmentation.deeplabv3.DeepLabHead


def _qnet(seed):
    torch.manual_seed(seed)
    return FewShotSegmenter(ResNetEncoder("qnet_r101"), QNetHead(refine_steps=0)).eval()


def _adnet(seed):
    torch.manual_seed(seed)
    model = FewShotSegmenter(ResNetEncoder("deeplab_r101"), ADNetHead()).eval()
    with torch.no_grad():
        model.head.threshold.fill_(-7.25)
    return model


def _as_qnet_reference(state):
    """Our Q-Net state dict under the names of ZJLAB-AMMI/Q-Net's FewShotSeg (models/encoder.py)."""
    rename = {"encoder.reduce.layer3.": "encoder.reduce1.", "encoder.reduce.layer4.": "encoder.reduce2.",
              "encoder.threshold.": "encoder.reduce1d.", "encoder.backbone.": "encoder.backbone."}
    out = {}
    for key, value in state.items():
        prefix = next(p for p in rename if key.startswith(p))
        out[rename[prefix] + key[len(prefix):]] = value.clone()
    return out


def _as_adnet_reference(state):
    """Our ADNet state dict as sha168/ADNet's main_train.py saves it: nn.DataParallel ('module.'),
    encoder = TVDeeplabRes101Encoder (backbone, localconv, dead asppconv/aspp_out), threshold `t` [1]."""
    out = {}
    for key, value in state.items():
        if key == "head.threshold":
            out["module.t"] = value.reshape(1).clone()
        elif key.startswith("encoder.reduce.layer4."):
            out["module.encoder.localconv." + key[len("encoder.reduce.layer4."):]] = value.clone()
        else:
            out["module." + key] = value.clone()
    out.update(_dead_aspp())
    return out


@functools.lru_cache(maxsize=1)
def _dead_aspp():
    """ADNet's unused tensors, named by torchvision's own DeepLabHead (ASPP + 3x3 conv = aspp_out)."""
    torch.manual_seed(5)
    deeplab = DeepLabHead(2048, 21)
    dead = {f"module.encoder.aspp_out.{k}": v for k, v in nn.Sequential(deeplab[0], deeplab[1]).state_dict().items()}
    dead["module.encoder.asppconv.weight"] = torch.randn(256, 256, 1, 1)
    return dead


def _outputs(model):
    """Encoder maps and head log-probs for one fixed 32 x 32 episode (1 support, 2 queries)."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 32, 32, generator=g)
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., 8:24, 10:22] = 1
    with torch.no_grad():
        features = model.encoder(images)
        support, query = split_features({k: features[k] for k in model.head.feature_maps}, 1, 1)
        return features, model.segment(support, masks, query).log_probs


def _scramble(model):
    """Overwrite every weight, so that a load that misses a tensor cannot go unnoticed."""
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.normal_(0.5 if value.dim() == 1 else 0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def qnet_source():
    model = _qnet(0)
    return model, _outputs(model)


@pytest.fixture(scope="module")
def adnet_source():
    model = _adnet(0)
    return model, _outputs(model)


@pytest.fixture(scope="module")
def qnet_target():
    return _qnet(1)


@pytest.fixture(scope="module")
def adnet_target():
    return _adnet(1)


def _assert_same(a, b):
    feats_a, lp_a = a
    feats_b, lp_b = b
    assert feats_a.keys() == feats_b.keys()
    for k in feats_a:
        assert torch.equal(feats_a[k], feats_b[k]), k
    assert torch.equal(lp_a, lp_b)


def test_qnet_reference_checkpoint_reproduces_outputs(tmp_path, qnet_source, qnet_target):
    model, expected = qnet_source
    ref = _as_qnet_reference(model.state_dict())
    assert {"encoder.reduce1.weight", "encoder.reduce2.weight", "encoder.reduce1d.bias",
            "encoder.backbone.fc.weight", "encoder.backbone.layer3.0.conv1.weight"} <= set(ref)
    path = tmp_path / "30000.pth"
    torch.save(ref, path)
    target = _scramble(qnet_target)
    assert not torch.equal(_outputs(target)[0]["threshold"], expected[0]["threshold"])
    load_state(target, read_checkpoint(path)[0], path)   # what open_trained_model does with evaluation.checkpoint
    _assert_same(_outputs(target), expected)


def test_adnet_reference_checkpoint_reproduces_outputs_and_drops_dead_aspp(adnet_source, adnet_target):
    model, expected = adnet_source
    ref = _as_adnet_reference(model.state_dict())
    assert detect_format(ref) == "adnet" and ref["module.t"].shape == (1,)
    target = _scramble(adnet_target)
    report = load_reference_state(target, ref, source="model.pth")
    _assert_same(_outputs(target), expected)
    assert target.head.threshold.item() == -7.25
    assert len(report.ignored) == 38 and "module.encoder.asppconv.weight" in report.ignored
    assert all(k.startswith(("module.encoder.aspp_out.", "module.encoder.asppconv.")) for k in report.ignored)


def test_unknown_and_missing_keys_are_named(qnet_source, adnet_source, qnet_target, adnet_target):
    ref = _as_qnet_reference(qnet_source[0].state_dict())
    extra = dict(ref, **{"encoder.reduce3.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not in the reference key table.*encoder.reduce3.weight"):
        load_reference_state(qnet_target, extra)
    missing = {k: v for k, v in ref.items() if k != "encoder.reduce1d.bias"}
    with pytest.raises(CheckpointError, match="not in the file: encoder.threshold.bias \\(reference name "
                                              "encoder.reduce1d.bias\\)"):
        load_reference_state(qnet_target, missing)
    # an ASPP-like key that is not one of ADNet's dead tensors is not dropped silently
    adnet_ref = _as_adnet_reference(adnet_source[0].state_dict())
    adnet_ref["module.encoder.aspp_out.0.convs.9.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="module.encoder.aspp_out.0.convs.9.0.weight"):
        load_reference_state(adnet_target, adnet_ref)


def test_checkpoint_of_the_other_method_is_refused_with_a_hint(adnet_source, qnet_target):
    adnet_ref = _as_adnet_reference(adnet_source[0].state_dict())
    with pytest.raises(CheckpointError, match="ADNet 2-D.*does not fit this model.*with adnet"):
        load_reference_state(qnet_target, adnet_ref)


def test_our_snapshots_still_load(tmp_path, qnet_source, qnet_target):
    model, expected = qnet_source
    path = tmp_path / "100.pth"
    torch.save({"model": model.state_dict(), "episodes": 100}, path)
    assert detect_format(model.state_dict()) is None
    target = _scramble(qnet_target)
    load_state(target, read_checkpoint(path)[0], path)
    _assert_same(_outputs(target), expected)


def test_each_head_declares_its_own_key_table():
    """The tables live beside their heads (REFERENCE_CHECKPOINT in models/heads/<head>.py); the loader
    finds them through the head registry."""
    assert set(FORMATS) == {"adnet", "gmrd", "qnet", "rpt"}
    for name, fmt in FORMATS.items():
        assert head_module(name).REFERENCE_CHECKPOINT is fmt and fmt.method == name
    assert not hasattr(head_module("alpnet"), "REFERENCE_CHECKPOINT")
    with pytest.raises(CheckpointError, match=r"REFERENCE_CHECKPOINT in models/heads/rpt\.py.*MHA\.w_xx\.weight"):
        load_reference_state(None, {"MHA.w_qs.weight": torch.zeros(1), "MHA.w_xx.weight": torch.zeros(1)}, "rpt")
