"""DSPNet head: device seed placement, clustering, FSPA, BCMA, `cal` in checkpoints, batching."""
import io

import cv2
import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt, gaussian_filter

from models.heads import build_head, head_options
from models.heads.alp import downsample_masks
from models.heads.dspnet import DSPNetHead, band_matrix, place_seeds


# ----------------------------------------------------------------------------- seeds
def _disk(r, size=256, center=(128, 128)):
    yy, xx = np.mgrid[:size, :size]
    return ((yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= r * r).astype(np.float32)


def _numpy_seeds(mask, stride=8, max_seeds=5, area_unit=100):
    """The §3.1 procedure with OpenCV / SciPy on the host, as the reference runs it."""
    down_h, down_w = (mask.shape[0] - 1) // stride + 1, (mask.shape[1] - 1) // stride + 1
    small = cv2.resize(mask, dsize=(down_w, down_h), interpolation=cv2.INTER_NEAREST)
    seeds = np.zeros((max_seeds, 2), np.int64)
    rows, cols = np.nonzero(small)
    if len(rows) == 0:
        return seeds
    roi = small[rows.min():rows.max() + 1, cols.min():cols.max() + 1].copy()
    n = int(min(np.round((roi == 1).sum() / area_unit), max_seeds))
    if n < 2:
        return seeds
    for i in range(n):
        dist = gaussian_filter(distance_transform_edt(roi), sigma=0.1)
        r, c = np.unravel_index(np.argmax(dist), dist.shape)
        roi[r, c] = 0
        seeds[i] = (r + rows.min(), c + cols.min())
    return seeds


@pytest.mark.parametrize("radius, expected", [(40, 0), (60, 2), (80, 3), (100, 5)])
def test_seed_count_on_disks(radius, expected):
    mask = _disk(radius)
    seeds, placed = place_seeds(torch.from_numpy(mask))
    assert placed.item() == expected
    np.testing.assert_array_equal(seeds.numpy(), _numpy_seeds(mask))
    assert (seeds[expected:] == 0).all()


def test_masks_too_small_for_seeds_and_round_half_even():
    def cells(h, w, extra=0):
        """h x w cells of the 32x32 seed grid, minus one cell (extra=-1) or plus one below (extra=1)."""
        m = torch.zeros(256, 256)
        m[16:16 + 8 * h, 16:16 + 8 * w] = 1
        if extra < 0:
            m[16:24, 16:24] = 0
        elif extra > 0:
            m[16 + 8 * h:24 + 8 * h, 16:24] = 1
        return m
    masks = torch.stack([torch.zeros(256, 256), cells(3, 3), cells(10, 15, -1), cells(15, 10), cells(25, 10),
                         cells(10, 25, 1)])
    seeds, placed = place_seeds(masks)
    # areas 0, 9, 149 -> round(1.49) = 1: no seeds; 150 -> 2; 250 -> round(2.5) = 2 (half to even); 251 -> 3
    assert placed.tolist() == [0, 0, 0, 2, 2, 3]
    assert (seeds[:3] == 0).all()


def test_filled_square_puts_seeds_on_corners():
    mask = np.zeros((256, 256), np.float32)
    mask[64:192, 64:192] = 1                             # rows / cols 8..23 on the seed grid
    seeds, placed = place_seeds(torch.from_numpy(mask))
    assert placed.item() == 3
    assert {tuple(s) for s in seeds[:3].tolist()} == {(23, 23), (8, 8), (8, 23)}
    assert seeds[0].tolist() == [23, 23]                  # SciPy's EDT of a crop without zero cells
    np.testing.assert_array_equal(seeds.numpy(), _numpy_seeds(mask))


def test_seeds_match_the_host_procedure_on_random_shapes_in_a_batch():
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(6):
        m = _disk(rng.uniform(55, 110), center=tuple(rng.integers(90, 170, 2)))
        m[rng.integers(0, 256):, :rng.integers(0, 256)] = 0          # cut a corner off
        masks.append(m)
    seeds, placed = place_seeds(torch.from_numpy(np.stack(masks)).view(3, 2, 256, 256))
    assert seeds.shape == (3, 2, 5, 2) and placed.shape == (3, 2)
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(seeds.view(6, 5, 2)[i].numpy(), _numpy_seeds(m))


def test_seed_grid_must_match_the_features():
    head = DSPNetHead(channels=8)
    with pytest.raises(ValueError, match="seed_stride"):
        head({"out": torch.randn(1, 1, 8, 8, 8)}, torch.ones(1, 1, 128, 128), {"out": torch.randn(1, 1, 8, 8, 8)})


# ----------------------------------------------------------------------------- clustering and FSPA
def _two_region_features(C=4, h=16, w=16, noise=0.01):
    g = torch.Generator().manual_seed(0)
    f = torch.zeros(C, h, w)
    f[0, :, : w // 2] = 30.0                              # left half: feature a, right half: feature b
    f[1, :, w // 2:] = 30.0
    return (f + noise * torch.randn(C, h, w, generator=g))[None, None]


def test_clustering_converges_and_separates_regions():
    f = _two_region_features()
    mask = torch.ones(1, 1, 16, 16)
    seeds = torch.tensor([[[[8, 3], [8, 12]]]])
    centres = {}
    for n in (10, 11, 30):
        centres[n], roi_any = DSPNetHead(channels=4, cluster_iters=n).cluster_centres(f, mask, seeds)
    assert roi_any.item()
    torch.testing.assert_close(centres[10], centres[11], atol=1e-4, rtol=1e-5)   # the centres stopped moving
    torch.testing.assert_close(centres[10], centres[30], atol=1e-4, rtol=1e-5)
    left, right = centres[10][0, 0]
    assert left[0] > 25 and left[1] < 5 and right[1] > 25 and right[0] < 5


def test_clustering_uses_only_cells_where_the_soft_mask_is_exactly_one():
    f = _two_region_features()
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1
    mask[..., :, 8:] = 0.99                               # right half not in the ROI
    c, _ = DSPNetHead(channels=4).cluster_centres(f, mask, torch.tensor([[[[8, 3], [8, 12]]]]))
    assert (c[0, 0, :, 1] < 1).all()                     # both centres end up on the left feature


def test_cross_attention_slip_and_corrected_form():
    g = torch.Generator().manual_seed(0)
    S, Q = torch.randn(1, 1, 3, 5, generator=g), torch.randn(1, 1, 3, 5, generator=g)
    R = torch.einsum("cj,ci->ji", S[0, 0], Q[0, 0]) / (S[0, 0].norm(dim=0)[:, None] * Q[0, 0].norm(dim=0)[None] + 1e-5)
    A = torch.softmax(R, dim=1)                          # support position j over query positions i
    slip = DSPNetHead(channels=3).cross_attention(S, Q)[0, 0, 0]
    torch.testing.assert_close(slip, S[0, 0] + S[0, 0] @ A.T)        # support features, query weights
    fixed = DSPNetHead(channels=3, cross_attention_slip=False).cross_attention(S, Q)[0, 0, 0]
    torch.testing.assert_close(fixed, S[0, 0] + Q[0, 0] @ A.T)


def _masked_mean(features_cn: torch.Tensor, mask_n: torch.Tensor) -> torch.Tensor:
    """C x N features, N-vector mask -> the C-vector masked average with the references' 1e-5 guard."""
    return (features_cn * mask_n).sum(1) / (mask_n.sum() + 1e-5)


def test_fallback_prototype_closed_form():
    head = DSPNetHead(channels=6)
    g = torch.Generator().manual_seed(1)
    fs, fq = torch.randn(1, 1, 6, 8, 8, generator=g), torch.randn(1, 1, 6, 8, 8, generator=g)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 1:7] = 1
    proto, extras = head.foreground_prototypes(fs, m, fq, None, alignment=True)
    assert not extras["fspa_clustered"].any()
    s_hat = head.cross_attention(fs.flatten(3), fq.flatten(3))[0, 0, 0]          # C x N
    mf = m.flatten()
    g0 = _masked_mean(s_hat, mf)
    E = torch.softmax(g0 @ s_hat, dim=0)
    F_map = fs[0, 0].flatten(1) + g0[:, None] * E[None]
    torch.testing.assert_close(proto[0, 0, 0], _masked_mean(F_map, mf))


def test_seeds_without_an_interior_cell_give_the_plain_masked_average():
    # a striped mask: enough foreground cells for seeds, but after bilinear downsampling no cell is
    # fully inside it (m~ == 1 nowhere); the reference's centres are then zero and g = MAP(S, m~)
    head = DSPNetHead(channels=8)
    g = torch.Generator().manual_seed(2)
    fs, fq = torch.randn(1, 1, 8, 32, 32, generator=g), torch.randn(1, 1, 8, 32, 32, generator=g)
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 8:248, 8:248] = 1
    mask[..., :, 3::8] = 0                     # thin stripes through every cell's bilinear sample
    context = head.support_context(mask, (32, 32))
    assert (context[1] > 0).all()             # seeds are placed
    soft = downsample_masks(mask, (32, 32))
    assert not (soft == 1).any()              # ... but the ROI is empty
    proto, extras = head.foreground_prototypes(fs, soft, fq, context, alignment=False)
    assert extras["fspa_roi_empty"].all() and not extras["fspa_clustered"].any()
    torch.testing.assert_close(proto[0, 0, 0], _masked_mean(fs[0, 0].flatten(1), soft.flatten()))


def test_clustering_branch_runs_for_large_supports_and_never_in_alignment():
    head = DSPNetHead(channels=8).train()
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 1, 8, 32, 32, generator=g, requires_grad=True)
    fq = torch.randn(2, 1, 8, 32, 32, generator=g)
    masks = torch.from_numpy(np.stack([_disk(100), _disk(40)]))[:, None]
    out = head({"out": fs}, masks, {"out": fq})
    assert out.extras["fspa_clustered"].tolist() == [[True], [False]]
    assert out.extras["n_seeds"].tolist() == [[5], [0]]
    assert not out.extras["align.fspa_clustered"].any()
    (out.log_probs.sum() + out.aux_losses["align"]).backward()
    assert torch.isfinite(fs.grad).all() and torch.isfinite(head.cal.grad).all() and head.cal.grad.abs().sum() > 0
    counts = head.branch_counts()
    assert counts["train.fspa_clustered"] == 1 and counts["train.align.fspa_clustered"] == 0


# ----------------------------------------------------------------------------- BCMA and cal
def test_band_matrix():
    T = band_matrix(5, 1, 1, 1)
    assert T[0].tolist() == [1, 0, 0, 0, 0] and T[2].tolist() == [0, 1, 1, 1, 0] and T[4].tolist() == [0, 0, 0, 0, 1]
    cal = band_matrix(4, 0.2, 0.8, 0.3)
    assert cal[1].tolist() == pytest.approx([0.2, 0.8, 0.3, 0.0]) and cal[0].tolist() == [1, 0, 0, 0]


def test_bcma_matches_the_closed_form():
    C, alpha, (w1, w2, w3) = 4, 0.3, (0.2, 0.8, 0.25)
    P = torch.tensor([[0.5, -1.0, 0.2], [0.1, 0.3, -0.4], [1.0, 0.0, 0.5], [-0.2, 0.6, 0.1]])   # C x M
    head = DSPNetHead(channels=C, alpha_fg=alpha, alpha_bg=0.2, w=(w1, w2, w3))
    fg, bg = head.refine_cells(P.T[None])
    Sm = torch.softmax(P @ P.T, dim=1)
    expected = torch.zeros_like(P)
    expected[0] = (1 + alpha * Sm[0, 0]) * P[0]
    expected[3] = (1 + alpha * Sm[3, 3]) * P[3]
    for i in (1, 2):
        expected[i] = (w1 * (1 + alpha * Sm[i, i - 1]) * P[i - 1] + w2 * (1 + alpha * Sm[i, i]) * P[i]
                       + w3 * (1 + alpha * Sm[i, i + 1]) * P[i + 1])
    torch.testing.assert_close(fg[0].T, expected)
    expected_bg_0 = (1 + 0.2 * Sm[0, 0]) * P[0]
    torch.testing.assert_close(bg[0].T[0], expected_bg_0)
    with pytest.raises(ValueError, match="head.channels"):
        DSPNetHead(channels=8).refine_cells(P.T[None])


def test_options_and_lr_multiplier():
    opts = head_options("dspnet")
    for key in ("alpha_fg", "alpha_bg", "w", "reset_cal_at_eval", "cross_attention_slip", "window", "val_window"):
        assert key in opts
    assert opts["alpha_bg"] == 0.2 and opts["reset_cal_at_eval"] is True and opts["cross_attention_slip"] is True
    head = build_head("dspnet", channels=16, w=[0.1, 0.9, 0.1])
    assert head.lr_multipliers == {"head.cal": 1e-4}
    torch.testing.assert_close(head.cal.detach(), band_matrix(16, 0.1, 0.9, 0.1))
    with pytest.raises(ValueError, match="three numbers"):
        DSPNetHead(w=(0.1, 0.2))


@pytest.fixture(scope="module")
def dspnet_models():
    from configs.experiment import method_defaults
    from models.engine.builders import build_model
    from models.engine.experiment import EncoderConfig
    cfg = method_defaults("dspnet", "SYNTH")
    cfg["encoder"]["weights"] = "none"
    encoder = EncoderConfig.from_config(cfg["encoder"])
    torch.manual_seed(0)
    return cfg, build_model(encoder, cfg["head"], load_weights=False), build_model(encoder, cfg["head"], load_weights=False)


def test_cal_is_saved_loaded_and_trained_at_a_reduced_lr(dspnet_models):
    from models.engine.checkpoints import load_model_state
    from models.engine.experiment import OptimConfig
    from models.engine.trainer import make_optimizer
    cfg, model, fresh = dspnet_models
    with torch.no_grad():
        model.head.cal.add_(0.01 * torch.randn(256, 256))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "head.cal" in state and "head.cal_init" not in state and "head.band" not in state
    load_model_state(fresh, state)
    assert torch.equal(fresh.head.cal, model.head.cal)
    groups = make_optimizer(model, OptimConfig.from_config(cfg["optim"])).param_groups
    small = [g for g in groups if g["lr_factor"] == 1e-4]
    assert len(small) == 1 and len(small[0]["params"]) == 1 and small[0]["params"][0] is model.head.cal


def test_reset_cal_at_eval_uses_the_initial_band():
    g = torch.Generator().manual_seed(0)
    fs, fq = torch.randn(1, 1, 8, 8, 8, generator=g), torch.randn(1, 1, 8, 8, 8, generator=g)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., :40, :] = 1
    heads = {k: DSPNetHead(channels=8, reset_cal_at_eval=k) for k in (True, False)}
    untouched = DSPNetHead(channels=8)
    for head in heads.values():
        with torch.no_grad():
            head.cal.add_(torch.randn(8, 8, generator=g))
    run = lambda h: h({"out": fs}, masks, {"out": fq}).log_probs   # noqa: E731
    reference = run(untouched.eval())
    assert torch.equal(run(heads[True].eval()), reference)           # the trained cal is ignored
    assert not torch.allclose(run(heads[False].eval()), reference)   # corrected: the trained cal is used
    assert not torch.allclose(run(heads[True].train()), run(untouched.train()))   # training always uses it


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize("training", [True, False])
def test_batch_of_episodes_equals_episodes_one_by_one(training):
    head = DSPNetHead(channels=8).train(training)
    g = torch.Generator().manual_seed(3)
    fs, fq = torch.randn(3, 1, 8, 32, 32, generator=g), torch.randn(3, 2, 8, 32, 32, generator=g)
    masks = torch.from_numpy(np.stack([_disk(100), _disk(60, center=(100, 90)), _disk(30)]))[:, None]
    out = head({"out": fs}, masks, {"out": fq})
    assert out.extras["fspa_clustered"][:, 0].tolist() == [True, True, False]
    singles = [head({"out": fs[b:b + 1]}, masks[b:b + 1], {"out": fq[b:b + 1]}) for b in range(3)]
    torch.testing.assert_close(out.log_probs, torch.cat([s.log_probs for s in singles]), atol=1e-4, rtol=1e-4)
    if training:
        torch.testing.assert_close(out.aux_losses["align"],
                                   torch.stack([s.aux_losses["align"] for s in singles]).mean(), atol=1e-5, rtol=1e-5)
    # queries are independent too (the FSPA prototype depends on the query)
    single_q = head({"out": fs[:1]}, masks[:1], {"out": fq[:1, 1:2]}).log_probs
    torch.testing.assert_close(out.log_probs[:1, 1:2], single_q, atol=1e-4, rtol=1e-4)


def test_masks_are_downsampled_like_alpnet():
    mask = torch.from_numpy(_disk(100))[None, None]
    torch.testing.assert_close(downsample_masks(mask, (32, 32)),
                               torch.nn.functional.interpolate(mask, size=(32, 32), mode="bilinear",
                                                               align_corners=False))


# ----------------------------------------------------------------------------- support state
def test_support_state_gives_forward_predictions_for_queries_split_in_two_calls():
    # evaluation's support work once (models/heads/contract.py) on the deeplab_r101 grid (32 x 32 features of
    # 256 x 256 slices) for FSPA's three support branches: clustered from seeds, no seeds (a small support),
    # seeds placed around an empty ROI (stripes); the FSPA prototype depends on the query, the state must not
    head = DSPNetHead(channels=8).eval()
    g = torch.Generator().manual_seed(4)
    fs, fq = torch.randn(3, 1, 8, 32, 32, generator=g), torch.randn(3, 3, 8, 32, 32, generator=g)
    stripes = torch.zeros(256, 256)
    stripes[8:248, 8:248] = 1
    stripes[:, 3::8] = 0
    masks = torch.stack([torch.from_numpy(_disk(100)), torch.from_numpy(_disk(30)), stripes])[:, None]
    expected = head({"out": fs}, masks, {"out": fq})
    assert expected.extras["fspa_clustered"][:, 0].tolist() == [True, False, False]
    assert expected.extras["n_seeds"][:, 0].tolist() == [5, 0, 5] and expected.extras["fspa_roi_empty"][2, 0]
    for b in range(3):                                    # one episode at a time, as the predictor
        state = head.prepare_support({"out": fs[b:b + 1]}, masks[b:b + 1])
        parts = [head.segment(state, {"out": fq[b:b + 1, i:j]}) for i, j in ((0, 1), (1, 3))]
        torch.testing.assert_close(torch.cat([p.log_probs for p in parts], dim=1), expected.log_probs[b:b + 1],
                                   rtol=1e-5, atol=1e-5)
        for key in ("fspa_clustered", "n_seeds", "fspa_roi_empty"):
            assert parts[0].extras[key].tolist() == expected.extras[key][b:b + 1].tolist()
    # the pair is what forward runs: one call gives forward's numbers exactly, and leaves the state as it was
    state = head.prepare_support({"out": fs}, masks)
    before = {k: v.clone() for k, v in state["foreground"].items() if isinstance(v, torch.Tensor)}
    assert torch.equal(head.segment(state, {"out": fq}).log_probs, expected.log_probs)
    assert all(torch.equal(state["foreground"][k], v) for k, v in before.items())
    # counted per prediction (forward, then two calls for each episode, then one): episode 0 clusters
    counts = head.branch_counts()
    assert counts["eval.episodes"] == 3 + 6 + 3 and counts["eval.fspa_clustered"] == 1 + 2 + 1
