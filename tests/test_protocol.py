"""Evaluation protocol: support slices, chunks, scored slices, per-patient Dice."""
import numpy as np
import torch

from data.core.specs import load_spec
from evaluation.protocol import (
    EvaluationResult, ProtocolOptions, ScanScore, chunk_of_slices, plan_query, scored_slices, support_slices,
)
from dataloaders.volumes import VolumeStore
from models.engine.evaluation import Evaluator
from models.heads.common import HeadOutput, two_class_log_probs
from tests.helpers import write_dataset


def test_support_percentiles_for_24_slices():
    assert support_slices(np.arange(24), 3) == [4, 12, 20]
    assert support_slices(np.arange(10, 34), 3) == [14, 22, 30]
    assert support_slices(np.arange(7), 1) == [3]


def test_count_chunks_for_22_slices():
    parts = chunk_of_slices(np.arange(22), 3, "count")
    bounds = [int(np.flatnonzero(parts == p)[0]) for p in range(3)] + [22]
    assert bounds == [0, 7, 14, 22]


def test_zrange_chunks_follow_the_organ_extent():
    parts = chunk_of_slices(np.arange(10, 20), 3, "zrange")      # z_min 10, z_max 19, thirds of 3 slices
    assert parts.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert chunk_of_slices(np.array([5]), 3, "zrange").tolist() == [0]


def test_scored_range_fills_gaps():
    assert scored_slices(np.array([3, 4, 7]), "range").tolist() == [3, 4, 5, 6, 7]
    assert scored_slices(np.array([3, 4, 7]), "labelled").tolist() == [3, 4, 7]


def test_query_plan_cuts_the_scored_slices_into_the_chunks_of_each_support_slice():
    plan = plan_query(np.arange(10, 20), 3, "zrange")
    assert plan.parts == (0, 1, 2)
    assert [c.tolist() for c in plan.chunks] == [[10, 11, 12], [13, 14, 15], [16, 17, 18, 19]]
    gappy = plan_query(np.array([0, 1, 9]), 3, "zrange")         # the middle third holds no scored slice
    assert gappy.parts == (0, 2) and [c.tolist() for c in gappy.chunks] == [[0, 1], [9]]
    assert np.concatenate(gappy.chunks).tolist() == gappy.scored.tolist()


def test_dice_is_per_scan_then_mean():
    r = EvaluationResult("X", 0, 9, (1, 2))
    r.scores = [ScanScore(1, "A", 1, tp=10, fp=0, fn=0, n_slices=1),
                ScanScore(1, "A", 2, tp=1, fp=1, fn=2, n_slices=1)]
    assert r.scores[1].dice == 2 / 5 and r.scores[1].iou == 1 / 4
    assert r.class_mean(1) == (1.0 + 0.4) / 2


class OracleModel(torch.nn.Module):
    """Nearest-mean classifier: a query pixel is foreground if its intensity is closer to the
    support's mean foreground intensity than to its mean background intensity."""

    def encode(self, images):
        return {"out": images[:, :1]}

    def prepare_support(self, support, support_masks):
        s = support["out"][:, :, 0]                                 # 1 x S x H x W
        return {"fg": (s * support_masks).sum() / support_masks.sum(),
                "bg": (s * (1 - support_masks)).sum() / (1 - support_masks).sum()}

    def segment_prepared(self, state, query):
        q = query["out"][:, :, 0]                                   # 1 x Q x H x W
        return HeadOutput(two_class_log_probs(((q - state["fg"]).abs() < (q - state["bg"]).abs()).float()))


def test_evaluator_assembles_3d_and_scores_each_query_scan(tmp_path):
    root = write_dataset(tmp_path / "toy", ids=tuple(range(1, 12)), n_classes=1)
    spec = load_spec("TOY", root)
    store = VolumeStore(spec, root)
    fold = spec.fold(store.ids, 0)
    result = Evaluator(OracleModel(), store, spec, fold, ProtocolOptions(batch_size=3), progress=False).run([1])
    assert result.support_id == fold.test_ids[-1] and set(result.query_ids) == set(fold.test_ids[:-1])
    assert len(result.scores) == len(result.query_ids) == 2
    assert result.mean() > 0.95
    for (scan_id, c), pred in result.predictions.items():
        assert pred.shape == store.scan(scan_id).image.shape
        labelled = store.scan(scan_id).slices_with(c)
        outside = np.setdiff1d(np.arange(pred.shape[0]), scored_slices(labelled, "range"))
        assert not pred[outside].any()      # only scored slices are predicted


def test_reference_loop_gives_the_same_predictions(tmp_path):
    root = write_dataset(tmp_path / "toy", ids=tuple(range(1, 12)), n_classes=1)
    spec = load_spec("TOY", root)
    store = VolumeStore(spec, root)
    fold = spec.fold(store.ids, 1)
    fast = Evaluator(OracleModel(), store, spec, fold, ProtocolOptions(batch_size=4), progress=False).run([1])
    slow = Evaluator(OracleModel(), store, spec, fold, ProtocolOptions(batch_size=1, cache_features=False),
                     progress=False).run([1])
    assert fast.support_slices == slow.support_slices
    for key, pred in fast.predictions.items():
        np.testing.assert_array_equal(pred, slow.predictions[key])


class ShotCountingOracle(OracleModel):
    """The oracle, recording how many shots each support state is prepared from."""

    def __init__(self):
        super().__init__()
        self.shots = []

    def prepare_support(self, support, support_masks):
        self.shots.append(support_masks.shape[1])                   # 1 x S x H x W
        return super().prepare_support(support, support_masks)


def test_k_shot_takes_the_scans_after_the_support_outside_the_fold_and_keeps_the_queries(tmp_path):
    from evaluation.protocol import support_scans
    from models.engine.predictor import Predictor, ScanImage
    root = write_dataset(tmp_path / "toy", ids=tuple(range(1, 12)), n_classes=1)
    spec = load_spec("TOY", root)
    store = VolumeStore(spec, root)
    fold = spec.fold(store.ids, 0)                                  # test block (1, 2, 3): support 3, queries 1, 2
    one_model, three_model = ShotCountingOracle(), ShotCountingOracle()
    one = Evaluator(one_model, store, spec, fold, ProtocolOptions(batch_size=2), progress=False).run([1])
    three = Evaluator(three_model, store, spec, fold, ProtocolOptions(batch_size=2, n_shot=3), progress=False).run([1])
    assert one.support_ids == (3,) and three.support_ids == (3, 4, 5) == support_scans(fold, -1, 3)
    assert three.query_ids == one.query_ids == (1, 2) and three.support_id == 3
    assert set(one_model.shots) == {1} and set(three_model.shots) == {3}
    assert [len(zs) for zs in three.shot_slices[1]] == [3, 3, 3] and three.shot_slices[1][0] == one.support_slices[1]
    assert three.mean() > 0.95
    # 1-shot is the 1-shot predictor's loop, prediction for prediction
    predictor, support = Predictor(OracleModel(), batch_size=2), store.scan(3)
    for scan_id in one.query_ids:
        scan = store.scan(scan_id)
        plan = plan_query(scored_slices(scan.slices_with(1), "range"), 3, "zrange")
        zs = [one.support_slices[1][p] for p in plan.parts]
        expected = np.zeros(scan.image.shape, np.uint8)
        for chunk, lp in zip(plan.chunks, predictor.predict_chunks(ScanImage("s", support.image), zs,
                                                                   support.label[zs] == 1,
                                                                   ScanImage(scan_id, scan.image), plan.chunks)):
            expected[chunk] = (lp[:, 1] > lp[:, 0]).numpy()
        np.testing.assert_array_equal(one.predictions[(scan_id, 1)], expected)
    # the references' uncached loop gives the K-shot predictions too
    slow = Evaluator(OracleModel(), store, spec, fold, ProtocolOptions(batch_size=1, n_shot=3, cache_features=False),
                     progress=False).run([1])
    for key, pred in three.predictions.items():
        np.testing.assert_array_equal(pred, slow.predictions[key])
