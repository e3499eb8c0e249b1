"""ADNet head: the anomaly score, the learned threshold, alignment, and batches of episodes."""
import math

import torch

from models.heads import build_head
from models.heads.adnet import ADNetHead, anomaly_fg_probability


def _features(cos_values, C=4):
    """1 x 1 x C x 1 x n feature map whose cosine to e_0 is each value in cos_values."""
    cols = []
    for c in cos_values:
        v = torch.zeros(C)
        v[0], v[1] = c, math.sqrt(1 - c * c)
        cols.append(v)
    return torch.stack(cols, dim=-1)[None, None, :, None, :]


def test_probability_is_sigmoid_of_half_threshold_plus_ten_cos():
    proto = torch.zeros(1, 4)
    proto[0, 0] = 1.0
    cos = [-0.5, 0.0, 0.3, 0.5, 0.9]
    p = anomaly_fg_probability(_features(cos), proto, torch.tensor(-10.0), 20.0, 0.5)[0, 0, 0]
    expected = torch.sigmoid(0.5 * torch.tensor(-10.0) + 10 * torch.tensor(cos))
    torch.testing.assert_close(p, expected)
    # decision boundary at cos = -T / 20 = 0.5
    assert p[2] < 0.5 and abs(p[3] - 0.5) < 1e-6 and p[4] > 0.5


def test_threshold_broadcasts_per_query_image():
    # one threshold per query image (Q-Net) must not mis-broadcast for N = h (the reference bug)
    torch.manual_seed(0)
    feats = torch.randn(1, 8, 4, 8, 8)
    proto = torch.randn(1, 4)
    t = torch.linspace(-12, -8, 8).view(1, 8, 1, 1)
    p = anomaly_fg_probability(feats, proto, t, 20.0, 0.5)
    for q in range(8):
        single = anomaly_fg_probability(feats[:, q:q + 1], proto, t[:, q:q + 1], 20.0, 0.5)
        torch.testing.assert_close(p[:, q:q + 1], single)


def test_head_outputs_and_losses_in_training():
    torch.manual_seed(0)
    head = build_head("adnet").train()
    fs, fq = torch.randn(2, 1, 8, 4, 4), torch.randn(2, 1, 8, 4, 4)
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:24, 8:24] = 1
    out = head({"out": fs}, masks, {"out": fq})
    assert out.log_probs.shape == (2, 1, 2, 32, 32)
    torch.testing.assert_close(out.log_probs.exp().sum(2), torch.ones(2, 1, 32, 32))
    assert set(out.aux_losses) == {"threshold", "align"}
    torch.testing.assert_close(out.aux_losses["threshold"], torch.tensor(-10.0 / 20))
    head.eval()
    assert head({"out": fs}, masks, {"out": fq}).aux_losses == {}


def test_alignment_is_zero_when_query_prediction_is_empty():
    head = ADNetHead(init_threshold=-30.0).train()   # needs cos > 1.5: nothing is predicted
    fs, fq = torch.randn(1, 1, 8, 4, 4), torch.randn(1, 1, 8, 4, 4)
    out = head({"out": fs}, torch.ones(1, 1, 16, 16), {"out": fq})
    assert out.aux_losses["align"].item() == 0.0


def test_batched_episodes_equal_episodes_one_by_one():
    torch.manual_seed(0)
    head = build_head("adnet").train()
    fs, fq = torch.randn(3, 2, 8, 4, 4), torch.randn(3, 1, 8, 4, 4)
    masks = (torch.rand(3, 2, 16, 16) > 0.5).float()
    batched = head({"out": fs}, masks, {"out": fq})
    singles = [head({"out": fs[b:b + 1]}, masks[b:b + 1], {"out": fq[b:b + 1]}) for b in range(3)]
    torch.testing.assert_close(batched.log_probs, torch.cat([s.log_probs for s in singles]))
    torch.testing.assert_close(batched.aux_losses["align"],
                               torch.stack([s.aux_losses["align"] for s in singles]).mean())


def test_threshold_gets_gradient_from_its_loss():
    head = build_head("adnet").train()
    out = head({"out": torch.randn(1, 1, 8, 4, 4)}, torch.ones(1, 1, 16, 16), {"out": torch.randn(1, 1, 8, 4, 4)})
    out.aux_losses["threshold"].backward()
    torch.testing.assert_close(head.threshold.grad, torch.tensor(1 / 20))


def test_support_state_gives_forward_predictions_for_queries_split_in_two_calls():
    # evaluation's support work once (models/heads/contract.py) on the deeplab_r101 grid: 32 x 32 features
    # of 256 x 256 slices; the queries of each episode in two calls, 1 and 2 slices
    torch.manual_seed(0)
    head = build_head("adnet").eval()
    fs, fq = torch.randn(2, 1, 16, 32, 32), torch.randn(2, 3, 16, 32, 32)
    masks = torch.zeros(2, 1, 256, 256)
    masks[0, :, 64:192, 80:200] = 1
    masks[1, :, 120:130, 120:128] = 1                     # a small support: one prototype all the same
    with torch.no_grad():
        expected = head({"out": fs}, masks, {"out": fq}).log_probs
        state = head.prepare_support({"out": fs}, masks)
        before = state["prototype"].clone()
        parts = [head.segment(state, {"out": fq[:, :1]}), head.segment(state, {"out": fq[:, 1:]})]
        assert torch.equal(head.segment(state, {"out": fq}).log_probs, expected)   # forward runs this pair
    torch.testing.assert_close(torch.cat([p.log_probs for p in parts], dim=1), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(state["prototype"], before) and parts[0].aux_losses == {}
    torch.testing.assert_close(parts[0].extras["threshold"], torch.tensor(-10.0))
