"""Encoders: layouts and shapes, and pretrained loading from torchvision-format files."""
import pytest
import torch

from models.encoder import PRETRAINED_FILES, PretrainedWeightsError, ResNetEncoder
from models.tv import resnet101


@pytest.fixture(scope="module")
def torchvision_state():
    torch.manual_seed(0)
    return resnet101(weights=None).state_dict()


def _write(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_deeplab_layout_shapes():
    enc = ResNetEncoder("deeplab_r101").eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 64, 64))
    assert set(out) == {"out"} and out["out"].shape == (2, 256, 8, 8)   # output stride 8


def test_qnet_layout_shapes_and_threshold_per_image():
    enc = ResNetEncoder("qnet_r101").eval()
    with torch.no_grad():
        out = enc(torch.randn(3, 3, 64, 64))
    assert out["layer3"].shape == (3, 512, 16, 16) and out["layer4"].shape == (3, 512, 8, 8)
    assert out["threshold"].shape == (3, 1)
    assert not torch.allclose(out["threshold"][0], out["threshold"][1])


def test_imagenet_weights_load_from_torch_hub_cache(tmp_path, monkeypatch, torchvision_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _write(tmp_path / "hub" / "checkpoints" / PRETRAINED_FILES["imagenet"], torchvision_state)
    enc = ResNetEncoder("deeplab_r101")
    n = enc.load_pretrained("imagenet")
    assert n == len(enc.backbone.state_dict())   # every trunk tensor
    assert torch.equal(enc.backbone["layer3"][5].conv2.weight, torchvision_state["layer3.5.conv2.weight"])


def test_coco_segmentation_checkpoint_keys_are_mapped(tmp_path, monkeypatch, torchvision_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    coco = {f"backbone.{k}": v for k, v in torchvision_state.items() if not k.startswith("fc.")}
    coco["classifier.4.weight"] = torch.zeros(21, 256, 1, 1)
    _write(tmp_path / "hub" / "checkpoints" / PRETRAINED_FILES["deeplabv3_coco"], coco)
    enc = ResNetEncoder("qnet_r101")
    fc_before = enc.backbone["fc"].weight.clone()
    n = enc.load_pretrained("deeplabv3_coco")
    assert n == len(coco) - 1                       # DeepLab has no fc: Q-Net's fc stays random
    assert torch.equal(enc.backbone["fc"].weight, fc_before)
    assert torch.equal(enc.backbone["conv1"].weight, torchvision_state["conv1.weight"])


def test_missing_pretrained_file_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsError, match=r"resnet101-63fe2227.pth.*hub/checkpoints"):
        ResNetEncoder("deeplab_r101").load_pretrained("imagenet")
    with pytest.raises(PretrainedWeightsError, match="weights file not found"):
        ResNetEncoder("deeplab_r101").load_pretrained(str(tmp_path / "nope.pth"))


def test_zero_matching_keys_is_an_error(tmp_path):
    path = _write(tmp_path / "other.pth", {"encoder.weird.weight": torch.zeros(3)})
    with pytest.raises(PretrainedWeightsError, match="none of its 1 tensors matches"):
        ResNetEncoder("deeplab_r101").load_pretrained(path)


def test_wrong_shapes_and_corrupt_file(tmp_path):
    bad = _write(tmp_path / "bad.pth", {"conv1.weight": torch.zeros(1, 1, 1, 1)})
    with pytest.raises(PretrainedWeightsError, match="wrong shape"):
        ResNetEncoder("deeplab_r101").load_pretrained(bad)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(PretrainedWeightsError, match="cannot read"):
        ResNetEncoder("deeplab_r101").load_pretrained(corrupt)


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown encoder layout"):
        ResNetEncoder("resnet50")


def test_a_run_says_once_which_weights_it_loads(torchvision_state, tmp_path, caplog):
    """The pre-flight check of encoder.weights (on the meta device) and the run's own load: one message."""
    import logging

    from models.engine.builders import check_encoder_weights
    from models.engine.experiment import EncoderConfig
    path = _write(tmp_path / "r101.pth", torchvision_state)
    caplog.set_level(logging.INFO, logger="models.encoder")
    for weights in ("none", str(path)):
        caplog.clear()
        config = EncoderConfig(layout="deeplab_r101", weights=weights, allow_partial=False, bn_statistics="batch")
        check_encoder_weights(config)
        ResNetEncoder(config.layout).load_pretrained(config.weights)
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
        assert len(said) == 1 and ("no pretrained weights" in said[0] or "loaded 624 of 624" in said[0]), said


def _count_calls(modules: dict) -> dict:
    counts = {name: 0 for name in modules}
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def test_the_encoder_computes_only_the_maps_that_are_read():
    """freeze_unread (called by FewShotSegmenter with the head's feature_maps): RPT and GMRD read layer3 and
    the threshold, so the layer4 reduction is not run; a head reading layer3 alone skips layer4 too. The
    maps that are read are unchanged, and every tensor stays in the state dict (reference checkpoints)."""
    torch.manual_seed(0)
    enc = ResNetEncoder("qnet_r101").eval()
    keys = set(enc.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = enc(images)
    counts = _count_calls({"reduce4": enc.reduce["layer4"], "reduce3": enc.reduce["layer3"],
                           "layer4": enc.backbone["layer4"], "threshold": enc.threshold})
    for read, expected in ((("layer3", "threshold"), {"reduce4": 0, "reduce3": 1, "layer4": 1, "threshold": 1}),
                           (("layer3",), {"reduce4": 0, "reduce3": 1, "layer4": 0, "threshold": 0})):
        enc.freeze_unread(read)
        counts.update(dict.fromkeys(counts, 0))
        with torch.no_grad():
            out = enc(images)
        assert set(out) == set(read) and counts == expected, (read, counts)
        for name in read:
            assert torch.equal(out[name], full[name])
        assert set(enc.state_dict()) == keys
    assert not any(p.requires_grad for p in enc.backbone["layer4"].parameters())
    assert all(p.requires_grad for p in enc.backbone["layer3"].parameters())


@pytest.mark.parametrize("method", ["rpt", "gmrd"])
def test_a_model_of_rpt_or_gmrd_never_runs_the_layer4_reduction(method):
    from configs.experiment import method_defaults
    from models.engine.builders import build_model
    from models.engine.experiment import EncoderConfig
    cfg = method_defaults(method, "SYNTH")
    if method == "gmrd":
        cfg["head"].update(image_size=64, resize_grid=False, n_fg=4, n_bg=4)
    model = build_model(EncoderConfig.from_config(cfg["encoder"]), cfg["head"], load_weights=False).eval()
    counts = _count_calls({"reduce4": model.encoder.reduce["layer4"], "layer4": model.encoder.backbone["layer4"]})
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 20:40, 20:40] = 1
    with torch.no_grad():
        out = model(torch.randn(1, 1, 3, 64, 64), masks, torch.randn(1, 1, 3, 64, 64))
    assert out.log_probs.shape == (1, 1, 2, 64, 64)
    assert counts == {"reduce4": 0, "layer4": 1}          # layer4 feeds the threshold both heads read
    assert "encoder.reduce.layer4.weight" in model.state_dict()
