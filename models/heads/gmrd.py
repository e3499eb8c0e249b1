"""GMRD head (Cheng et al., IEEE TMI 2024): many representative descriptors per class, affinity maps
fused by two decoders (foreground and background paths).

Reference behaviour (zmcheng9/GMRD models/fewshot_GMRD.py and models/moudles.py, built on Q-Net's
code; docs/gmrd.md lists every difference from the released code):

- encoder ``qnet_r101``: only ``layer3`` (C = 512, H/4 x W/4) feeds the descriptors and affinity maps;
  the query-informed threshold (``threshold``) serves the empty-support branch only;
- descriptor generation, per support shot, on the features upsampled (bilinear, align_corners=True)
  to the image grid G x G (G = ``image_size``): the region's features are kept and every other pixel
  is filled with the feature vector of a randomly drawn region pixel (`fill_sources`); a per-channel
  MLP Linear(G*G -> K) -> Dropout(0.2) -> Linear(K -> K), one matmul over the C channels, turns the
  C x G*G map into K descriptors; then the plain prototype (masked average) and the edge prototype
  are appended: K + 2 descriptors (foreground K = 100, region = mask, edge = mask - erode(mask);
  background K = 600, region = 1 - mask, edge = dilate(1 - mask) - mask as released, see
  `edge_masks`); descriptors are averaged over shots;
- affinity maps: cosine of every query feature (h x w) with every descriptor -> K + 2 maps, one
  `AffinityDecoder` per path -> one logit map each; both upsampled (bilinear, align_corners=True)
  to H x W, softmax over [bg, fg], log of the clamped probabilities;
- an episode whose support masks are all empty takes ADNet's/Q-Net's anomaly branch instead: masked
  average prototype (zero), P = 1 - sigmoid(kappa (-S cos - T_q)) with the query threshold T_q;
- training: the `align` loss, per episode of its branch: the query's predicted mask gives query
  descriptors (or, empty branch, a query prototype) that segment each support shot; unweighted NLL
  on the support mask, mean over shots; zero when nothing is predicted foreground.

Each episode computes only the branch it takes, as the released code (`episodes_of_branch`): the
unused branch's parameters get no gradient and draw no random numbers. Evaluation's support work is done
once per support slice and mask (`prepare_support`; `segment` draws and decodes): the MLP's first layer
is split into the part the region fixes and the part of the drawn pixels (`fill_basis`), so a draw per
query slice, as the reference's, costs C x K x min(region, fill) instead of C x K x G*G. The features
upsampled to the grid are never built (`GridUpsampling`: the few pixels needed are interpolated, the
region's product goes through the adjoint of the upsampling), in training as in evaluation. The
decoders' 3 x 3 convolutions run in the caller's autocast by default (`decoder_bf16="auto"`: bf16 where
train.amp / evaluation.amp is on), everything else in float32.

Randomness (the fill draws and both dropouts) comes from the torch CPU generator, which the trainer
saves in its resume points, so a resumed run draws what the uninterrupted run would have drawn; the
draws are moved to the inputs' device (no CUDA generator). Draws go draw by draw (query slice), then
episode by episode, so they do not depend on how the queries are split into calls.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads.adnet import anomaly_fg_probability
from models.heads.common import (
    EPS_FLOAT32,
    HeadOutput,
    caller_autocast,
    cpu_dropout,
    dilate,
    erode,
    number_option,
    per_shot_nll,
    support_target,
    two_class_log_probs,
    interpolation_matrices,
    upsample_adjoint,
    upsample_bilinear,
)
from models.heads.qnet import QNET_ENCODER_RULES, QNET_SIGNATURE, image_thresholds, predicted_foreground
from models.heads.reference_format import ReferenceFormat

FEATURE_MAP = "layer3"
MAP_EPS = 1e-5                 # the reference's denominator guard in masked average pooling
EDGE_ITERATIONS = 2            # cv2.erode / cv2.dilate iterations with the 3 x 3 kernel
DECODER_HIDDEN = 100           # channels of the decoder's last 3x3 conv (fixed in the reference)
BG_EDGES = ("reference", "outer")
DECODER_PRECISIONS = ("auto", True, False)

# Reference checkpoints (zmcheng9/GMRD, `torch.save(model.state_dict())`, plain keys), loaded by
# models/engine/reference_checkpoints.py: Q-Net's encoder (reduce2 unused, still saved) plus the MLPs
# and decoders of models/moudles.py. `mlp{1,2}` and `decoder{1,2}` are the foreground and background paths.
REFERENCE_CHECKPOINT = ReferenceFormat(
    title="GMRD (zmcheng9/GMRD)", method="gmrd",
    rules=QNET_ENCODER_RULES + (
           ("mlp1.reduce.0.", "head.fg_mlp.spatial."),          # Linear(H*W -> 100)
           ("mlp1.reduce.2.", "head.fg_mlp.mix."),              # Linear(100 -> 100)
           ("mlp2.reduce.0.", "head.bg_mlp.spatial."),          # Linear(H*W -> 600)
           ("mlp2.reduce.2.", "head.bg_mlp.mix."),
           ("decoder1.res1.0.", "head.fg_decoder.reduce."),     # 1x1 conv 102 -> 100
           ("decoder1.res2.0.", "head.fg_decoder.res1."),       # 3x3 convs of the residual block
           ("decoder1.res2.2.", "head.fg_decoder.res2."),
           ("decoder1.down.0.", "head.fg_decoder.hidden."),     # 3x3 conv -> 100
           ("decoder1.down.3.", "head.fg_decoder.logit."),      # 1x1 conv 100 -> 1
           ("decoder2.res1.0.", "head.bg_decoder.reduce."),     # the same for the background (602 -> 600)
           ("decoder2.res2.0.", "head.bg_decoder.res1."),
           ("decoder2.res2.2.", "head.bg_decoder.res2."),
           ("decoder2.down.0.", "head.bg_decoder.hidden."),
           ("decoder2.down.3.", "head.bg_decoder.logit.")),
    signature=QNET_SIGNATURE | {"mlp1.reduce.0.weight"},
)


# ----------------------------------------------------------------------------- masks
def edge_masks(masks: torch.Tensor, bg_edge: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the two edge prototypes, ... x H x W each: (foreground, background).

    foreground (inner edge): m - erode(m), the two-pixel ring inside the mask.
    background, "reference" (as released): dilate(1 - m) - m = (1 - m) - erode(m) (the two are equal
    under OpenCV's borders): 1 on the whole background, 0 on the inner ring and -1 on the mask's
    interior, i.e. not an edge at all, and its sum |bg| - |interior| can be near 0 or negative.
    "outer" (what the paper describes): dilate(m) - m, the two-pixel ring outside the mask.
    """
    fg = masks - erode(masks, EDGE_ITERATIONS)
    grown = dilate(1.0 - masks if bg_edge == "reference" else masks, EDGE_ITERATIONS)
    bg = grown - masks
    return fg, bg


# ----------------------------------------------------------------------------- random fill
def fill_sources(region: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which pixel's feature the reference's filled map holds at each pixel (get_fg_fts/get_random_pts).

    region: N x P (P pixels in raster order; 1 = a region pixel); keys: N x P uniform random keys
    (float64; their order among the region pixels is the random draw).
    Returns (index N x P long, nonempty N bool): region pixels (== 1) keep their own feature; the
    n_fill others, in raster order j = 0 .. n_fill - 1, take the region pixel
    - perm[j] if n_src >= n_fill (random.sample without replacement: n_fill distinct pixels in random order),
    - otherwise perm[j] for j < n_fill mod n_src (a random remainder), then the region pixels in raster
      order, repeated: raster[(j - rem) mod n_src] (the reference's copies come after the remainder),
    with perm the region pixels sorted by key and raster the region pixels in raster order. An empty
    region fills with zeros in the reference: nonempty is False there (the caller zeroes the map).
    Everything stays on the device (sorts instead of nonzero()), so nothing synchronises.
    """
    N, P = region.shape
    src = region == 1
    n_src = src.sum(-1, keepdim=True)                                        # N x 1
    n_fill = P - n_src
    safe_src = n_src.clamp_min(1)
    raster = torch.argsort((~src).to(torch.uint8), dim=-1, stable=True)       # region pixels first, raster order
    perm = torch.argsort(torch.where(src, keys, 2.0), dim=-1, stable=True)    # region pixels first, key order
    j = torch.cumsum((~src).long(), dim=-1) - 1                               # rank among the filled pixels
    rem = n_fill % safe_src
    use_perm = (n_src >= n_fill) | (j < rem)
    from_perm = perm.gather(-1, j.clamp(0, P - 1))
    from_raster = raster.gather(-1, torch.remainder(j - rem, safe_src).clamp(0, P - 1))
    own = torch.arange(P, device=region.device).expand(N, P)
    index = torch.where(src, own, torch.where(use_perm, from_perm, from_raster))
    return index, n_src[:, 0] > 0


# ----------------------------------------------------------------------------- the features on the grid
class GridUpsampling:
    """Bilinear upsampling (align_corners=True, as the reference's F.interpolate) of h x w features to the
    G x G grid, as the two factors A_y (G x h) and A_x (G x w) of `interpolation_matrices`, built with
    the weights F.interpolate uses on float32 maps. GMRD's MLPs read C x G*G maps, but each is linear
    in the features, so the C x G*G upsampled map is never built:
    - `rows(features, pixels)`: the upsampled features at some grid pixels only (the drawn fill
      sources, a small region), from the <= 4 feature cells each pixel interpolates;
    - `weight_parts` + `pooled_product`: sum_p Up(f)(p) w(k, p) over every grid pixel, as
      f @ Up^T(w): the adjoint of the upsampling applied to the K weight maps (K x G x (G h + h w)
      multiply-adds, then C x h*w x K), instead of C x G*G x K on the upsampled map.
    """

    def __init__(self, size: tuple[int, int], grid: tuple[int, int], device: torch.device):
        self.size, self.grid = tuple(size), tuple(grid)
        self.a_y, self.a_x = interpolation_matrices(self.size, self.grid, device, align_corners=True,
                                                    float32_weights=True)
        self.taps_y, self.lambdas_y = self._taps(self.a_y)
        self.taps_x, self.lambdas_x = self._taps(self.a_x)

    @staticmethod
    def _taps(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G x n interpolation matrix -> (G x 2 source indices in ascending order, G x 2 weights); a row
        with one source gets a second of weight 0."""
        weights, index = a.topk(2, dim=1)
        order = index.argsort(dim=1)
        return index.gather(1, order), weights.gather(1, order)

    def rows(self, features: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """features C x h x w, pixels n (raster indices on the grid) -> n x C: Up(features) at those pixels."""
        C, h, w = features.shape
        cells = features.reshape(C, h * w).T                                    # h*w x C
        y, x = pixels // self.grid[1], pixels % self.grid[1]
        ty, ly = self.taps_y.index_select(0, y), self.lambdas_y.index_select(0, y)   # n x 2
        tx, lx = self.taps_x.index_select(0, x), self.lambdas_x.index_select(0, x)

        def cell(i: int, j: int) -> torch.Tensor:
            return cells.index_select(0, ty[:, i] * w + tx[:, j])               # n x C

        return (ly[:, :1] * (lx[:, :1] * cell(0, 0) + lx[:, 1:] * cell(0, 1))
                + ly[:, 1:] * (lx[:, :1] * cell(1, 0) + lx[:, 1:] * cell(1, 1)))

    @staticmethod
    def pooled_product(features: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """features C x h x w, pooled = Up^T(weight) K x h x w (`weight_parts`) -> C x K:
        sum_p Up(features)[:, p] * weight[:, p] over every grid pixel."""
        C, h, w = features.shape
        return features.reshape(C, h * w) @ pooled.reshape(pooled.shape[0], h * w).T

    def weight_parts(self, weight: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weight K x G*G, columns n (pixel indices) -> (Up^T(weight) K x h x w, weight[:, columns]^T n x K),
        in one autograd node (`_WeightParts`)."""
        return _WeightParts.apply(weight, columns, self.a_y, self.a_x, self.grid)


class _WeightParts(torch.autograd.Function):
    """(A_y^T W A_x, W[:, columns]^T) of the K x G*G MLP weight. Separately, the columns' backward would
    zero-fill a K x G*G gradient for the few columns and autograd would add it to the adjoint's dense
    one (two passes over 157 MB for the background at 256, each step and shot); here the adjoint's
    gradient is made once and the columns' gradients are added into it in place."""

    @staticmethod
    def forward(ctx, weight, columns, a_y, a_x, grid):
        ctx.save_for_backward(columns, a_y, a_x)
        ctx.grid = grid
        pooled = a_y.T @ weight.view(weight.shape[0], *grid) @ a_x                     # K x h x w
        return pooled, weight.index_select(1, columns).T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pooled, grad_columns):
        columns, a_y, a_x = ctx.saved_tensors
        if grad_pooled is None:
            grad_pooled = a_y.new_zeros(grad_columns.shape[1], a_y.shape[1], a_x.shape[1])
        grad = (a_y @ grad_pooled @ a_x.T).reshape(grad_pooled.shape[0], -1)        # K x G*G, fresh
        if grad_columns is not None and columns.numel():
            grad.index_add_(1, columns, grad_columns.T)
        return grad, None, None, None, None


# ----------------------------------------------------------------------------- the filled map's first layer
def fill_basis(features: torch.Tensor, region: torch.Tensor, weight: torch.Tensor,
               upsampling: GridUpsampling) -> dict:
    """What the MLP's first layer needs of one shot's filled maps, computed once for all draws.

    features: C x h x w (the shot's features, before upsampling); region: P = G*G (1 = a region
    pixel); weight: K x P (the Linear(P -> K) weight). The filled map F (C x P) keeps the upsampled
    features of the region pixels and puts at each of the n_fill other pixels the feature of a drawn
    region pixel, so F @ W^T splits into a part fixed by the region and a part of the drawn pixels;
    only the smaller side of the split is recomputed per draw (`filled_linear`), and neither the
    filled map nor the C x P upsampled map is built:
    - "gather" (n_fill <= n_src, the background): fixed = the region's product (the whole grid's,
      through the adjoint of the upsampling, `pooled_product`, minus the fill pixels'), then each draw
      adds Up(F)[sources]^T @ W_fill^T;
    - "scatter" (n_src < n_fill, the foreground): each draw adds every fill pixel's weight row to the
      row of its source pixel, then Up(F)[region]^T @ (W_region + W_scattered)^T;
    - "empty" (no region pixel): the reference fills with zeros, F @ W^T = 0.
    Rows (not columns) are gathered and scattered, so forward and backward move contiguous memory.
    The sums are the dense product's in another order (equal up to float rounding).
    """
    src_mask = region == 1
    src, fill = src_mask.nonzero()[:, 0], (~src_mask).nonzero()[:, 0]
    if src.numel() == 0:
        return {"mode": "empty", "zeros": features.new_zeros(features.shape[0], weight.shape[0])}
    if fill.numel() <= src.numel():
        # the region's product: the whole grid's minus the fill pixels' (masking the K x P weight by the
        # region instead costs two passes over it, forward and backward, and more than the subtraction)
        pooled, w_fill = upsampling.weight_parts(weight, fill)                    # K x h x w, n_fill x K
        fixed = upsampling.pooled_product(features, pooled) - upsampling.rows(features, fill).T @ w_fill
        return {"mode": "gather", "fill": fill, "features": features, "upsampling": upsampling,
                "w_fill": w_fill, "fixed": fixed}
    rank = torch.cumsum(src_mask.long(), 0) - 1                                # a region pixel's row in rows_src
    return {"mode": "scatter", "fill": fill, "rank": rank, "rows_src": upsampling.rows(features, src),
            "w_src": weight.index_select(1, src).T.contiguous(),                    # n_src x K
            "w_fill": weight.index_select(1, fill).T.contiguous()}                  # n_fill x K


def filled_linear(basis: dict, index: torch.Tensor) -> torch.Tensor:
    """F @ W^T (C x K, no bias) for the filled map whose pixel p holds the feature of pixel index[p]
    (`fill_sources`, P), with the shot's `fill_basis`."""
    mode = basis["mode"]
    if mode == "empty":
        return basis["zeros"]
    sources = index.index_select(0, basis["fill"])                             # n_fill region pixels
    if mode == "gather":
        return basis["fixed"] + basis["upsampling"].rows(basis["features"], sources).T @ basis["w_fill"]
    weights = basis["w_src"].index_add(0, basis["rank"].index_select(0, sources), basis["w_fill"])
    return basis["rows_src"].T @ weights


# ----------------------------------------------------------------------------- modules
class DescriptorMLP(nn.Module):
    """The reference MLP: Linear(P -> K), Dropout(p), Linear(K -> K), applied to every channel's
    flattened map. ... x C x P -> ... x K x C (one matmul over all channels). The head computes the
    first layer's product through `fill_basis` / `filled_linear` and calls `finish`."""

    def __init__(self, n_pixels: int, n_descriptors: int, dropout: float):
        super().__init__()
        self.spatial = nn.Linear(n_pixels, n_descriptors)
        self.mix = nn.Linear(n_descriptors, n_descriptors)
        self.dropout = float(dropout)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.finish(maps @ self.spatial.weight.T)

    def finish(self, product: torch.Tensor) -> torch.Tensor:
        """The rest of the MLP after the first layer's product: ... x C x K (maps @ W^T, no bias) -> ... x K x C."""
        return self.mix(cpu_dropout(product + self.spatial.bias, self.dropout, self.training)).transpose(-1, -2)


class AffinityDecoder(nn.Module):
    """The reference Decoder (no biases): 1x1 conv (K+2 -> K) + ReLU; residual block of two 3x3 convs
    (K -> K, ReLU each) added to its input; 3x3 conv K -> 100 + ReLU + Dropout2d(p) + 1x1 conv 100 -> 1.
    N x (K+2) x h x w -> N x h x w logits (float32).

    `forward(maps, conv_dtype)` runs the three 3 x 3 convolutions (nearly all of the work) under autocast
    to `conv_dtype` (None: float32); the 1x1 convolutions stay in float32: the first reads the cosine maps,
    whose differences between descriptors bf16's 8-bit mantissa would round away, the last gives the logits.
    """

    def __init__(self, n_descriptors: int, dropout: float):
        super().__init__()
        k = n_descriptors
        self.reduce = nn.Conv2d(k + 2, k, kernel_size=1, bias=False)
        self.res1 = nn.Conv2d(k, k, kernel_size=3, padding=1, bias=False)
        self.res2 = nn.Conv2d(k, k, kernel_size=3, padding=1, bias=False)
        self.hidden = nn.Conv2d(k, DECODER_HIDDEN, kernel_size=3, padding=1, bias=False)
        self.logit = nn.Conv2d(DECODER_HIDDEN, 1, kernel_size=1, bias=False)
        self.dropout = float(dropout)

    def forward(self, maps: torch.Tensor, conv_dtype: torch.dtype | None = None) -> torch.Tensor:
        x = F.relu(self.reduce(maps))
        with torch.autocast(maps.device.type, dtype=conv_dtype or torch.float32, enabled=conv_dtype is not None):
            x = F.relu(self.res2(F.relu(self.res1(x)))) + x
            x = F.relu(self.hidden(x))
        x = cpu_dropout(x.float(), self.dropout, self.training, shape=(*x.shape[:2], 1, 1))
        return self.logit(x)[:, 0]


def dual_path_log_probs(fg_logit: torch.Tensor, bg_logit: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Both logit maps upsampled (bilinear, align_corners=True), softmax over [bg, fg], then the log of the
    probabilities clamped to [eps, 1 - eps] as the reference's loss takes them. ... x h x w -> ... x 2 x H x W.
    (The softmax is taken as such: 1 - sigmoid(fg - bg) would lose precision near the clamp.)"""
    logits = torch.stack([upsample_bilinear(bg_logit, size, align_corners=True),
                          upsample_bilinear(fg_logit, size, align_corners=True)], dim=-3)
    return torch.log(torch.softmax(logits, dim=-3).clamp(EPS_FLOAT32, 1.0 - EPS_FLOAT32))


def episodes_of_branch(empty: torch.Tensor) -> tuple[list[int], list[int]]:
    """B bool (support all empty) -> (the descriptor episodes, the anomaly episodes), as index lists.
    Reads the flags on the host, as the reference's `if supp_mask.sum() == 0` does: only the branch an
    episode takes is computed."""
    flags = empty.tolist()
    return [b for b, e in enumerate(flags) if not e], [b for b, e in enumerate(flags) if e]


def take(x: torch.Tensor, episodes: list[int]) -> torch.Tensor:
    """x[episodes] along the episode axis, without a copy when `episodes` is every episode in order."""
    if episodes == list(range(x.shape[0])):
        return x
    return x.index_select(0, torch.tensor(episodes, dtype=torch.long, device=x.device))


def merge_episodes(B: int, parts: list[tuple[list[int], torch.Tensor]]) -> torch.Tensor:
    """Per-branch results (episode indices, values n x ...) -> B x ... in episode order."""
    parts = [(i, v) for i, v in parts if i]
    if len(parts) == 1 and len(parts[0][0]) == B:
        return parts[0][1]
    out = parts[0][1].new_zeros(B, *parts[0][1].shape[1:])
    for episodes, values in parts:
        out = out.index_copy(0, torch.tensor(episodes, dtype=torch.long, device=values.device), values)
    return out


# ----------------------------------------------------------------------------- the head
class GMRDHead(nn.Module):
    """Multiple representative descriptors, affinity maps and dual-path decoders (GMRD).

    forward(support {"layer3": B x S x C x h x w, ...}, support_masks B x S x H x W,
            query {"layer3": B x Q x C x h x w, "threshold": B x Q x 1})
        -> HeadOutput(log_probs B x Q x 2 x H x W, aux_losses {"align"} in training,
                      extras {"empty_support": B bool (the anomaly branch), "n_descriptors": (fg, bg)})
    forward = segment(prepare_support(support, support_masks), query), in training and evaluation.

    Each episode computes only its branch, as the released code: the descriptor branch when its support
    has a foreground pixel, the anomaly branch (which alone reads the query threshold) when all its
    support masks are empty. The parameters of a branch no episode of the batch took get no gradient
    (None), so SGD's weight decay leaves them alone, as in the reference; the query threshold (the
    encoder's layer4, fc and threshold layer) likewise with a non-empty support.

    Options:
        image_size: G, the side of the grid the descriptor MLPs read (their input is G * G pixels; 256
            for every real dataset). An episode of another size is an error unless resize_grid.
        resize_grid: generate descriptors on a G x G grid whatever the episode's size (features
            upsampled to G, masks resized with nearest); identical to the default when H = W = G.
        n_fg, n_bg: K of the foreground (100) and background (600) MLPs.
        scaler, kappa: the anomaly branch's cosine scale and soft-threshold slope (Q-Net's 20, 0.5).
        mlp_dropout, decoder_dropout: the reference's Dropout(0.2) in the MLPs and Dropout2d(0.1) in
            the decoders (training only).
        bg_edge: "reference" = dilate(1 - m) - m as released; "outer" = dilate(m) - m (edge_masks).
        fast: draw the random fill once per support (in prepare_support) and reuse the descriptors
            for every query; by default (False) each query slice gets its own draw of the support
            descriptors, as the reference, which calls the model once per slice.
        align: add the alignment loss in training.
        decoder_bf16: the precision of the decoders' 3 x 3 convolutions (most of the head's work; the
            1x1 convolutions on the cosine maps and to the logits stay float32): "auto" (default) the
            autocast the caller runs the encoder in (`caller_autocast`: bf16 where train.amp /
            evaluation.amp is on, so fp32 in the default evaluation), True always bf16, False always
            fp32 (the reference's). The logits are float32 (docs/gmrd.md, "Speed and precision").
    """

    feature_maps = (FEATURE_MAP, "threshold")

    def __init__(self, image_size: int = 256, resize_grid: bool = False, n_fg: int = 100, n_bg: int = 600,
                 scaler: float = 20.0, kappa: float = 0.5, mlp_dropout: float = 0.2, decoder_dropout: float = 0.1,
                 bg_edge: str = "reference", fast: bool = False, align: bool = True, decoder_bf16: bool | str = "auto"):
        super().__init__()
        for key, value in (("image_size", image_size), ("n_fg", n_fg), ("n_bg", n_bg)):
            number_option(key, value, 1, whole=True)
        for key, value in (("mlp_dropout", mlp_dropout), ("decoder_dropout", decoder_dropout)):
            if not 0.0 <= number_option(key, value) < 1.0:
                raise ValueError(f"head.{key} must be a probability in [0, 1), got {value!r}")
        if bg_edge not in BG_EDGES:
            raise ValueError(f"head.bg_edge must be one of {', '.join(BG_EDGES)} (reference: the released "
                             f"dilate(1 - m) - m; outer: the ring outside the mask), got {bg_edge!r}")
        self.image_size = int(image_size)
        self.resize_grid = bool(resize_grid)
        self.scaler = number_option("scaler", scaler, 0, low_open=True)
        self.kappa = number_option("kappa", kappa, 0, low_open=True)
        self.bg_edge = bg_edge
        if decoder_bf16 not in DECODER_PRECISIONS:
            raise ValueError(f"head.decoder_bf16 must be 'auto' (the decoders' 3 x 3 convolutions in the encoder's "
                             f"autocast: train.amp, evaluation.amp), True (always bf16) or False (always fp32; Python "
                             f"literals on the command line, head.decoder_bf16=False), got {decoder_bf16!r}")
        self.fast, self.align, self.decoder_bf16 = bool(fast), bool(align), decoder_bf16
        n_pixels = self.image_size ** 2
        self.fg_mlp = DescriptorMLP(n_pixels, int(n_fg), mlp_dropout)
        self.bg_mlp = DescriptorMLP(n_pixels, int(n_bg), mlp_dropout)
        self.fg_decoder = AffinityDecoder(int(n_fg), decoder_dropout)
        self.bg_decoder = AffinityDecoder(int(n_bg), decoder_dropout)
        self._counts: dict[str, torch.Tensor | int] = {}

    # ------------------------------------------------------------------ grid
    def grid_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The descriptor grid for an episode of H x W images (refuses a size the MLPs cannot read)."""
        G = self.image_size
        if tuple(size) != (G, G) and not self.resize_grid:
            raise ValueError(
                f"head.image_size is {G} but this episode's images are {size[0]} x {size[1]}: GMRD's descriptor "
                f"MLPs read the {G} x {G} image grid (Linear({G * G} -> K)). Set head.image_size={size[0]} if "
                f"the images are square (a new model: the MLP weights depend on it), or head.resize_grid=True to "
                f"generate the descriptors on a {G} x {G} grid whatever the image size.")
        return G, G

    @staticmethod
    def to_grid(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """... x H x W masks on the descriptor grid (nearest; the identity at the same size) -> ... x G x G."""
        if tuple(masks.shape[-2:]) == tuple(grid):
            return masks
        lead = masks.shape[:-2]
        out = F.interpolate(masks.reshape(-1, 1, *masks.shape[-2:]), size=grid, mode="nearest")
        return out.reshape(*lead, *grid)

    @staticmethod
    def grid_average(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The reference's masked average of the features upsampled (bilinear, align_corners=True) to the
        grid: ... x C x h x w, ... x G x G -> ... x C (eps 1e-5; an empty mask gives zeros). Computed
        through the adjoint (whose rows sum to 1, so the pooled weights keep the mask's total)."""
        pooled = upsample_adjoint(weights, features.shape[-2:], align_corners=True, float32_weights=True).flatten(-2)
        return torch.einsum("...cl,...l->...c", features.flatten(-2), pooled) / (
            weights.flatten(-2).sum(-1, keepdim=True) + MAP_EPS)

    # ------------------------------------------------------------------ descriptors
    def class_bases(self, features: torch.Tensor, masks: torch.Tensor) -> dict:
        """Everything of the descriptors that no draw changes, for B episodes of N shots.

        features B x N x C x h x w, masks B x N x G x G (on the grid) -> {"fg"|"bg": {"region" B x N x P,
        "fixed" B x N x 2 x C (plain and edge prototypes), "bases" [b][n] fill_basis}}. The features
        are read as upsampled (bilinear, align_corners=True) to the grid, as the reference, without
        building the upsampled maps (`GridUpsampling`).
        """
        B, N = features.shape[:2]
        upsampling = GridUpsampling(features.shape[-2:], masks.shape[-2:], features.device)
        fg_edge, bg_edge = edge_masks(masks, self.bg_edge)
        out = {}
        for name, region, edge, mlp in (("fg", masks, fg_edge, self.fg_mlp), ("bg", 1.0 - masks, bg_edge, self.bg_mlp)):
            fixed = self.grid_average(features[:, :, None], torch.stack([region, edge], dim=2))   # B x N x 2 x C
            region = region.flatten(-2)
            bases = [[fill_basis(features[b, n], region[b, n], mlp.spatial.weight, upsampling) for n in range(N)]
                     for b in range(B)]
            out[name] = {"region": region, "fixed": fixed, "bases": bases}
        return out

    def draw_descriptors(self, bases: dict, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`draws` independent random fills of the descriptors of `class_bases`
        -> (fg B x draws x (n_fg + 2) x C, bg B x draws x (n_bg + 2) x C): [K generated, plain
        prototype, edge prototype], averaged over the N shots.

        The draws are made draw by draw, then episode by episode, foreground before background (keys of
        N x P float64 from the torch CPU generator, then the MLP's dropout in training), so a query
        image's draw does not depend on how the queries are split into calls."""
        out = {"fg": [], "bg": []}
        for _ in range(draws):
            per_episode = {"fg": [], "bg": []}
            for b in range(bases["fg"]["region"].shape[0]):
                for name, mlp in (("fg", self.fg_mlp), ("bg", self.bg_mlp)):
                    cls = bases[name]
                    region = cls["region"][b]                                    # N x P
                    keys = torch.rand(region.shape, dtype=torch.float64).to(region.device)   # the CPU generator
                    index, _ = fill_sources(region, keys)
                    product = torch.stack([filled_linear(basis, index[n]) for n, basis in enumerate(cls["bases"][b])])
                    generated = mlp.finish(product)                               # N x K x C
                    per_episode[name].append(torch.cat([generated, cls["fixed"][b]], dim=-2).mean(dim=0))
            for name in out:
                out[name].append(torch.stack(per_episode[name]))                # B x D x C
        return torch.stack(out["fg"], dim=1), torch.stack(out["bg"], dim=1)

    def class_descriptors(self, features: torch.Tensor, masks: torch.Tensor, draws: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """features B x N x C x h x w, masks B x N x G x G (on the grid)
        -> (fg B x draws x (n_fg + 2) x C, bg B x draws x (n_bg + 2) x C)."""
        return self.draw_descriptors(self.class_bases(features, masks), draws)

    def affinity_logits(self, features: torch.Tensor, descriptors: torch.Tensor,
                        decoder: AffinityDecoder) -> torch.Tensor:
        """Cosine of every feature with every descriptor, decoded to one logit map.

        features: B x N x C x h x w; descriptors: B x R x D x C with R = N (one set per image) or 1
        (shared) -> B x N x h x w. Normalised as F.normalize (eps 1e-12) on both sides, as the reference
        (each path normalises the features itself, as the reference: one shared normalisation would
        change the gradients' rounding).
        """
        B, N = features.shape[:2]
        d = F.normalize(descriptors, dim=-1).expand(B, N, *descriptors.shape[2:])
        maps = torch.einsum("bnchw,bndc->bndhw", F.normalize(features, dim=2), d)
        logits = decoder(maps.flatten(0, 1), self.decoder_dtype())
        return logits.float().view(B, N, *features.shape[-2:])

    def decoder_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the decoders' 3 x 3 convolutions for this call (None: float32), from
        `decoder_bf16`: "auto" is the caller's (docs/gmrd.md, "Speed and precision")."""
        if self.decoder_bf16 == "auto":
            return caller_autocast()
        return torch.bfloat16 if self.decoder_bf16 else None

    def dual_path(self, features: torch.Tensor, fg_desc: torch.Tensor, bg_desc: torch.Tensor,
                  size: tuple[int, int]) -> torch.Tensor:
        """The descriptor path's prediction for `features` (B x N x C x h x w) -> B x N x 2 x H x W log-probs."""
        return dual_path_log_probs(self.affinity_logits(features, fg_desc, self.fg_decoder),
                                   self.affinity_logits(features, bg_desc, self.bg_decoder), size)

    # ------------------------------------------------------------------ support state
    def prepare_support(self, support: dict, support_masks: torch.Tensor) -> dict:
        """Everything computed from the support alone (models/heads/contract.py, "Support state").

        support {"layer3": B x S x C x h x w, ...}, support_masks B x S x H x W -> {"empty": B bool,
        "episodes": (descriptor episode indices, anomaly episode indices), "bases": class_bases of the
        descriptor episodes (upsampled features, fill bases, plain and edge prototypes), "descriptors"
        (fast only: one draw, fg and bg B_d x 1 x D x C), "prototype": B_a x C (the anomaly episodes'),
        and the support itself for the training's alignment}. Nothing is drawn unless `fast`.
        """
        fs = support[FEATURE_MAP]
        size = tuple(support_masks.shape[-2:])
        grid = self.grid_size(size)
        masks_grid = self.to_grid(support_masks, grid)                          # B x S x G x G
        empty = support_masks.flatten(1).sum(1) == 0                            # B: the anomaly branch
        desc, anomaly = episodes_of_branch(empty)
        state = {"size": size, "grid": grid, "empty": empty, "episodes": (desc, anomaly),
                 "support": fs, "support_masks": support_masks}
        if desc:
            state["bases"] = self.class_bases(take(fs, desc), take(masks_grid, desc))
            if self.fast:
                state["descriptors"] = self.draw_descriptors(state["bases"], 1)
        if anomaly:
            state["prototype"] = self.grid_average(take(fs, anomaly), take(masks_grid, anomaly)).mean(dim=1)
        return state

    def segment(self, state: dict, query: dict) -> HeadOutput:
        """The query (B x Q) segmented with a `prepare_support` state; in training also the alignment loss."""
        fq = query[FEATURE_MAP]
        B, Q = fq.shape[:2]
        desc, anomaly = state["episodes"]
        # read only where used (anomaly branch, alignment): evaluation's queries may lack it (query_maps)
        threshold = image_thresholds(query, B, Q) if anomaly or self.training else None   # B x Q x 1 x 1
        size = state["size"]
        log_desc = p_anomaly = None
        parts = []
        if desc:
            # one draw per query slice (the reference's one call per slice) unless fast
            fg_desc, bg_desc = state["descriptors"] if self.fast else self.draw_descriptors(state["bases"], Q)
            log_desc = self.dual_path(take(fq, desc), fg_desc, bg_desc, size)
            parts.append((desc, log_desc))
        if anomaly:
            p_anomaly = upsample_bilinear(
                anomaly_fg_probability(take(fq, anomaly), state["prototype"], take(threshold, anomaly),
                                       self.scaler, self.kappa), size, align_corners=True)   # B_a x Q x H x W
            parts.append((anomaly, two_class_log_probs(p_anomaly)))
        empty = state["empty"]
        out = HeadOutput(merge_episodes(B, parts), extras={
            "empty_support": empty, "n_descriptors": (self.fg_mlp.mix.out_features + 2,
                                                      self.bg_mlp.mix.out_features + 2)})
        phase = "train" if self.training else "eval"
        self._accumulate(f"{phase}.episodes", B)
        self._accumulate(f"{phase}.empty_support", empty.sum())
        if self.training and self.align:
            loss, no_fg = self.alignment_loss(state, fq, log_desc, p_anomaly, threshold)
            out.aux_losses["align"] = loss
            out.extras["align_no_query_fg"] = no_fg
            self._accumulate(f"{phase}.align.no_query_fg", no_fg.sum())
        return out

    def forward(self, support: dict, support_masks: torch.Tensor, query: dict) -> HeadOutput:
        return self.segment(self.prepare_support(support, support_masks), query)

    def query_maps(self, support_masks: torch.Tensor) -> tuple[str, ...]:
        """The query maps `segment` reads with these support masks (B x S x H x W; models/heads/contract.py):
        the threshold only for the anomaly branch (an episode whose support masks are all empty, as in
        `prepare_support`) and the training's alignment, so evaluation's queries mostly skip layer4."""
        empty = support_masks.flatten(1).sum(1) == 0
        return tuple(self.feature_maps) if self.training or bool(empty.any()) else (FEATURE_MAP,)

    # ------------------------------------------------------------------ training
    def alignment_loss(self, state: dict, fq: torch.Tensor, log_desc: torch.Tensor | None,
                       p_anomaly: torch.Tensor | None, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query -> support alignment of each episode's branch, mean over episodes.

        Descriptor branch (align_aux_Loss): the argmax of the query prediction (a tie is background)
        gives query fg/bg descriptors (the Q query images as the shots, averaged), drawn afresh for every
        support shot as the reference re-generates them inside its shot loop; they segment that shot
        through the same MLPs and decoders. Anomaly branch (alignLoss): the query prototype (pooled over
        the episode's query pixels, features upsampled with align_corners=True) segments every shot with
        the query threshold (mean over the Q query images). Unweighted NLL against the support mask
        (255 where neither 0 nor 1), mean over shots; an episode without predicted foreground adds 0.
        fq B x Q x C x h x w; log_desc B_d x Q x 2 x H x W and p_anomaly B_a x Q x H x W (each None
        without episodes of its branch). Returns (loss, B bool: no query foreground predicted).
        """
        fs, support_masks, grid = state["support"], state["support_masks"], state["grid"]
        B, S = support_masks.shape[:2]
        H, W = support_masks.shape[-2:]
        target = support_target(support_masks)
        desc, anomaly = state["episodes"]
        losses, has_fg = [], []
        if desc:
            pred = (log_desc[:, :, 1] > log_desc[:, :, 0]).to(fq.dtype)         # B_d x Q x H x W
            q_fg, q_bg = self.class_descriptors(take(fq, desc), self.to_grid(pred, grid), S)   # B_d x S x D x C
            loss = per_shot_nll(self.dual_path(take(fs, desc), q_fg, q_bg, (H, W)), take(target, desc))
            losses.append((desc, loss))
            has_fg.append((desc, pred.flatten(1).sum(1) > 0))
        if anomaly:
            fq_a = take(fq, anomaly)
            pred = predicted_foreground(p_anomaly).to(fq.dtype)
            weights = self.to_grid(pred, grid)                                  # B_a x Q x G x G
            pooled = upsample_adjoint(weights, fq.shape[-2:], align_corners=True).flatten(-2)   # B_a x Q x hw
            q_proto = torch.einsum("bqcl,bql->bc", fq_a.flatten(-2), pooled) / (
                weights.sum((1, 2, 3))[:, None] + MAP_EPS)
            t_align = take(threshold, anomaly).mean(dim=1, keepdim=True)        # B_a x 1 x 1 x 1
            p_support = upsample_bilinear(
                anomaly_fg_probability(take(fs, anomaly), q_proto, t_align, self.scaler, self.kappa),
                (H, W), align_corners=True)
            losses.append((anomaly, per_shot_nll(two_class_log_probs(p_support), take(target, anomaly))))
            has_fg.append((anomaly, pred.flatten(1).sum(1) > 0))
        has_fg = merge_episodes(B, has_fg)
        loss = merge_episodes(B, losses) * has_fg.to(fq.dtype)
        return loss.mean(), ~has_fg

    # ------------------------------------------------------------------ branch counters
    @torch.no_grad()
    def _accumulate(self, key: str, count) -> None:
        """Add to a running counter (device tensors stay on the device: no synchronisation)."""
        previous = self._counts.get(key)
        if isinstance(count, torch.Tensor) and isinstance(previous, torch.Tensor):
            previous = previous.to(count.device)
        self._counts[key] = count if previous is None else previous + count

    def branch_counts(self, reset: bool = False) -> dict[str, int]:
        """Counts since construction (or the last reset), keys `<train|eval>.<name>`: `episodes`,
        `empty_support` (episodes whose support masks were all empty: the anomaly branch), and in training
        `align.no_query_fg` (episodes whose alignment added 0). Reading synchronises."""
        counts = {k: int(v) for k, v in sorted(self._counts.items())}
        if reset:
            self._counts.clear()
        return counts
