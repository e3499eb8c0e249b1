"""Query maps (models/heads/contract.py `query_maps`): evaluation encodes a query slice with only the maps
the head reads for its support masks (GMRD: layer3 alone unless a support mask is empty), with the
same predictions as encoding every map."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from configs.experiment import method_defaults
from data.core.specs import load_spec
from dataloaders.volumes import VolumeStore
from evaluation.protocol import ProtocolOptions
from models.encoder import ResNetEncoder
from models.engine.builders import build_model
from models.engine.evaluation import Evaluator
from models.engine.experiment import EncoderConfig
from models.engine.predictor import Predictor, ScanImage
from models.heads import build_head
from models.heads.contract import check_head, check_head_class, query_maps
from tests.helpers import write_dataset

H = 32
QNET_CHANNELS = {"layer3": 512, "layer4": 512, "threshold": 1}


class AllMapsPredictor(Predictor):
    """The predictor with the query maps disabled: every query slice encoded with all maps."""

    def query_maps(self, *support_masks):
        return None


def _masks(B=2, S=1, empty=()):
    """B x S x H x W support masks with a square of foreground; the episodes in `empty` have none."""
    masks = torch.zeros(B, S, H, H)
    masks[..., 8:20, 8:20] = 1
    for b in empty:
        masks[b] = 0
    return masks


def _gmrd_model() -> nn.Module:
    cfg = method_defaults("gmrd", "SYNTH")
    cfg["head"].update(image_size=H, resize_grid=False)
    torch.manual_seed(0)
    return build_model(EncoderConfig.from_config(cfg["encoder"]), cfg["head"], load_weights=False).eval()


def _count_layer4_images(encoder: ResNetEncoder) -> list[int]:
    """The number of images of every call of the encoder's layer4, appended as it runs."""
    calls = []
    encoder.backbone["layer4"].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


# ----------------------------------------------------------------------------- the contract
def test_gmrd_reads_the_query_threshold_only_for_an_empty_support():
    head = build_head("gmrd", channels=QNET_CHANNELS, image_size=H).eval()
    assert head.feature_maps == ("layer3", "threshold")
    assert query_maps(head, _masks()) == ("layer3",)
    assert query_maps(head, _masks(S=2, empty=(1,))) == ("layer3", "threshold")
    one_shot_empty = _masks(S=2)
    one_shot_empty[0, 1] = 0                        # one shot of two empty: still the descriptor branch
    assert query_maps(head, one_shot_empty) == ("layer3",)
    assert query_maps(head.train(), _masks()) == ("layer3", "threshold")   # the alignment reads it


def test_a_head_without_query_maps_gets_all_its_maps_and_the_member_is_checked():
    head = build_head("qnet", channels=QNET_CHANNELS)
    assert not hasattr(head, "query_maps")
    assert query_maps(head, _masks(empty=(0,))) == query_maps(head, _masks()) == head.feature_maps
    gmrd = build_head("gmrd", channels=QNET_CHANNELS, image_size=H).eval()
    gmrd.query_maps = lambda support_masks: ("layer4",)
    with pytest.raises(TypeError, match=r"query_maps returned \['layer4'\]"):
        query_maps(gmrd, _masks())
    gmrd.query_maps = ("layer3",)
    with pytest.raises(TypeError, match="query_maps must be a method"):
        check_head(gmrd)

    class WrongSignature(type(gmrd)):
        def query_maps(self, masks, extra):
            return ("layer3",)

    with pytest.raises(TypeError, match="query_maps must be a method"):
        check_head_class(WrongSignature)


# ----------------------------------------------------------------------------- the encoder
def test_the_encoder_computes_only_the_maps_asked_for():
    torch.manual_seed(0)
    encoder = ResNetEncoder("qnet_r101").eval()
    encoder.freeze_unread(("layer3", "threshold"))
    calls = _count_layer4_images(encoder)
    images = torch.randn(2, 3, H, H)
    with torch.no_grad():
        full = encoder(images)
        assert sorted(full) == ["layer3", "threshold"] and calls == [2]
        part = encoder(images, ("layer3",))
    assert list(part) == ["layer3"] and calls == [2]                # layer4 did not run again
    assert torch.equal(part["layer3"], full["layer3"])
    assert encoder.computed_layers(("layer3",))[-1] == "layer3"
    assert encoder.computed_layers()[-1] == encoder.computed_layers(("threshold",))[-1] == "layer4"
    with pytest.raises(ValueError, match=r"\['layer4'\]"):          # its reduction is frozen (unread)
        encoder(images, ("layer4",))


# ----------------------------------------------------------------------------- the predictor
@pytest.mark.parametrize("empty_chunk", [None, 1])
def test_predictions_equal_encoding_all_maps_and_layer4_skips_the_queries(empty_chunk):
    """GMRD through predict_chunks with the query maps and with all maps: the same log-probabilities
    bit for bit. With non-empty supports layer4 runs only for the support slices; a chunk whose
    support mask is empty (the anomaly branch) gets its queries' thresholds."""
    model = _gmrd_model()
    calls = _count_layer4_images(model.encoder)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 6, H, H)).astype(np.float32)
    masks = np.zeros((2, H, H), bool)
    masks[:, 8:20, 8:20] = True
    if empty_chunk is not None:
        masks[empty_chunk] = False
    chunks = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    outputs = []
    for predictor_class in (Predictor, AllMapsPredictor):
        calls.clear()
        predictor = predictor_class(model, batch_size=4)
        torch.manual_seed(1)                        # the same descriptor draws for both
        outputs.append(predictor.predict_chunks(ScanImage("s", images[0]), [1, 3], masks,
                                                ScanImage("q", images[1]), chunks))
        if predictor_class is Predictor:
            assert sum(calls) == (2 if empty_chunk is None else 2 + 6)      # support slices (+ the queries)
    assert sum(calls) == 2 + 6
    for lazy, full in zip(*outputs):
        assert torch.equal(lazy, full)


def test_a_query_slice_lacking_a_map_is_encoded_again():
    model = _gmrd_model()
    calls = _count_layer4_images(model.encoder)
    scan = ScanImage("q", np.random.default_rng(0).normal(size=(4, H, H)).astype(np.float32))
    predictor = Predictor(model, batch_size=4)
    predictor.warm(scan, [0, 1, 2], ("layer3",))
    assert calls == [] and sorted(predictor.features(scan, [0, 1], ("layer3",))) == ["layer3"]
    full = predictor.features(scan, [1, 2, 3])                      # all maps: slices 1-3 again
    assert calls == [3] and sorted(full) == ["layer3", "threshold"]
    reference = AllMapsPredictor(model, batch_size=4).features(scan, [1, 2, 3])
    for name in full:
        assert torch.equal(full[name], reference[name])


def test_the_evaluator_encodes_each_query_slice_once_without_layer4(tmp_path):
    """The evaluator warms the queries of all classes with the union of their query maps: GMRD's
    query slices skip layer4, with the predictions of encoding all maps."""
    root = write_dataset(tmp_path / "toy", ids=tuple(range(1, 12)), n_classes=2)
    spec = load_spec("TOY", root)
    store = VolumeStore(spec, root)
    fold = spec.fold(store.ids, 0)
    model = _gmrd_model()
    calls = _count_layer4_images(model.encoder)
    results = []
    for predictor_class in (Predictor, AllMapsPredictor):
        calls.clear()
        evaluator = Evaluator(model, store, spec, fold, ProtocolOptions(batch_size=4), progress=False)
        evaluator.predictor = predictor_class(model, batch_size=4)
        torch.manual_seed(1)
        results.append(evaluator.run([1, 2]))
        n_support = len({z for shots in results[-1].shot_slices.values() for z in shots[0]})
        if predictor_class is Predictor:
            assert sum(calls) == n_support                            # the support slices only
    assert sum(calls) > n_support
    assert results[0].predictions.keys() == results[1].predictions.keys()
    for key, pred in results[0].predictions.items():
        np.testing.assert_array_equal(pred, results[1].predictions[key])
