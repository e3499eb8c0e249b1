"""SSL-ALPNet head: mask resizing, local-prototype selection, mode switch, fusion, fallbacks, batching."""
import pytest
import torch
import torch.nn.functional as F

from models.heads import build_head, head_options
from models.heads.alp import ALPNetHead, downsample_masks, grid_cells, mask_cells, safe_normalize, softmax_fusion


def _features(B=1, S=1, C=6, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, C, h, w, generator=g)


def test_registered_with_its_options():
    head = build_head("alpnet")
    assert isinstance(head, ALPNetHead) and head.feature_maps == ("out",)
    opts = head_options("alpnet")
    assert opts["window"] == 4 and opts["val_window"] == 2 and opts["mode_window"] == 4
    assert opts["fg_thresh"] == opts["bg_thresh"] == 0.95 and opts["scaler"] == 20.0
    assert list(head.parameters()) == []
    with pytest.raises(ValueError, match="head.window must be >= 1"):
        ALPNetHead(window=0)


def test_mask_downsample_is_a_2x2_sample_not_the_area():
    # a vertical edge at x = 100 of a 256-wide mask: column 12 samples pixels 99 and 100
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., :100] = 1
    small = downsample_masks(mask, (32, 32))
    assert small[0, 0, 5, 10:15].tolist() == [1.0, 1.0, 0.5, 0.0, 0.0]
    # the area fraction of block 12 (pixels 96..103) would be 0.5 too; block 11 shows the difference
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., :91] = 1       # block 11 covers 88..95: area 3/8, but the 2x2 sample (91, 92) sees nothing
    assert downsample_masks(mask, (32, 32))[0, 0, 0, 11].item() == 0.0


def test_grid_cells_order_and_values():
    f = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(1, 2, 2, 4, 4)   # B=1, S=2, C=2
    cells = grid_cells(f, 2)
    assert cells.shape == (1, 8, 2)                                              # 2 shots x 4 cells
    torch.testing.assert_close(cells[0, 0], f[0, 0, :, :2, :2].mean((-1, -2)))
    torch.testing.assert_close(cells[0, 4], f[0, 1, :, :2, :2].mean((-1, -2)))   # shot-major
    assert mask_cells(torch.ones(1, 2, 4, 4), 2).shape == (1, 8)


def _low_masks(rows_fg, h=8, w=8):
    """Feature-resolution fg mask with rows [0, rows_fg) equal to 1."""
    m = torch.zeros(1, 1, h, w)
    m[..., :rows_fg, :] = 1
    return m


def test_local_prototype_selection_at_both_windows():
    head = ALPNetHead()
    fs, fq = _features(), _features(seed=1)
    m = _low_masks(5)                                    # rows 0..4 foreground on an 8x8 map
    _, ex = head.class_scores(fs, m, 1 - m, fq, window=4)
    # 4x4 windows: the top two are full; the bottom two hold 1/4 fg -> bg mean 0.75, not > 0.95
    assert ex["n_fg_local"].item() == 2 and ex["n_bg_local"].item() == 0 and ex["bg_local_empty"].item()
    _, ex = head.class_scores(fs, m, 1 - m, fq, window=2)
    # 2x2 windows: rows 0-3 give 8 fg cells, rows 4-5 are half and half, rows 6-7 give 4 bg cells
    assert ex["n_fg_local"].item() == 8 and ex["n_bg_local"].item() == 4 and not ex["bg_local_empty"].item()


def test_head_uses_window_4_in_training_and_val_window_at_evaluation():
    head = ALPNetHead(align=False)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., :40, :] = 1                               # 8x downsample: rows 0..4 are 1 (row 4 samples 35, 36)
    sup, qry = {"out": _features()}, {"out": _features(seed=1)}
    train = head.train()(sup, masks, qry).extras
    evals = head.eval()(sup, masks, qry).extras
    assert train["n_fg_local"].item() == 2 and evals["n_fg_local"].item() == 8


def test_mode_switch_uses_greater_or_equal_while_selection_is_strict():
    fs, fq = _features(), _features(seed=1)
    m = torch.zeros(1, 1, 8, 8)
    m[..., :3, :4] = 1                                   # top-left 4x4 window: 12/16 = 0.75
    head = ALPNetHead(fg_thresh=0.75)
    logits, ex = head.class_scores(fs, m, 1 - m, fq, window=4)
    assert ex["fg_grid_mode"].item() and ex["n_fg_local"].item() == 0 and ex["fg_local_empty"].item()
    # 'gridconv+' with no local prototype: the fusion over the single global prototype
    g = (fs[0, 0] * m[0, 0]).sum((-1, -2)) / (m.sum() + 1e-5)
    d = 20 * (safe_normalize(fq[0, 0], 0) * safe_normalize(g, 0)[:, None, None]).sum(0)
    torch.testing.assert_close(logits[0, 0, 1], d)
    # just above the window mean, 'mask' mode: 20 cos(q, g) with eps 1e-4
    logits, ex = ALPNetHead(fg_thresh=0.76).class_scores(fs, m, 1 - m, fq, window=4)
    assert not ex["fg_grid_mode"].item()
    torch.testing.assert_close(logits[0, 0, 1], 20 * F.cosine_similarity(fq[0, 0], g[:, None, None], dim=0, eps=1e-4))


def test_mode_check_window_is_4_even_at_evaluation():
    fs, fq = _features(), _features(seed=1)
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 2:6] = 1                                 # a full 4x4 block that straddles the 4x4 grid
    _, ex = ALPNetHead().class_scores(fs, m, 1 - m, fq, window=2)
    assert ex["n_fg_local"].item() == 4 and not ex["fg_grid_mode"].item()   # 2x2 cells exist, mode is 'mask'


def test_softmax_fusion_against_a_hand_calculation():
    d = torch.tensor([2.0, -1.0, 5.0, 7.0]).view(1, 1, 4, 1, 1)
    valid = torch.tensor([[[True, True, True, False]]])
    score, any_valid = softmax_fusion(d, valid)
    e = [pow(2.718281828459045, v) for v in (2.0, -1.0, 5.0)]
    expected = sum(ei * vi for ei, vi in zip(e, (2.0, -1.0, 5.0))) / sum(e)
    assert any_valid.item() and abs(score.item() - expected) < 1e-5


def test_grid_score_equals_hand_computed_fusion_of_local_and_global_prototypes():
    fs, fq = _features(C=3), _features(C=3, seed=1)
    m = _low_masks(4)                                    # two full 4x4 windows
    logits, ex = ALPNetHead().class_scores(fs, m, 1 - m, fq, window=4)
    assert ex["fg_grid_mode"].item() and ex["n_fg_local"].item() == 2
    protos = [fs[0, 0, :, 0:4, 0:4].mean((-1, -2)), fs[0, 0, :, 0:4, 4:8].mean((-1, -2)),
              (fs[0, 0] * m[0, 0]).sum((-1, -2)) / (m.sum() + 1e-5)]
    y, x = 6, 1
    q = fq[0, 0, :, y, x]
    d = [20 * float(q @ p) / (max(float(q.norm()), 1e-4) * max(float(p.norm()), 1e-4)) for p in protos]
    e = [2.718281828459045 ** v for v in d]
    expected = sum(ei * di for ei, di in zip(e, d)) / sum(e)
    assert abs(logits[0, 0, 1, y, x].item() - expected) < 1e-4
    # background: the two bottom windows only
    bg = [fs[0, 0, :, 4:8, 0:4].mean((-1, -2)), fs[0, 0, :, 4:8, 4:8].mean((-1, -2))]
    d = [20 * float(q @ p) / (float(q.norm()) * float(p.norm())) for p in bg]
    e = [2.718281828459045 ** v for v in d]
    assert abs(logits[0, 0, 0, y, x].item() - sum(a * b for a, b in zip(e, d)) / sum(e)) < 1e-4


def test_scores_lie_in_plus_minus_twenty():
    head = ALPNetHead()
    fs, fq = _features(B=3, C=16) * 50, _features(B=3, C=16, seed=1) * 0.01
    m = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    m[0] = 1.0
    logits, _ = head.class_scores(fs, m, 1 - m, fq, window=2)
    assert logits.abs().max() <= 20.0 + 1e-4 and torch.isfinite(logits).all()


def test_empty_background_set_falls_back_to_the_global_background_prototype():
    head = ALPNetHead()
    fs, fq = _features(), _features(seed=1)
    m = torch.ones(1, 1, 8, 8)
    m[..., ::4, ::4] = 0                                 # background touches every 4x4 window: 1/16 each
    logits, ex = head.class_scores(fs, m, 1 - m, fq, window=4)
    assert ex["bg_local_empty"].item() and ex["n_bg_local"].item() == 0
    g_bg = (fs[0, 0] * (1 - m[0, 0])).sum((-1, -2)) / ((1 - m).sum() + 1e-5)
    torch.testing.assert_close(logits[0, 0, 0], 20 * F.cosine_similarity(fq[0, 0], g_bg[:, None, None], dim=0,
                                                                           eps=1e-4))
    # a wholly foreground support: zero background prototype, zero score, nothing NaN
    logits, ex = head.class_scores(fs, torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), fq, window=4)
    assert ex["bg_local_empty"].item() and torch.equal(logits[0, 0, 0], torch.zeros(8, 8))


def test_empty_prototype_sets_train_without_nan_and_are_counted():
    head = ALPNetHead().train()
    fs = _features(B=2).requires_grad_(True)
    fq = _features(B=2, seed=1).requires_grad_(True)
    masks = torch.ones(2, 1, 64, 64)                     # no background window anywhere
    masks[1] = 0                                         # no foreground at all: 'mask' mode, zero prototype
    out = head({"out": fs}, masks, {"out": fq})
    loss = out.log_probs.sum() + out.aux_losses["align"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(fs.grad).all() and torch.isfinite(fq.grad).all()
    assert out.extras["bg_local_empty"].tolist() == [True, False]
    counts = head.branch_counts()
    assert counts["train.episodes"] == 2 and counts["train.bg_local_empty"] == 1
    assert counts["train.align.episodes"] == 2
    assert head.branch_counts(reset=True) and head.branch_counts() == {}


def test_alignment_loss_swaps_roles_with_argmax_masks():
    head = ALPNetHead().train()
    fs, fq = _features(), _features(seed=1)
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 8:48, 16:60] = 1
    out = head({"out": fs}, masks, {"out": fq})
    low, _ = head.class_scores(fs, downsample_masks(masks, (8, 8)), downsample_masks(1 - masks, (8, 8)), fq, 4)
    pred_fg = (low[:, :, 1] > low[:, :, 0]).float()
    back, _ = head.class_scores(fq, pred_fg, 1 - pred_fg, fs, 4)
    logits = F.interpolate(back[0], size=(64, 64), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(logits, masks[0].long())
    torch.testing.assert_close(out.aux_losses["align"], expected)
    assert head.eval()({"out": fs}, masks, {"out": fq}).aux_losses == {}


def _three_episodes():
    fs, fq = _features(B=3, S=2), _features(B=3, S=3, seed=1)   # 2 shots, 3 queries
    masks = torch.zeros(3, 2, 64, 64)
    masks[0, :, :40] = 1                                  # 'gridconv+'
    masks[1, 0, 10:20, 10:30] = 1                         # 'mask' mode
    masks[2] = 1
    masks[2, :, ::32, ::32] = 0                           # background set empty
    return fs, fq, masks


@pytest.mark.parametrize("training", [True, False])
def test_batch_of_episodes_equals_episodes_one_by_one(training):
    head = ALPNetHead().train(training)
    fs, fq, masks = _three_episodes()
    out = head({"out": fs}, masks, {"out": fq})
    singles = [head({"out": fs[b:b + 1]}, masks[b:b + 1], {"out": fq[b:b + 1]}) for b in range(3)]
    torch.testing.assert_close(out.log_probs, torch.cat([s.log_probs for s in singles]), atol=1e-5, rtol=1e-5)
    assert out.extras["fg_grid_mode"].tolist() == [True, False, True]
    if training:
        torch.testing.assert_close(out.aux_losses["align"],
                                   torch.stack([s.aux_losses["align"] for s in singles]).mean())


def test_queries_in_one_call_equal_queries_one_by_one():
    head = ALPNetHead().eval()
    fs, fq, masks = _three_episodes()
    out = head({"out": fs[:1]}, masks[:1], {"out": fq[:1]}).log_probs
    for q in range(3):
        single = head({"out": fs[:1]}, masks[:1], {"out": fq[:1, q:q + 1]}).log_probs
        torch.testing.assert_close(out[:, q:q + 1], single, atol=1e-5, rtol=1e-5)


def test_log_probs_and_bad_shapes():
    head = ALPNetHead().eval()
    out = head({"out": _features()}, torch.ones(1, 1, 64, 64), {"out": _features(seed=1)})
    assert out.log_probs.shape == (1, 1, 2, 64, 64)
    torch.testing.assert_close(out.log_probs.exp().sum(2), torch.ones(1, 1, 64, 64))
    with pytest.raises(ValueError, match="expected support B x S x C x h x w"):
        head({"out": _features()[0]}, torch.ones(1, 1, 64, 64), {"out": _features()})
    with pytest.raises(ValueError, match="not divisible by the pooling window"):
        ALPNetHead(val_window=3).eval()({"out": _features()}, torch.ones(1, 1, 64, 64), {"out": _features()})


def test_support_state_gives_forward_predictions_for_queries_split_in_two_calls():
    # evaluation's support work once (models/heads/contract.py) on the deeplab_r101 grid (32 x 32 features of
    # 256 x 256 slices, val_window 2), for the three support-dependent branches: 'gridconv+', the 'mask'
    # fallback of a support mask too small for a full 4 x 4 window on the feature grid, an empty background set
    head = ALPNetHead().eval()
    fs, fq = _features(B=3, C=16, h=32, w=32), _features(B=3, S=3, C=16, h=32, w=32, seed=1)
    masks = torch.zeros(3, 1, 256, 256)
    masks[0, :, 40:200, 60:180] = 1
    masks[1, :, 100:120, 100:124] = 1                     # about 3 x 3 feature cells
    masks[2] = 1
    masks[2, :, 3::32, 3::32] = 0                         # seen by the bilinear sample: some background, no cell
    expected = head({"out": fs}, masks, {"out": fq})
    assert expected.extras["fg_grid_mode"].tolist() == [True, False, True]
    assert expected.extras["bg_local_empty"].tolist() == [False, False, True]
    head.branch_counts(reset=True)
    for b in range(3):                                    # one episode at a time, as the predictor
        state = head.prepare_support({"out": fs[b:b + 1]}, masks[b:b + 1])
        parts = [head.segment(state, {"out": fq[b:b + 1, i:j]}) for i, j in ((0, 1), (1, 3))]
        torch.testing.assert_close(torch.cat([p.log_probs for p in parts], dim=1), expected.log_probs[b:b + 1],
                                   rtol=1e-5, atol=1e-5)
        for key in ("fg_grid_mode", "bg_local_empty", "n_fg_local"):
            assert parts[1].extras[key].tolist() == expected.extras[key][b:b + 1].tolist()
        assert all(p.aux_losses == {} for p in parts)
    # the counters count per prediction (every segment call), as forward does; preparing counts nothing
    counts = head.branch_counts()
    assert counts["eval.episodes"] == 6 and counts["eval.fg_grid_mode"] == 4 and counts["eval.bg_local_empty"] == 2
    # the pair is what forward runs: one call gives forward's numbers exactly, and leaves the state as it was
    state = head.prepare_support({"out": fs}, masks)
    before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert torch.equal(head.segment(state, {"out": fq}).log_probs, expected.log_probs)
    assert all(torch.equal(state[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError, match="prepared in evaluation mode"):
        head.train().segment(state, {"out": fq})
