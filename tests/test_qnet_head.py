"""Q-Net head: dual-scale fusion, the per-query threshold, alignment, test-time refinement."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder import ResNetEncoder
from models.fewshot import FewShotSegmenter
from models.heads import build_head
from models.heads.adnet import anomaly_fg_probability
from models.heads.common import EPS_FLOAT32
from models.heads.qnet import QNetHead

SIZES = {"layer3": 16, "layer4": 8}    # 64 x 64 images: layer3 at 1/4, layer4 at 1/8


def _episode(B=1, S=1, Q=1, C=32, seed=0, delta=0.1, threshold=-10.0):
    """Features with one organ: the block [H/4, 3H/4) holds the vector v in every query and
    v + delta (+-delta per channel) in every support; elsewhere unit Gaussian noise. The support
    masks lie strictly inside the block, so the support prototype is exactly v + delta."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(C, generator=g)
    d = delta * torch.where(torch.rand(C, generator=g) > 0.5, 1.0, -1.0)

    def maps(n, vec):
        out = {}
        for name, h in SIZES.items():
            f = torch.randn(B, n, C, h, h, generator=g)
            f[..., h // 4:3 * h // 4, h // 4:3 * h // 4] = vec[:, None, None]
            out[name] = f
        return out

    support, query = maps(S, v + d), maps(Q, v)
    support["threshold"] = torch.randn(B, S, 1, generator=g)          # unused by Q-Net
    query["threshold"] = threshold + torch.rand(B, Q, 1, generator=g)
    masks = torch.zeros(B, S, 64, 64)
    masks[..., 20:44, 20:44] = 1.0
    return support, masks, query, v, d


def _fg_prob(out):
    return out.log_probs[:, :, 1].exp()


def test_shapes_ranges_and_extras_at_both_scales():
    support, masks, query, _, _ = _episode(B=2, S=2, Q=3)
    for mode in ("train", "eval"):
        head = getattr(QNetHead(), mode)()
        out = head(support, masks, query)
        assert out.log_probs.shape == (2, 3, 2, 64, 64)
        torch.testing.assert_close(out.log_probs.exp().sum(2), torch.ones(2, 3, 64, 64))
        assert (out.log_probs <= 0).all() and torch.isfinite(out.log_probs).all()
        assert out.extras["threshold"].shape == (2, 3)
        for n in SIZES:
            assert out.extras["support_prototypes"][n].shape == (2, 32)
            assert out.extras["prototypes"][n].shape == (2, 3, 32)
        # the organ block is found, the corners are background
        p = _fg_prob(out)
        assert (p[..., 24:40, 24:40] > 0.5).all() and (p[..., :4, :4] < 0.5).all()


def test_scale_probability_is_adnet_formula_with_the_query_threshold():
    support, masks, query, v, d = _episode(Q=2)
    head = QNetHead(alpha=(1.0, 0.0), refine_steps=0).eval()
    out = head(support, masks, query)
    proto = (v + d)[None] * 576 / (576 + 1e-5)                        # exact masked average (576 px)
    expected = anomaly_fg_probability(query["layer3"], proto, query["threshold"][..., None], 20.0, 0.5)
    up = F.interpolate(expected[0][:, None], size=(64, 64), mode="bilinear", align_corners=True)[:, 0]
    torch.testing.assert_close(_fg_prob(out)[0], up.clamp(EPS_FLOAT32, 1 - EPS_FLOAT32), atol=2e-6, rtol=1e-5)
    # sigma(0.5 T + 10 cos) by hand for one feature vector
    f = query["layer3"][0, 1, :, 0, 0]
    by_hand = torch.sigmoid(0.5 * query["threshold"][0, 1, 0] + 10 * F.cosine_similarity(f, proto[0], dim=0))
    torch.testing.assert_close(expected[0, 1, 0, 0], by_hand)


def test_alpha_fusion_weights_the_layer3_path_first():
    support, masks, query, _, _ = _episode(Q=2, seed=3)
    only = {}
    for alpha in ((1.0, 0.0), (0.0, 1.0), (0.6, 0.4), (3.0, 2.0)):
        only[alpha] = _fg_prob(QNetHead(alpha=alpha, refine_steps=0).eval()(support, masks, query))
    # [1, 0] is the upsampled layer3 path alone (not layer4: the maps differ)
    assert not torch.allclose(only[(1.0, 0.0)], only[(0.0, 1.0)], atol=1e-3)
    mixed = 0.6 * only[(1.0, 0.0)] + 0.4 * only[(0.0, 1.0)]
    torch.testing.assert_close(only[(0.6, 0.4)], mixed, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(only[(3.0, 2.0)], mixed, atol=1e-6, rtol=1e-5)   # normalised by the sum


def test_threshold_is_one_value_per_query_image():
    support, masks, query, _, _ = _episode(Q=1)
    head = QNetHead(refine_steps=0).eval()
    # two identical query images with different thresholds give different predictions
    twice = {k: torch.cat([v, v], dim=1) for k, v in query.items()}
    twice["threshold"] = torch.tensor([[[-12.0], [-4.0]]])
    out = _fg_prob(head(support, masks, twice))
    assert out[0, 1].sum() > out[0, 0].sum()
    for q in range(2):
        single = {k: v[:, q:q + 1] for k, v in twice.items()}
        torch.testing.assert_close(out[:, q:q + 1], _fg_prob(head(support, masks, single)))
    # the reference's N x 1 threshold (no query axis) is refused, not mis-broadcast
    bad = dict(twice, threshold=twice["threshold"].view(2, 1))
    with pytest.raises(ValueError, match="threshold.*expected \\(1, 2, 1\\)"):
        head(support, masks, bad)


def test_alignment_in_training_only_and_no_threshold_loss():
    support, masks, query, _, _ = _episode(B=2, S=2)
    head = build_head("qnet").train()
    out = head(support, masks, query)
    assert set(out.aux_losses) == {"align"} and out.aux_losses["align"].item() > 0
    assert head.eval()(support, masks, query).aux_losses == {}
    assert QNetHead(align=False).train()(support, masks, query).aux_losses == {}
    # nothing predicted (threshold far below): this episode's alignment is skipped
    empty = dict(query, threshold=torch.full_like(query["threshold"], -60.0))
    assert head.train()(support, masks, empty).aux_losses["align"].item() == 0.0


def test_alignment_equals_the_reference_computation():
    """Reference §2.5 (Q-Net): fused full-res query mask, query features upsampled to full res and
    pooled, support predicted with T_q at both scales, fused with alpha, unweighted NLL per shot."""
    support, masks, query, _, _ = _episode(S=2, seed=5)
    masks[0, 1] = 0
    masks[0, 1, 10:30, 30:60] = 1                                    # a second, different shot
    threshold = query["threshold"].clone().requires_grad_(True)
    query = dict(query, threshold=threshold)
    head = QNetHead(alpha=(0.6, 0.4)).train()
    out = head(support, masks, query)

    p = _fg_prob(out)[0, 0]
    qmask = (p > 1 - p).float()
    alpha = torch.tensor([0.6, 0.4])
    expected = 0.0
    for shot in range(2):
        preds = []
        for n in SIZES:
            up = F.interpolate(query[n][0], size=(64, 64), mode="bilinear", align_corners=False)   # 1 x C x H x W
            q_proto = (up * qmask).sum((-2, -1)) / (qmask.sum() + 1e-5)
            cos = F.cosine_similarity(support[n][0, shot][None], q_proto[..., None, None], dim=1)
            pred = 1.0 - torch.sigmoid(0.5 * (-20.0 * cos - threshold[0, 0]))
            preds.append(F.interpolate(pred[None], size=(64, 64), mode="bilinear", align_corners=True)[0])
        fused = (alpha[0] * preds[0] + alpha[1] * preds[1]) / alpha.sum()
        log_prob = torch.log(torch.stack([1 - fused, fused], dim=1).clamp(EPS_FLOAT32, 1 - EPS_FLOAT32))
        expected = expected + nn.NLLLoss()(log_prob, masks[0, shot][None].long()) / 2
    torch.testing.assert_close(out.aux_losses["align"], expected, atol=1e-5, rtol=1e-5)
    # the query threshold is trained through the alignment loss (no threshold loss of its own)
    out.aux_losses["align"].backward()
    assert threshold.grad is not None and threshold.grad.abs().sum() > 0


def test_batched_episodes_equal_episodes_one_by_one():
    support, masks, query, _, _ = _episode(B=3, S=2, Q=2, seed=7)
    masks[1] = 0
    masks[1, :, 8:40, 8:40] = 1
    for mode in ("train", "eval"):
        head = getattr(QNetHead(), mode)()
        batched = head(support, masks, query)
        singles = [head({k: v[b:b + 1] for k, v in support.items()}, masks[b:b + 1],
                        {k: v[b:b + 1] for k, v in query.items()}) for b in range(3)]
        # batched reductions round differently; log(1 - P) near P = 1 magnifies that to ~1e-5
        torch.testing.assert_close(batched.log_probs, torch.cat([s.log_probs for s in singles]),
                                   atol=1e-4, rtol=1e-5)
        if mode == "train":
            torch.testing.assert_close(batched.aux_losses["align"],
                                       torch.stack([s.aux_losses["align"] for s in singles]).mean())


# ----------------------------------------------------------------------------- refinement
def _reference_refine(f, proto, t, n_iters=7, lr=0.01):
    """Reference §2.8 for ONE query slice, written like the released code: global min/max,
    nn.BCELoss(input=original, target=reconstructed), a fresh Adam. f: C x h x w, proto: C."""
    p_ = nn.Parameter(proto.clone())
    opt = torch.optim.Adam([p_], lr=lr)

    def pred():
        return 1.0 - torch.sigmoid(0.5 * (-20.0 * F.cosine_similarity(f, p_[:, None, None], dim=0) - t))

    P = pred().detach()
    for _ in range(n_iters):
        m = torch.stack((1.0 - P, P)).argmax(0).float()
        new = f * (1 - m) + p_[:, None, None] * m
        A = torch.sigmoid((f - f.min()) / (f.max() - f.min()))
        Bt = torch.sigmoid((new - new.min()) / (new.max() - new.min()))
        loss = nn.BCELoss()(A, Bt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        P = pred().detach()
    return p_.detach()


def _varied_slices(Q=5):
    """Query slices with their own feature scales (so a min/max over the whole batch would differ
    from each slice's own) and organ blocks of different sizes."""
    support, masks, query, v, d = _episode(Q=Q, seed=11)
    g = torch.Generator().manual_seed(12)      # not the global generator: the same slices whatever ran before
    for q in range(Q):
        for n, h in SIZES.items():
            query[n][0, q] *= 1.0 + 0.5 * q
            query[n][0, q, :, :, :q] = torch.randn(v.numel(), h, q, generator=g)    # shrink the block from the left
    return support, masks, query


def test_refinement_matches_the_reference_slice_by_slice():
    support, masks, query = _varied_slices()
    out = QNetHead().eval()(support, masks, query)
    for n in SIZES:
        start = out.extras["support_prototypes"][n][0]
        for q in range(5):
            ref = _reference_refine(query[n][0, q], start, query["threshold"][0, q, 0])
            torch.testing.assert_close(out.extras["prototypes"][n][0, q], ref, atol=1e-6, rtol=1e-5)


def test_batched_refinement_equals_one_slice_per_call():
    support, masks, query = _varied_slices()
    head = QNetHead().eval()
    batched = head(support, masks, query)
    for q in range(5):
        single = head(support, masks, {k: v[:, q:q + 1] for k, v in query.items()})
        torch.testing.assert_close(batched.log_probs[:, q:q + 1], single.log_probs)
        for n in SIZES:
            torch.testing.assert_close(batched.extras["prototypes"][n][:, q:q + 1], single.extras["prototypes"][n])


def test_support_state_gives_the_refined_predictions_of_forward_over_split_calls():
    """Evaluation's path (prepare_support once, segment per query batch) with the refinement on: the
    query slices split over two calls give forward's log-probabilities and refined prototypes, every
    slice's refinement starts from the state's prototypes (a second pass gives the same), and the
    state is left as it was."""
    support, masks, query = _varied_slices()
    head = QNetHead().eval()
    assert head.refine_steps > 0
    expected = head(support, masks, query)
    with torch.no_grad():                                  # as the predictor calls it
        state = head.prepare_support(support, masks)
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    calls = [(0, 2), (2, 5)]
    for _ in range(2):
        parts = [head.segment(state, {k: v[:, i:j] for k, v in query.items()}) for i, j in calls]
        torch.testing.assert_close(torch.cat([o.log_probs for o in parts], dim=1), expected.log_probs)
        for n in SIZES:
            torch.testing.assert_close(torch.cat([o.extras["prototypes"][n] for o in parts], dim=1),
                                       expected.extras["prototypes"][n])
            assert not torch.equal(parts[0].extras["prototypes"][n][:, 0], state[f"prototype.{n}"])   # refined
    for k, v in before.items():
        assert torch.equal(state[k], v) if isinstance(v, torch.Tensor) else state[k] == v
    assert not any(v.requires_grad for v in state.values() if isinstance(v, torch.Tensor))


def test_reference_refinement_is_a_uniform_positive_shift():
    support, masks, query, _, _ = _episode(Q=3, C=64, seed=2)
    for steps in (1, 7):
        out = QNetHead(refine_steps=steps, refine_lr=0.01).eval()(support, masks, query)
        for n in SIZES:
            shift = out.extras["prototypes"][n] - out.extras["support_prototypes"][n][:, None]
            # ~ +lr per step in (nearly) every component, whatever the features
            assert (shift - 0.01 * steps).abs().max() < 0.1 * 0.01 * steps, (n, steps, shift)
    # refinement changes the prediction relative to no refinement
    plain = QNetHead(refine_steps=0).eval()(support, masks, query)
    assert not torch.allclose(out.log_probs, plain.log_probs)


def test_reconstruction_loss_pulls_the_prototype_to_the_query_organ():
    support, masks, query, v, d = _episode(Q=2, C=64, seed=4, delta=0.1)
    out = QNetHead(refine_loss="reconstruction").eval()(support, masks, query)
    for n in SIZES:
        shift = out.extras["prototypes"][n][0] - out.extras["support_prototypes"][n][0]   # Q x C
        # the support prototype is v + d and the query organ is v: each component moves against d
        agree = (torch.sign(shift) == -torch.sign(d)).float().mean()
        assert agree > 0.9, (n, agree)
        before = (out.extras["support_prototypes"][n][0] - v).norm()
        assert ((out.extras["prototypes"][n][0] - v).norm(dim=-1) < before).all()


def test_refinement_leaves_features_and_threshold_untouched():
    support, masks, query, _, _ = _episode(Q=2)
    query = {k: v.clone().requires_grad_(True) for k, v in query.items()}
    before = {k: v.detach().clone() for k, v in query.items()}
    head = QNetHead().eval()
    out = head(support, masks, query)
    for k in query:
        assert torch.equal(query[k].detach(), before[k]) and query[k].grad is None
    torch.testing.assert_close(out.extras["threshold"], before["threshold"][..., 0])
    assert not any(True for _ in head.parameters())        # nothing else to change
    with torch.inference_mode():                           # refinement still works in inference mode
        torch.testing.assert_close(head(support, masks, before).log_probs, out.log_probs)


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="alpha must be two"):
        build_head("qnet", alpha=[0.9])
    with pytest.raises(ValueError, match="refine_loss must be one of reference, reconstruction"):
        build_head("qnet", refine_loss="mse")
    with pytest.raises(ValueError, match="has no option.*refine_step \\(did you mean refine_steps"):
        build_head("qnet", refine_step=3)


# ----------------------------------------------------------------------------- with the encoder
@pytest.fixture(scope="module")
def qnet_model():
    torch.manual_seed(0)
    return FewShotSegmenter(ResNetEncoder("qnet_r101"), QNetHead()).eval()


def test_threshold_comes_from_each_query_and_refinement_leaves_the_encoder_alone(qnet_model):
    model = qnet_model
    torch.manual_seed(1)
    support_images = torch.randn(1, 1, 3, 64, 64)
    query_images = torch.stack([torch.randn(3, 64, 64), torch.randn(3, 64, 64) * 3 + 1])[None]
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 16:48, 16:48] = 1
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = model(support_images, masks, query_images)         # grad enabled: features require grad
    t = out.extras["threshold"][0]
    assert t[0] != t[1]                                     # different queries -> different T
    with torch.no_grad():
        direct = model.encoder(query_images[0])["threshold"][:, 0]
    torch.testing.assert_close(t, direct)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


def test_method_config_alpha_per_setting_and_head_from_config():
    from configs.experiment import method_defaults
    s1, s2 = method_defaults("qnet", "CHAOST2", 1), method_defaults("qnet", "CHAOST2", 2)
    assert s1["head"]["alpha"] == [0.9, 0.1] and s2["head"]["alpha"] == [0.6, 0.4]
    assert s1["encoder"] == {**s1["encoder"], "layout": "qnet_r101", "weights": "deeplabv3_coco"}
    assert s1["loss"]["weights"] == {"align": 1.0} and s1["optim"]["lr_step_gamma"] == 0.98
    assert s1["sampler"]["pair_rule"] == "qnet" and s1["train"]["n_steps"] == 30000
    options = {k: v for k, v in s2["head"].items() if k != "name"}
    head = build_head(s2["head"]["name"], **options)
    assert head.alpha == (0.6, 0.4) and head.refine_steps == 7 and head.refine_loss == "reference"


@pytest.mark.parametrize("scale", [0.5, 3.0])      # 3.0: the prototype holds the map's extremes
def test_fast_reference_loss_has_the_full_map_gradient(scale):
    from models.heads.qnet import _ReferenceRefinementLoss, minmax_sigmoid
    torch.manual_seed(0)
    f = torch.randn(3, 6, 5, 5)
    fg = torch.rand(3, 5, 5) > 0.6
    fg[2] = False                                      # a slice without predicted foreground
    slope = torch.logit(minmax_sigmoid(f))
    proto = (torch.randn(3, 6) * scale).requires_grad_(True)
    full = -(minmax_sigmoid(torch.where(fg.unsqueeze(1), proto[:, :, None, None], f)) * slope).mean(dim=(1, 2, 3))
    (g_full,) = torch.autograd.grad(full.sum(), proto)
    fast = _ReferenceRefinementLoss(f, slope)(proto, fg)
    (g_fast,) = torch.autograd.grad(fast.sum(), proto)
    torch.testing.assert_close(g_fast, g_full, rtol=1e-5, atol=1e-7)


def _full_map_loss(f, slope, proto, fg):
    """-mean(minmax_sigmoid(F') logit(A)) per slice, F' built in full: the reference loss up to a constant."""
    from models.heads.qnet import minmax_sigmoid
    return -(minmax_sigmoid(torch.where(fg.unsqueeze(1), proto[:, :, None, None], f)) * slope).mean(dim=(1, 2, 3))


def test_fast_reference_loss_over_changing_foregrounds_and_mixed_slices():
    """The loss object keeps what depends on the foreground between calls: a changed foreground, a
    foreground covering every pixel (no background share) and a batch where only some slices' prototypes
    hold the map's extremes all give the full map's gradient, and a repeated call the same gradient as
    a fresh object (bit for bit)."""
    from models.heads.qnet import _ReferenceRefinementLoss, minmax_sigmoid
    torch.manual_seed(3)
    f = torch.randn(4, 6, 5, 5)
    f[1] *= 10.0                                        # its extremes stay in its background
    slope = torch.logit(minmax_sigmoid(f))
    proto = (torch.randn(4, 6) * 3.0).requires_grad_(True)
    first = torch.rand(4, 5, 5) > 0.6
    second = first.clone()
    second[0] = True                                    # every pixel foreground: no background share
    second[3, 0] = ~second[3, 0]
    cached = _ReferenceRefinementLoss(f, slope)
    for fg in (first, second, second, first):
        (g_cached,) = torch.autograd.grad(cached(proto, fg).sum(), proto)
        (g_fresh,) = torch.autograd.grad(_ReferenceRefinementLoss(f, slope)(proto, fg).sum(), proto)
        (g_full,) = torch.autograd.grad(_full_map_loss(f, slope, proto, fg).sum(), proto)
        assert torch.equal(g_cached, g_fresh)
        torch.testing.assert_close(g_cached, g_full, rtol=1e-5, atol=1e-7)


def test_minmax_sigmoid_from_channel_extremes_is_bit_identical():
    from models.heads.qnet import channel_extremes, minmax_sigmoid
    f = torch.randn(3, 8, 7, 5) * torch.tensor([1.0, 4.0, 0.1])[:, None, None, None]
    assert torch.equal(minmax_sigmoid(f, channel_extremes(f)), minmax_sigmoid(f))
    lo, hi = channel_extremes(f)
    assert torch.equal(lo, f.amin(dim=1)) and torch.equal(hi, f.amax(dim=1))
