"""The predictor (models/engine/predictor.py): each slice encoded once, batches, the references' loop."""
import numpy as np
import torch

from data.core.io import Geometry
from models.engine.predictor import Predictor, ScanImage, foreground_mask
from models.engine.segmentation import ModelChunkPredictor, PreparedScan
from models.heads.common import HeadOutput, two_class_log_probs


class CountingModel(torch.nn.Module):
    """Foreground where a query pixel is closer to the support's mean foreground intensity than to its
    mean background intensity; records how many slices each encoder call and head call receive."""

    def __init__(self):
        super().__init__()
        self.encoded, self.segmented, self.prepared = [], [], []

    def encode(self, images):                                   # N x 3 x H x W -> {"out": N x 1 x H x W}
        self.encoded.append(images.shape[0])
        return {"out": images[:, :1]}

    def prepare_support(self, support, support_masks):
        self.prepared.append(float(support_masks.sum()))
        s = support["out"][:, :, 0]                                 # 1 x S x H x W
        return {"fg": (s * support_masks).sum() / support_masks.sum(),
                "bg": (s * (1 - support_masks)).sum() / (1 - support_masks).sum()}

    def segment_prepared(self, state, query):
        self.segmented.append(query["out"].shape[1])
        q = query["out"][:, :, 0]                                   # 1 x Q x H x W
        return HeadOutput(two_class_log_probs(((q - state["fg"]).abs() < (q - state["bg"]).abs()).float()))


def _scans(seed=0, z=10, size=16):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, z, size, size)).astype(np.float32)
    masks = np.zeros((z, size, size), bool)
    masks[:, 4:10, 5:12] = True
    images[0][masks] += 5.0
    images[1][:, 3:9, 6:13] += 5.0
    return ScanImage("support", images[0]), masks, ScanImage("query", images[1])


def test_each_slice_is_encoded_once_in_full_batches():
    support, masks, query = _scans()
    model = CountingModel()
    predictor = Predictor(model, batch_size=4)
    predictor.warm(query, [7, 2, 3, 2, 9, 8])           # distinct slices, ascending: [2, 3, 7, 8], [9]
    assert model.encoded == [4, 1]
    chunks = [np.array([2, 3, 4]), np.array([7, 8, 9])]
    predictor.predict_chunks(support, [1, 5], masks[[1, 5]], query, chunks)
    assert model.encoded == [4, 1, 2, 1]                # the two support slices, then query slice 4 only
    assert model.segmented == [3, 3]
    predictor.forget("query")
    predictor.predict_chunks(support, [1], masks[[1]], query, chunks[:1])
    assert model.encoded[4:] == [3]                     # the query was forgotten, the support was not


def test_the_support_work_is_done_once_per_slice_and_mask():
    """prepare_support runs once per (support slice, mask): every later chunk, batch and query scan
    segmented with that slice and mask reuses its state; another mask of the same slice (another
    class) gets its own."""
    support, masks, query = _scans()
    model = CountingModel()
    predictor = Predictor(model, batch_size=2)
    chunks = [np.array([2, 3, 4]), np.array([7, 8, 9])]
    predictor.predict_chunks(support, [1, 5], masks[[1, 5]], query, chunks)
    assert len(model.prepared) == 2 and model.segmented == [2, 1, 2, 1]
    other_query = ScanImage("query 2", query.image[::-1].copy())
    predictor.predict_chunks(support, [1, 5], masks[[1, 5]], other_query, chunks)
    assert len(model.prepared) == 2
    other_class = masks[[1]].copy()
    other_class[:, :, :8] = False
    predictor.predict_chunks(support, [1], other_class, query, chunks[:1])
    assert len(model.prepared) == 3
    predictor.forget("support")
    predictor.predict_chunks(support, [1], masks[[1]], query, chunks[:1])
    assert len(model.prepared) == 4


def test_batches_cache_and_the_references_loop_give_the_same_log_probs():
    support, masks, query = _scans(seed=1)
    chunks = [np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7, 8, 9])]
    results = [Predictor(CountingModel(), batch_size=bs, cache_features=cache)
               .predict_chunks(support, [2, 7], masks[[2, 7]], query, chunks)
               for bs, cache in [(3, True), (1, True), (1, False)]]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.shape == (5, 2, 16, 16)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    truth = np.zeros((10, 16, 16), bool)
    truth[:, 3:9, 6:13] = True
    predicted = torch.cat([foreground_mask(lp) for lp in results[0]]).numpy()
    assert (predicted == truth).mean() > 0.95


def test_segmentation_reuses_the_first_pass_features_and_forgets_the_previous_query():
    support, masks, query = _scans(seed=2)
    model = CountingModel()
    predict = ModelChunkPredictor(Predictor(model, batch_size=16))
    grid = Geometry((1.0, 1.0, 1.0))
    s = PreparedScan("s", None, support.image, grid, masks)
    q = PreparedScan("q", None, query.image, grid, None)
    first = predict(s, [5], q, [np.arange(10)])         # first pass: every query slice
    assert model.encoded == [1, 10] and first[0].shape == (10, 16, 16)
    predict(s, [2, 5, 8], q, [np.arange(0, 3), np.arange(3, 7), np.arange(7, 10)])
    assert model.encoded == [1, 10, 2]                  # the two new support slices only
    predict(s, [5], PreparedScan("q2", None, query.image, grid, None), [np.arange(4)])
    assert model.encoded == [1, 10, 2, 4]
    predict(s, [5], q, [np.arange(3)])                  # q's slices were forgotten when q2 came
    assert model.encoded == [1, 10, 2, 4, 3]
