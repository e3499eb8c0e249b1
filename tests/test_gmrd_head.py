"""GMRD head: descriptor counts, edge masks (against OpenCV and a loop), the random fill, the MLP on the
filled map, the decoder, the empty-support branch, the alignment loss, shapes, the image-size error and
the reference checkpoint key map. Small inputs (32 x 32 images, 8 x 8 features)."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.experiment import method_defaults
from data.core.errors import CheckpointError
from models.engine.builders import build_model
from models.engine.experiment import EncoderConfig
from models.engine.reference_checkpoints import FORMATS, load_reference_state
from models.heads.common import EPS_FLOAT32, dilate, erode, float32_head_region
from models.heads.gmrd import (
    AffinityDecoder,
    GMRDHead,
    GridUpsampling,
    edge_masks,
    fill_basis,
    fill_sources,
    filled_linear,
)

H, h = 32, 8


def _episode(B=1, S=1, Q=1, C=8, seed=0, empty=()):
    g = torch.Generator().manual_seed(seed)
    support = {"layer3": torch.randn(B, S, C, h, h, generator=g), "threshold": torch.randn(B, S, 1, generator=g)}
    query = {"layer3": torch.randn(B, Q, C, h, h, generator=g), "threshold": torch.randn(B, Q, 1, generator=g)}
    masks = torch.zeros(B, S, H, H)
    masks[..., 8:22, 10:26] = 1.0
    for b in empty:
        masks[b] = 0.0
    return support, masks, query


# ----------------------------------------------------------------------------- masks
def _window_extreme(mask: np.ndarray, reduce, iterations=2) -> np.ndarray:
    """3 x 3 min/max with the window clipped to the image (OpenCV's default border), by loops."""
    out = mask.copy()
    for _ in range(iterations):
        prev = out.copy()
        for y in range(mask.shape[0]):
            for x in range(mask.shape[1]):
                out[y, x] = reduce(prev[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2])
    return out


def test_erosion_dilation_and_edges_match_opencv_and_a_loop():
    m = np.zeros((12, 14), np.float32)
    m[0:7, 0:9] = 1          # touches the top and left borders: the border must not erode it
    m[9:12, 10:14] = 1       # a 3-row block in the bottom-right corner
    m[3, 11] = 1             # a single pixel
    kernel = np.ones((3, 3), np.uint8)
    t = torch.from_numpy(m)
    for ours, cv, loop in ((erode(t, 2).numpy(), cv2.erode(m, kernel, iterations=2), _window_extreme(m, np.min)),
                           (dilate(t, 2).numpy(), cv2.dilate(m, kernel, iterations=2), _window_extreme(m, np.max))):
        np.testing.assert_array_equal(ours, cv)
        np.testing.assert_array_equal(ours, loop)
    fg, bg = edge_masks(t, "reference")
    np.testing.assert_array_equal(fg.numpy(), m - cv2.erode(m, kernel, iterations=2))
    np.testing.assert_array_equal(bg.numpy(), cv2.dilate(1 - m, kernel, iterations=2) - m)
    # the released "outer edge": 1 on all background, 0 on the inner ring, -1 deeper inside
    assert set(np.unique(bg.numpy())) == {-1.0, 0.0, 1.0}
    assert (bg.numpy()[m == 0] == 1).all() and bg.numpy()[0, 0] == -1 and bg.numpy()[5, 7] == 0
    _, outer = edge_masks(t, "outer")
    np.testing.assert_array_equal(outer.numpy(), cv2.dilate(m, kernel, iterations=2) - m)


# ----------------------------------------------------------------------------- random fill
def _reference_fill(region: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """get_fg_fts/get_random_pts by the reference's steps, with `perm` (the region pixels in random
    order) standing for random.sample: the source pixel of every pixel (-1: zero fill)."""
    src = np.flatnonzero(region == 1)
    n_fill = region.size - len(src)
    if len(src) >= n_fill:
        picked = perm[:n_fill]
    elif len(src) == 0:
        picked = np.full(n_fill, -1)
    else:
        r, rem = n_fill // len(src), n_fill % len(src)
        picked = np.concatenate([perm[:rem]] + [src] * r)
    out = np.arange(region.size)
    out[region != 1] = picked
    return out


@pytest.mark.parametrize("n_region", [40, 20, 7, 1, 0])
def test_random_fill_uses_only_region_features_and_keeps_them(n_region):
    g = torch.Generator().manual_seed(n_region)
    P = 64
    region = torch.zeros(P)
    region[torch.randperm(P, generator=g)[:n_region]] = 1
    keys = torch.rand(1, P, dtype=torch.float64, generator=g)
    index, nonempty = fill_sources(region[None], keys)
    index = index[0].numpy()
    src = np.flatnonzero(region.numpy() == 1)
    assert bool(nonempty) == (n_region > 0)
    np.testing.assert_array_equal(index[src], src)                    # region pixels keep their own feature
    if n_region:
        assert set(index.tolist()) <= set(src.tolist())               # fills come from the region only
        perm = src[np.argsort(keys[0].numpy()[src], kind="stable")]
        np.testing.assert_array_equal(index, _reference_fill(region.numpy(), perm))
        filled = index[region.numpy() != 1]
        if n_region >= P - n_region:
            assert len(set(filled.tolist())) == len(filled)            # without replacement
        else:                                                          # each source r or r + 1 times
            counts = np.bincount(filled, minlength=P)[src]
            assert set(counts.tolist()) <= {(P - n_region) // n_region, (P - n_region) // n_region + 1}


# ----------------------------------------------------------------------------- descriptors
def test_descriptors_are_the_mlp_of_the_filled_map_plus_two_prototypes():
    """Eval mode (no dropout): the descriptors equal the reference's steps done directly: features
    upsampled with F.interpolate, the filled map built pixel by pixel, the MLP's two Linear layers."""
    head = GMRDHead(image_size=H, n_fg=5, n_bg=7).eval()
    support, masks, _ = _episode(C=4)
    torch.manual_seed(3)
    fg, bg = head.class_descriptors(support["layer3"], masks, draws=1)
    assert fg.shape == (1, 1, 7, 4) and bg.shape == (1, 1, 9, 4)
    torch.manual_seed(3)
    keys = torch.rand(1, 1, 1, H * H, dtype=torch.float64)            # the head's first draw (foreground)
    up = F.interpolate(support["layer3"][0], size=(H, H), mode="bilinear", align_corners=True)[0].flatten(1)
    m = masks[0, 0].flatten()
    index, _ = fill_sources(m[None], keys.view(1, -1))
    filled = torch.stack([up[:, int(index[0, x])] for x in range(H * H)], dim=1)          # C x P
    mlp = head.fg_mlp
    expected = (filled @ mlp.spatial.weight.T + mlp.spatial.bias) @ mlp.mix.weight.T + mlp.mix.bias   # C x K
    torch.testing.assert_close(fg[0, 0, :5], expected.T, rtol=1e-5, atol=1e-5)
    plain = (up * m).sum(1) / (m.sum() + 1e-5)
    ring = m - torch.from_numpy(cv2.erode(masks[0, 0].numpy(), np.ones((3, 3), np.uint8), iterations=2)).flatten()
    torch.testing.assert_close(fg[0, 0, 5], plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fg[0, 0, 6], (up * ring).sum(1) / (ring.sum() + 1e-5), rtol=1e-5, atol=1e-6)


def test_decoder_on_a_hand_made_case():
    dec = AffinityDecoder(2, dropout=0.5).eval()
    with torch.no_grad():
        for conv in (dec.reduce, dec.res1, dec.res2, dec.hidden, dec.logit):
            conv.weight.zero_()
        dec.reduce.weight[0, :, 0, 0] = 1.0              # channel 0 = relu(sum of the 4 maps)
        dec.res1.weight[1, 0, 1, 1] = 1.0                # residual: channel 1 += relu(3 relu(x0))
        dec.res2.weight[1, 1, 1, 1] = 3.0
        dec.hidden.weight[0, 0, 1, 1] = 1.0              # hidden 0 = relu(x0), hidden 1 = relu(x1)
        dec.hidden.weight[1, 1, 1, 1] = 1.0
        dec.logit.weight[0, :2, 0, 0] = torch.tensor([2.0, -1.0])
    maps = torch.randn(3, 4, 5, 5)
    s = maps.sum(1).relu()
    torch.testing.assert_close(dec(maps), 2 * s - 3 * s, rtol=1e-6, atol=1e-6)
    # training: Dropout2d zeroes whole channels, drawn from the CPU generator, and rescales by 1 / (1 - p)
    dec.train()
    torch.manual_seed(5)
    out = dec(maps)
    torch.manual_seed(5)
    keep = (torch.rand(3, 100, 1, 1) >= 0.5).float()[:, :2, 0, 0] * 2.0
    torch.testing.assert_close(out, (2 * keep[:, :1, None] - 3 * keep[:, 1:, None]) * s, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- forward
def test_shapes_counts_and_branches_for_several_episodes_shots_and_queries():
    support, masks, query = _episode(B=2, S=2, Q=3, empty=(1,))
    head = GMRDHead(image_size=H)
    for training in (True, False):
        head.train(training)
        out = head(support, masks, query)
        assert out.log_probs.shape == (2, 3, 2, H, H) and torch.isfinite(out.log_probs).all()
        assert out.extras["n_descriptors"] == (102, 602)
        assert out.extras["empty_support"].tolist() == [False, True]
        assert set(out.aux_losses) == ({"align"} if training else set())
        probs = out.log_probs.exp()
        assert torch.all(probs.sum(2) < 1 + 1e-5) and torch.all(probs.sum(2) > 1 - 1e-5)
    fg, bg = head.class_descriptors(support["layer3"], masks, draws=3)
    assert fg.shape == (2, 3, 102, 8) and bg.shape == (2, 3, 602, 8)
    counts = head.branch_counts(reset=True)
    assert counts["train.episodes"] == 2 and counts["train.empty_support"] == 1
    assert counts["eval.episodes"] == 2 and counts["eval.empty_support"] == 1 and head.branch_counts() == {}


def test_empty_support_takes_the_anomaly_branch():
    """All shots empty: the prototype is zero, so P = sigmoid(kappa T_q) on every pixel of each query."""
    support, masks, query = _episode(B=2, S=2, Q=2, empty=(0,))
    head = GMRDHead(image_size=H).eval()
    p = head(support, masks, query).log_probs[0, :, 1].exp()
    expected = torch.sigmoid(0.5 * query["threshold"][0, :, 0]).clamp(EPS_FLOAT32, 1 - EPS_FLOAT32)
    torch.testing.assert_close(p, expected[:, None, None].expand_as(p))


def test_alignment_loss_on_a_hand_made_case():
    """Empty support, T_q > 0: the query is predicted foreground everywhere, the query prototype is the
    query's (constant) feature v, and each support pixel x gets P = 1 - sigmoid(0.5 (-20 cos(f_x, v) - T)),
    scored against the all-background support mask. With T_q < 0 nothing is predicted: the loss is 0."""
    C, T = 3, 2.0
    v = torch.tensor([1.0, 0.0, 0.0])
    query = {"layer3": v.view(1, 1, C, 1, 1).expand(1, 1, C, h, h).clone(), "threshold": torch.full((1, 1, 1), T)}
    fs = torch.zeros(1, 1, C, h, h)
    fs[..., 0, :, :] = 1.0                               # left half parallel to v (cos 1), right half cos 0
    fs[..., 1, :, h // 2:] = 1.0
    fs[..., 0, :, h // 2:] = 0.0
    support = {"layer3": fs, "threshold": torch.zeros(1, 1, 1)}
    masks = torch.zeros(1, 1, H, H)
    head = GMRDHead(image_size=H).train()
    out = head(support, masks, query)
    p_low = 1 - torch.sigmoid(0.5 * (-20 * F.cosine_similarity(fs[0], v.view(1, C, 1, 1), dim=1) - T))
    p = F.interpolate(p_low[None], size=(H, H), mode="bilinear", align_corners=True)[0, 0]
    expected = -torch.log((1 - p).clamp(EPS_FLOAT32, 1 - EPS_FLOAT32)).mean()
    torch.testing.assert_close(out.aux_losses["align"], expected, rtol=1e-5, atol=1e-6)
    query["threshold"] = torch.full((1, 1, 1), -T)
    out = head(support, masks, query)
    assert out.aux_losses["align"].item() == 0.0 and out.extras["align_no_query_fg"].tolist() == [True]


def test_image_size_is_checked_and_resize_grid_accepts_other_sizes():
    support, masks, query = _episode()
    with pytest.raises(ValueError, match=r"head.image_size is 64 but this episode's images are 32 x 32.*"
                                         r"head.image_size=32.*head.resize_grid=True"):
        GMRDHead(image_size=64)(support, masks, query)
    out = GMRDHead(image_size=48, resize_grid=True, n_fg=4, n_bg=4).eval()(support, masks, query)
    assert out.log_probs.shape == (1, 1, 2, H, H)
    for options, key in (({"bg_edge": "inner"}, "head.bg_edge"), ({"n_bg": 0}, "head.n_bg"),
                         ({"mlp_dropout": 1.0}, "head.mlp_dropout")):
        with pytest.raises(ValueError, match=key):
            GMRDHead(**options)


def test_gradients_reach_features_mlps_and_decoders():
    support, masks, query = _episode(B=2, S=1, Q=1)
    query["layer3"].requires_grad_(True)
    head = GMRDHead(image_size=H, n_fg=6, n_bg=6).train()
    out = head(support, masks, query)
    (out.log_probs[:, :, 1].mean() + out.aux_losses["align"]).backward()
    assert query["layer3"].grad.abs().sum() > 0
    for module in (head.fg_mlp.spatial, head.bg_mlp.spatial, head.fg_decoder.reduce, head.bg_decoder.logit):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- reference checkpoints
def test_reference_checkpoint_loads_with_identical_outputs():
    cfg = method_defaults("gmrd", "SYNTH")
    cfg["head"].update(image_size=H, resize_grid=False)
    torch.manual_seed(0)
    ours = build_model(EncoderConfig.from_config(cfg["encoder"]), cfg["head"], load_weights=False).eval()
    reference = {FORMATS["gmrd"].reference_key(k): v.clone() for k, v in ours.state_dict().items()}
    assert "mlp2.reduce.0.weight" in reference and "decoder1.down.3.weight" in reference
    assert "encoder.reduce1.weight" in reference and None not in reference
    torch.manual_seed(1)
    other = build_model(EncoderConfig.from_config(cfg["encoder"]), cfg["head"], load_weights=False).eval()
    report = load_reference_state(other, reference)
    assert report.format == "gmrd" and report.loaded == len(reference)
    images = torch.randn(1, 2, 3, H, H, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(1, 1, H, H)
    masks[..., 8:24, 8:24] = 1
    outputs = []
    for model in (ours, other):
        torch.manual_seed(4)                         # the same random fill for both
        with torch.no_grad():
            outputs.append(model(images[:, :1], masks, images[:, 1:]).log_probs)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    del reference["mlp2.reduce.2.bias"]
    with pytest.raises(CheckpointError, match=r"head\.bg_mlp\.mix\.bias \(reference name mlp2\.reduce\.2\.bias\)"):
        load_reference_state(other, reference)          # refused before anything is loaded
    assert isinstance(ours.head.fg_decoder.reduce, nn.Conv2d)


# ----------------------------------------------------------------------------- support state
@pytest.mark.parametrize("fast", [False, True])
def test_support_state_gives_forward_for_any_split_of_the_queries(fast):
    """prepare_support once, then segment over query batches of 1 and 2 = forward, the per-query draws
    included (draws go query by query, then episode by episode), with an anomaly episode in the batch."""
    support, masks, query = _episode(B=2, S=2, Q=3, empty=(1,))
    head = GMRDHead(image_size=H, n_fg=6, n_bg=9, fast=fast).eval()
    torch.manual_seed(7)
    with torch.no_grad():
        expected = head(support, masks, query).log_probs
        torch.manual_seed(7)
        state = head.prepare_support(support, masks)
        parts = [head.segment(state, {k: v[:, i:j] for k, v in query.items()}).log_probs
                 for i, j in ((0, 1), (1, 3))]
    torch.testing.assert_close(torch.cat(parts, dim=1), expected, rtol=1e-6, atol=1e-6)
    assert set(state) >= {"bases", "prototype"} and ("descriptors" in state) == fast
    # fast: every query of the support shares one draw; otherwise each query slice has its own
    with torch.no_grad():
        same = query["layer3"][:, :1].expand_as(query["layer3"])
        out = head.segment(state, {"layer3": same, "threshold": query["threshold"]}).log_probs[0]
    assert torch.equal(out[0], out[1]) == fast


def test_the_fill_basis_gives_the_dense_filled_map_product():
    """F @ W^T through fill_basis/filled_linear equals the product of the filled map built pixel by pixel
    from the features upsampled with F.interpolate (as the reference), for a small region (scatter), a
    large one (gather) and an empty one (zeros, as the reference); neither side builds the upsampled map."""
    g = torch.Generator().manual_seed(0)
    C, h, G, K = 5, 3, 8, 7
    P = G * G
    features, weight = torch.randn(C, h, h, generator=g), torch.randn(K, P, generator=g)
    up = F.interpolate(features[None], size=(G, G), mode="bilinear", align_corners=True)[0].flatten(1)   # C x P
    upsampling = GridUpsampling((h, h), (G, G), features.device)
    for n_region, mode in ((9, "scatter"), (50, "gather"), (0, "empty")):
        region = torch.zeros(P)
        region[torch.randperm(P, generator=g)[:n_region]] = 1
        index, nonempty = fill_sources(region[None], torch.rand(1, P, dtype=torch.float64, generator=g))
        basis = fill_basis(features, region, weight, upsampling)
        dense = up[:, index[0]] * float(nonempty) @ weight.T
        assert basis["mode"] == mode
        torch.testing.assert_close(filled_linear(basis, index[0]), dense, rtol=1e-5, atol=1e-5)


def test_the_fill_basis_gives_the_dense_products_gradients():
    """Backward through fill_basis/filled_linear (the weight's gradient written once, _WeightParts) gives
    the gradients of the dense filled-map product, for the features and the MLP weight, in every mode."""
    g = torch.Generator().manual_seed(2)
    C, h, G, K = 4, 3, 8, 5
    P = G * G
    for n_region in (9, 50):
        features = torch.randn(C, h, h, generator=g, requires_grad=True)
        weight = torch.randn(K, P, generator=g, requires_grad=True)
        probe = torch.randn(C, K, generator=g)
        region = torch.zeros(P)
        region[torch.randperm(P, generator=g)[:n_region]] = 1
        index, _ = fill_sources(region[None], torch.rand(1, P, dtype=torch.float64, generator=g))
        basis = fill_basis(features, region, weight, GridUpsampling((h, h), (G, G), features.device))
        (filled_linear(basis, index[0]) * probe).sum().backward()
        ours = features.grad.clone(), weight.grad.clone()
        features.grad = weight.grad = None
        up = F.interpolate(features[None], size=(G, G), mode="bilinear", align_corners=True)[0].flatten(1)
        ((up[:, index[0]] @ weight.T) * probe).sum().backward()
        torch.testing.assert_close(ours[0], features.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1], weight.grad, rtol=1e-5, atol=1e-5)


def test_the_grid_upsampling_matches_f_interpolate_at_float_rounding():
    """The features at chosen grid pixels and the product with a weight map over the whole grid equal
    the same computed on F.interpolate's upsampled map (bilinear, align_corners=True) to ~1e-7: the
    interpolation weights are F.interpolate's own for float32 maps."""
    g = torch.Generator().manual_seed(1)
    C, (h, w), (G_y, G_x), K = 6, (5, 7), (16, 24), 4
    features, weight = torch.randn(C, h, w, generator=g), torch.randn(K, G_y * G_x, generator=g)
    up = F.interpolate(features[None], size=(G_y, G_x), mode="bilinear", align_corners=True)[0].flatten(1)
    upsampling = GridUpsampling((h, w), (G_y, G_x), features.device)
    pixels = torch.randperm(G_y * G_x, generator=g)[:50]
    torch.testing.assert_close(upsampling.rows(features, pixels), up[:, pixels].T, rtol=1e-6, atol=1e-6)
    pooled, _ = upsampling.weight_parts(weight, torch.zeros(0, dtype=torch.long))
    torch.testing.assert_close(upsampling.pooled_product(features, pooled), up @ weight.T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- one branch per episode
def test_only_the_branch_an_episode_takes_draws_random_numbers():
    """An empty support takes the anomaly branch, which draws nothing, in training and evaluation."""
    support, masks, query = _episode(B=2, S=1, Q=1, empty=(0, 1))
    head = GMRDHead(image_size=H, n_fg=6, n_bg=6)
    for training in (True, False):
        head.train(training)
        before = torch.get_rng_state()
        head(support, masks, query)
        assert torch.equal(torch.get_rng_state(), before)
    support, masks, query = _episode(B=1, S=1, Q=1)
    before = torch.get_rng_state()
    head.eval()(support, masks, query)
    assert not torch.equal(torch.get_rng_state(), before)               # the descriptor branch draws its fill


def _sgd_step(model, optim, support_masks, images):
    """One training step as the trainer's (query NLL + align, the method's SGD with weight decay);
    returns the parameters before and after."""
    from models.engine.trainer import step_loss
    from models.engine.experiment import LossConfig
    cfg = method_defaults("gmrd", "SYNTH")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    out = model(images[:, :1], support_masks, images[:, 1:])
    episode = type("Episode", (), {"query_labels": support_masks.long()})()
    loss, _ = step_loss(out, episode, LossConfig.from_config(cfg["loss"]))
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return before, {n: p.detach() for n, p in model.named_parameters()}


def test_an_sgd_step_leaves_the_branch_not_taken_unchanged():
    """As the released code, which builds only the branch it uses: a non-empty support gives the query
    threshold's layers (encoder layer4, fc, threshold) no gradient, so SGD with weight decay leaves them
    bit-unchanged (they are not shrunk); an empty support leaves the descriptor MLPs and decoders alone."""
    from models.engine.experiment import OptimConfig
    from models.engine.trainer import make_optimizer
    cfg = method_defaults("gmrd", "SYNTH")
    cfg["head"].update(image_size=64, resize_grid=False, n_fg=8, n_bg=8)
    torch.manual_seed(0)
    model = build_model(EncoderConfig.from_config(cfg["encoder"]), cfg["head"], load_weights=False)
    optim_cfg = OptimConfig.from_config(cfg["optim"])
    assert optim_cfg.name == "sgd" and optim_cfg.weight_decay > 0
    optim = make_optimizer(model, optim_cfg)
    images = torch.randn(1, 2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(1, 1, 64, 64)
    masks[..., 16:40, 20:44] = 1
    threshold_side = ("encoder.backbone.layer4.", "encoder.backbone.fc.", "encoder.threshold.")
    descriptor_side = ("head.",)

    def changed(before, after, prefixes):
        return {n for n in before if n.startswith(prefixes) and not torch.equal(before[n], after[n])}

    before, after = _sgd_step(model, optim, masks, images)
    assert changed(before, after, threshold_side) == set()
    assert changed(before, after, descriptor_side) and changed(before, after, ("encoder.backbone.layer3.",))
    before, after = _sgd_step(model, optim, torch.zeros_like(masks), images)
    assert changed(before, after, descriptor_side) == set()
    assert changed(before, after, ("encoder.threshold.",)) == {"encoder.threshold.weight", "encoder.threshold.bias"}


def test_decoder_precision_follows_the_encoders_autocast_unless_set():
    """head.decoder_bf16: auto (default) runs the decoders' 3 x 3 convolutions in the autocast the caller
    runs the encoder in (fp32 without one: the default evaluation), in evaluation and training; True
    always bf16, False always fp32; the 1x1 convolutions on the cosine maps stay fp32, the logits come
    back in float32 and bf16 stays close to fp32."""
    support, masks, query = _episode(B=1, S=1, Q=2)
    heads = {value: GMRDHead(image_size=H, n_fg=6, n_bg=6, decoder_bf16=value).eval() for value in ("auto", True, False)}
    for head in heads.values():
        head.load_state_dict(heads[False].state_dict())

    def run(head, caller):
        torch.manual_seed(2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=caller):
            with float32_head_region("cpu"):
                return head(support, masks, query).log_probs

    exact = run(heads[False], caller=False)
    assert torch.equal(run(heads[False], caller=True), exact)          # false: fp32 even under bf16
    assert torch.equal(run(heads["auto"], caller=False), exact)        # auto without autocast: fp32
    bf16 = run(heads[True], caller=False)                              # true: bf16 even without
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, exact)
    assert torch.equal(run(heads["auto"], caller=True), bf16)          # auto under bf16: bf16
    torch.testing.assert_close(bf16.exp(), exact.exp(), rtol=0, atol=2e-2)
    # training (dropout on, the same draws): the same choices
    for head in heads.values():
        head.train()
    trained = {value: run(head, caller=True) for value, head in heads.items()}
    assert torch.equal(trained["auto"], trained[True]) and not torch.equal(trained[True], trained[False])
    # the first 1x1 convolution reads the fp32 cosine maps: bf16 never reaches it
    seen = []
    heads[True].bg_decoder.reduce.register_forward_hook(lambda module, args, out: seen.append(args[0].dtype))
    run(heads[True], caller=True)
    assert seen and set(seen) == {torch.float32}
    assert GMRDHead().decoder_bf16 == "auto"
    with pytest.raises(ValueError, match=r"head\.decoder_bf16 must be 'auto' .* got 'false'"):
        GMRDHead(decoder_bf16="false")
