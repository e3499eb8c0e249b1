"""RPT head: regions by farthest-point sampling, the BATE block, the losses, the streams of first
centres, and loading the released checkpoints. Expected values are computed here independently
(plain Python loops and the reference's formulas for one episode), on small fixed inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from data.core.errors import CheckpointError
from models.encoder import ResNetEncoder
from models.engine.reference_checkpoints import detect_format, load_reference_state
from models.fewshot import FewShotSegmenter
from models.heads import build_head
from models.heads.common import EPS_FLOAT32
from models.heads.rpt import (
    RPTHead,
    farthest_point_centres,
    feature_grid_mask,
    padded_points,
    region_labels,
    region_prototypes,
    self_selection_bias,
)

C = 16


def _inputs(B=1, S=1, Q=1, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    h = size // 4
    fs = torch.randn(B, S, C, h, h, generator=g)
    fq = torch.randn(B, Q, C, h, h, generator=g)
    fq[..., h // 4:3 * h // 4, h // 4:3 * h // 4] += 2.0       # an organ the support also shows
    fs[..., h // 4:3 * h // 4, h // 4:3 * h // 4] += 2.0
    support = {"layer3": fs, "threshold": torch.randn(B, S, 1, generator=g) - 5}
    query = {"layer3": fq, "threshold": torch.randn(B, Q, 1, generator=g) - 5}
    masks = torch.zeros(B, S, size, size)
    masks[..., 18:46, 17:47] = 1.0
    labels = torch.zeros(B, Q, size, size, dtype=torch.long)
    labels[..., 16:48, 16:48] = 1
    labels[..., 0, :] = 255
    return support, masks, query, labels


def _reference_fps(mask: np.ndarray, fg_num: int, first: int):
    """The reference's compute_multiple_prototypes geometry with plain Python: (points, centres,
    labels) with points (y, x) in row-major order, centres as indices into points."""
    mask = mask.copy()
    if mask.sum() < fg_num:
        mask.reshape(-1)[:fg_num] = True
    pts = [(y, x) for y in range(mask.shape[0]) for x in range(mask.shape[1]) if mask[y, x]]
    centres = [first]
    while len(centres) < fg_num:
        best, best_d = None, -1
        for i, (y, x) in enumerate(pts):
            d = min((y - pts[c][0]) ** 2 + (x - pts[c][1]) ** 2 for c in centres)
            if d > best_d:                                # strict: the first of equal maxima
                best, best_d = i, d
        centres.append(best)
    labels = []
    for y, x in pts:
        d = [(y - pts[c][0]) ** 2 + (x - pts[c][1]) ** 2 for c in centres]
        labels.append(d.index(min(d)))
    return pts, centres, labels


def _grid_index(pts, i, width):
    return pts[i][0] * width + pts[i][1]


@pytest.mark.parametrize("case", ["ring", "small"])
def test_regions_by_farthest_points_match_a_plain_loop(case):
    h = w = 10
    mask = np.zeros((h, w), bool)
    if case == "ring":                        # an L-shaped organ, 5 regions, first centre drawn at 1289
        mask[2:9, 2:4] = True
        mask[7:9, 2:9] = True
        fg_num = 5
    else:                                     # 3 cells < fg_num: padded with the first cells of the grid
        mask[5, 5:8] = True
        fg_num = 12
    points = padded_points(torch.from_numpy(mask).reshape(1, -1), fg_num)
    n = int(points.sum())
    first = int(np.random.RandomState(1289).choice(n))
    pts, ref_centres, ref_labels = _reference_fps(mask, fg_num, first)
    assert n == len(pts)
    centres = farthest_point_centres(points, torch.tensor([first]), w, fg_num)
    assert centres[0].tolist() == [_grid_index(pts, c, w) for c in ref_centres]
    labels = region_labels(points, centres, w)[0]
    flat = [y * w + x for y, x in pts]
    assert labels[flat].tolist() == ref_labels
    assert (labels[[i for i in range(h * w) if i not in flat]] == -1).all()
    # prototype k = mean feature of region k
    feats = torch.randn(1, 3, h * w)
    protos = region_prototypes(feats, labels[None], centres)[0]
    for k in range(fg_num):
        members = [flat[i] for i, lab in enumerate(ref_labels) if lab == k]
        torch.testing.assert_close(protos[k], feats[0][:, members].mean(1))


def test_first_centre_is_the_reference_stream_and_resets_in_eval():
    # numpy's legacy choice(n) is one randint(0, n) draw on the stream
    a, b = np.random.RandomState(1289), np.random.RandomState(1289)
    assert [a.choice(n) for n in (37, 5, 4096, 100)] == [b.randint(0, n) for n in (37, 5, 4096, 100)]
    head = RPTHead(channels=C).eval()
    counts = torch.tensor([300, 120, 999])
    expected = np.random.RandomState(1289)
    assert head.first_centres(counts).tolist() == [expected.choice(n) for n in (300, 120, 999)]
    assert head.first_centres(counts).tolist() == [expected.choice(n) for n in (300, 120, 999)]
    head.eval()                                            # already in eval: the stream goes on
    assert head.first_centres(counts).tolist() == [expected.choice(n) for n in (300, 120, 999)]
    head.train()
    head.eval()                                            # entering eval: a fresh reference model's stream
    fresh = np.random.RandomState(1289)
    assert head.first_centres(counts).tolist() == [fresh.choice(n) for n in (300, 120, 999)]


def test_tiny_grids_give_finite_regions_that_repeat_their_owner():
    """4 cells for 6 regions: the reference's centres repeat and its extra regions are NaN means; here they
    copy the region their centre belongs to."""
    points = torch.ones(1, 4, dtype=torch.bool)
    centres = farthest_point_centres(points, torch.tensor([2]), 2, 6)
    assert centres[0].tolist() == [2, 1, 0, 3, 0, 0]
    labels = region_labels(points, centres, 2)
    feats = torch.randn(1, 5, 4)
    protos = region_prototypes(feats, labels, centres)[0]
    assert torch.isfinite(protos).all()
    torch.testing.assert_close(protos[4], protos[2])
    torch.testing.assert_close(protos[2], feats[0, :, 0])


def test_support_mask_on_the_feature_grid_is_bilinear_then_nonzero():
    mask = torch.zeros(1, 16, 16)
    mask[0, 5, 5] = 1.0              # samples at 4i + 1.5 touch pixels 4i+1 and 4i+2 only
    cells = feature_grid_mask(mask, (4, 4))[0]
    assert cells.nonzero().tolist() == [[1, 1]]
    mask[0, 5, 5], mask[0, 4, 4] = 0.0, 1.0
    assert not feature_grid_mask(mask, (4, 4)).any()


def test_self_selection_mask_of_bate():
    scores = torch.tensor([[1.0, 2.0, 3.0, 10.0], [-3.5, 0.5, 1.0, 2.0]])
    # row 0: floor((1 + 4) / 2) = 2 -> only 1.0 is below; row 1: floor((-3.5 + 0) / 2) = -2 -> only -3.5
    expected = torch.tensor([[-10000.0, 0, 0, 0], [-10000.0, 0, 0, 0]])
    torch.testing.assert_close(self_selection_bias(scores), expected)


def _reference_bate(head, regions, q):
    """BATE for one set with the reference's operations: regions K x C, q 1 x C -> K x C (eval: no dropout)."""
    A = regions @ q.t()
    kc = ((A.min() + A.mean()) / 2).floor()
    A = torch.softmax(A + torch.where(A < kc, -10000.0, 0.0), dim=0)
    x = head.norm(A @ q + regions)
    att, n = head.attention, head.attention.n_heads
    qh, kh, vh = (F.relu(w(x)).view(-1, n, C).permute(1, 0, 2) for w in (att.w_q, att.w_k, att.w_v))
    out = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(C), dim=-1) @ vh       # n x K x C
    out = F.relu(att.fc(out.permute(1, 0, 2).reshape(-1, n * C)))
    x = att.norm(out + x)
    mlp = head.mlp
    return mlp.norm(mlp.fc2(F.gelu(mlp.fc1(x))) + x)


def test_bate_matches_the_reference_operations_per_set():
    torch.manual_seed(0)
    head = RPTHead(channels=C).eval()
    regions, q = torch.randn(3, 7, C), torch.randn(3, C)
    out = head.bate(regions, q)
    for i in range(3):
        torch.testing.assert_close(out[i], _reference_bate(head, regions[i], q[i:i + 1]), atol=1e-5, rtol=1e-5)
    std = head.attention.w_q.weight.std().item()
    assert abs(std - math.sqrt(2 / (2 * C))) < 0.05


def _getpred(head, fts, proto, t):
    """The reference getPred: fts n x C x h x w, proto 1 x C, t scalar."""
    sim = -F.cosine_similarity(fts, proto[..., None, None], dim=1) * head.scaler
    return 1.0 - torch.sigmoid(0.5 * (sim - t))


def _getfeatures(fts, mask):
    """The reference getFeatures: features upsampled to the mask, masked average (1 x C)."""
    fts = F.interpolate(fts, size=mask.shape[-2:], mode="bilinear")
    return (fts * mask[None]).sum(dim=(-2, -1)) / (mask[None].sum(dim=(-2, -1)) + 1e-5)


def _nll(p, label):
    logp = torch.log(torch.clamp(torch.cat([1 - p, p], dim=1), EPS_FLOAT32, 1 - EPS_FLOAT32))
    return F.nll_loss(logp, label[None].long(), ignore_index=255)


def test_losses_of_one_episode_follow_the_reference():
    support, masks, query, labels = _inputs()
    head = RPTHead(channels=C, dropout=0.0).train()
    np.random.seed(3)
    out = head(support, masks, query, query_labels=labels)
    fs, fq = support["layer3"][0], query["layer3"][0]          # 1 x C x h x w
    ts, tq = support["threshold"][0, 0, 0], query["threshold"][0, 0, 0]
    size = masks.shape[-2:]

    def up(p):
        return F.interpolate(p[None], size=size, mode="bilinear", align_corners=True)[0]

    m = masks[0]                                               # 1 x H x W
    fg = _getfeatures(fs, m)
    # periphery: scipy's 3 x 3 binary dilation (cv2.dilate with a 3 x 3 kernel) minus the mask
    dil = torch.from_numpy(ndimage.binary_dilation(m[0].numpy() > 0, np.ones((3, 3))).astype(np.float32))[None]
    pp = up(_getpred(head, fs, _getfeatures(fs, dil), ts)) - up(_getpred(head, fs, fg, ts))
    torch.testing.assert_close(out.aux_losses["periphery"], _nll(pp[None], (dil - m)[0]))
    # align and proto_mse from the argmax of the output
    pred = out.log_probs[0].exp()                              # 1 x 2 x H x W
    pred_mask = (pred.argmax(dim=1) == 1).float()
    assert pred_mask.sum() > 0
    q_proto = _getfeatures(fq, pred_mask)
    align = _nll(up(_getpred(head, fs, q_proto, tq))[None], m[0])
    torch.testing.assert_close(out.aux_losses["align"], align)
    torch.testing.assert_close(out.aux_losses["proto_mse"], F.mse_loss(q_proto, fg))
    # the query's labelled foreground segments the query (255 ignored)
    gt = (labels[0] == 1).float()
    qp = _nll(up(_getpred(head, fq, _getfeatures(fq, gt), tq))[None], labels[0, 0])
    torch.testing.assert_close(out.aux_losses["query_prototype"], qp)


def test_batched_episodes_are_the_mean_of_single_ones():
    support, masks, query, labels = _inputs(B=2, seed=1)
    masks[1, :, 30:, :] = 0.0                                  # the second episode differs
    head = RPTHead(channels=C, dropout=0.0).train()
    np.random.seed(7)
    both = head(support, masks, query, query_labels=labels)
    np.random.seed(7)                                          # the draws go (episode, query, shot) in order
    one = [head({k: v[[b]] for k, v in support.items()}, masks[[b]], {k: v[[b]] for k, v in query.items()},
                query_labels=labels[[b]]) for b in range(2)]
    torch.testing.assert_close(both.log_probs, torch.cat([o.log_probs for o in one]))
    for key in both.aux_losses:
        torch.testing.assert_close(both.aux_losses[key], (one[0].aux_losses[key] + one[1].aux_losses[key]) / 2)


def test_shapes_train_and_eval_and_query_batching_consumes_the_stream_like_single_calls():
    support, masks, query, labels = _inputs(B=2, S=2, Q=3, seed=2)
    head = RPTHead(channels=C)
    out = head(support, masks, query, query_labels=labels)
    assert out.log_probs.shape == (2, 3, 2, 64, 64) and torch.isfinite(out.log_probs).all()
    assert set(out.aux_losses) == {"periphery", "align", "proto_mse", "query_prototype"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.aux_losses.values())
    (out.log_probs[..., 1, :, :].mean() + sum(out.aux_losses.values())).backward()
    assert head.attention.w_q.weight.grad is not None and head.mlp.fc2.weight.grad is not None
    head.eval()
    s1 = {k: v[:1, :1] for k, v in support.items()}
    batched = head(s1, masks[:1, :1], {k: v[:1] for k, v in query.items()})
    assert not batched.aux_losses and batched.log_probs.shape == (1, 3, 2, 64, 64)
    head.train().eval()                                        # the test script's fresh model
    single = [head(s1, masks[:1, :1], {k: v[:1, [q]] for k, v in query.items()}).log_probs for q in range(3)]
    torch.testing.assert_close(batched.log_probs, torch.cat(single, dim=1))
    # the draws matter: a later slice gets other regions than the first (same features, other centre)
    again = head(s1, masks[:1, :1], {k: v[:1, [0]] for k, v in query.items()}).log_probs
    assert not torch.equal(again, single[0])


def test_support_state_gives_the_predictions_of_forward_per_query_batch():
    """Evaluation now prepares the support state once per support slice and mask and segments each query
    batch with it; before, it called forward once per query batch. Every draw of first centres is per
    query image (none per call), so both ways consume the fresh evaluation stream in the same order and
    predict the same, bit for bit, here over two classes' masks and query slices split over two calls;
    the state is left as it was, and the draws differ per query image (regions are not in the state)."""
    support, masks, query, _ = _inputs(Q=5, seed=5)
    other = torch.zeros_like(masks)                            # a second class of the same support slice
    other[..., 30:50, 8:28] = 1.0
    head = RPTHead(channels=C).eval()
    calls = [(0, 2), (2, 5)]

    def batch(i, j):
        return {k: v[:, i:j] for k, v in query.items()}

    before = [head(support, m, batch(i, j)).log_probs for m in (masks, other) for i, j in calls]
    head.train().eval()                                        # a fresh evaluation stream, as before
    after, states = [], []
    for m in (masks, other):
        with torch.no_grad():
            state = head.prepare_support(support, m)
        kept = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        after += [head.segment(state, batch(i, j)).log_probs for i, j in calls]
        for k, v in kept.items():
            assert torch.equal(state[k], v) if isinstance(v, torch.Tensor) else state[k] == v
        assert state["point_counts"].device.type == "cpu"    # the draws need no device sync per batch
        states.append(state)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    head.train().eval()                                        # one call for all five slices: the same draws
    torch.testing.assert_close(head.segment(states[0], query).log_probs, torch.cat(after[:2], dim=1))
    # the same state and slice again later in the stream: other first centres, other regions
    assert not torch.equal(head.segment(states[0], batch(0, 1)).log_probs, after[0][:, :1])


def test_training_draws_resume_from_the_saved_global_streams():
    """Training draws come from NumPy's global RandomState and dropout from torch's CPU generator, both
    saved in the trainer's resume points: restoring them replays the step exactly."""
    support, masks, query, labels = _inputs(seed=4)
    torch.manual_seed(0)
    head = RPTHead(channels=C).train()
    np.random.seed(11)
    head(support, masks, query, query_labels=labels)
    saved = np.random.get_state(), torch.get_rng_state()
    first = head(support, masks, query, query_labels=labels).log_probs
    np.random.set_state(saved[0])
    torch.set_rng_state(saved[1])
    torch.testing.assert_close(head(support, masks, query, query_labels=labels).log_probs, first, rtol=0, atol=0)
    assert not torch.equal(head(support, masks, query, query_labels=labels).log_probs, first)


def test_bad_options_are_refused_with_the_key():
    with pytest.raises(ValueError, match="head.fg_num"):
        build_head("rpt", fg_num=0)
    with pytest.raises(ValueError, match="head.dropout"):
        build_head("rpt", dropout=1.0)
    with pytest.raises(ValueError, match="head.fps_seed"):
        build_head("rpt", fps_seed=-1)
    with pytest.raises(ValueError, match="has no option"):
        build_head("rpt", fgnum=5)


# ----------------------------------------------------------------------------- released checkpoints
REFERENCE_NAMES = {   # our prefix -> YazhouZhu19/RPT's (models/fewshot.py, models/attention.py, models/encoder.py)
    "encoder.backbone.": "encoder.backbone.", "encoder.reduce.layer3.": "encoder.reduce1.",
    "encoder.reduce.layer4.": "encoder.reduce2.", "encoder.threshold.": "encoder.reduce1d.",
    "head.attention.w_q.": "MHA.w_qs.", "head.attention.w_k.": "MHA.w_ks.", "head.attention.w_v.": "MHA.w_vs.",
    "head.attention.fc.": "MHA.fc.", "head.attention.norm.": "MHA.layer_norm.", "head.mlp.fc1.": "MLP.mlp.0.",
    "head.mlp.fc2.": "MLP.mlp.2.", "head.mlp.norm.": "MLP.norm.", "head.norm.": "layer_norm.",
}


def _rpt_model(seed):
    torch.manual_seed(seed)
    return FewShotSegmenter(ResNetEncoder("qnet_r101"), RPTHead()).eval()


def _as_rpt_reference(state):
    out = {}
    for key, value in state.items():
        prefix = next(p for p in REFERENCE_NAMES if key.startswith(p))
        out[REFERENCE_NAMES[prefix] + key[len(prefix):]] = value.clone()
    return out


def test_released_rpt_checkpoint_loads_and_predicts_the_same():
    source = _rpt_model(0)
    reference = _as_rpt_reference(source.state_dict())
    assert detect_format(reference) == "rpt"
    assert detect_format({k: v for k, v in reference.items() if not k.startswith(("MHA.", "MLP.", "layer_"))}) \
        == "qnet"
    target = _rpt_model(1)
    report = load_reference_state(target, reference, source="rpt.pth")
    assert report.format == "rpt" and report.loaded == len(reference) and not report.ignored
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 3, 64, 64, generator=g)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 16:48, 20:44] = 1
    outs = []
    for model in (source, target):
        model.eval()                                           # fresh evaluation stream on both
        with torch.no_grad():
            feats = model.encode_grouped(images)
            outs.append(model.segment({k: v[:, :1] for k, v in feats.items()}, masks,
                                      {k: v[:, 1:] for k, v in feats.items()}).log_probs)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    del reference["MHA.fc.weight"]
    with pytest.raises(CheckpointError, match=r"head\.attention\.fc\.weight \(reference name MHA\.fc\.weight\)"):
        load_reference_state(_rpt_model(2), reference, source="rpt.pth")
