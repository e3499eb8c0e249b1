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

Randomness (the fill draws and both dropouts) comes from the torch CPU generator, which the trainer
saves in its resume points, so a resumed run draws what the uninterrupted run would have drawn; the
draws are moved to the inputs' device (no CUDA generator, no host synchronisation).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads.adnet import anomaly_fg_probability
from models.heads.common import (
    EPS_FLOAT32,
    HeadOutput,
    cpu_dropout,
    dilate,
    erode,
    number_option,
    per_shot_nll,
    support_target,
    two_class_log_probs,
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


# ----------------------------------------------------------------------------- modules
class DescriptorMLP(nn.Module):
    """The reference MLP: Linear(P -> K), Dropout(p), Linear(K -> K), applied to every channel's
    flattened map. ... x C x P -> ... x K x C (one matmul over all channels)."""

    def __init__(self, n_pixels: int, n_descriptors: int, dropout: float):
        super().__init__()
        self.spatial = nn.Linear(n_pixels, n_descriptors)
        self.mix = nn.Linear(n_descriptors, n_descriptors)
        self.dropout = float(dropout)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.mix(cpu_dropout(self.spatial(maps), self.dropout, self.training)).transpose(-1, -2)


class AffinityDecoder(nn.Module):
    """The reference Decoder (no biases): 1x1 conv (K+2 -> K) + ReLU; residual block of two 3x3 convs
    (K -> K, ReLU each) added to its input; 3x3 conv K -> 100 + ReLU + Dropout2d(p) + 1x1 conv 100 -> 1.
    N x (K+2) x h x w -> N x h x w logits."""

    def __init__(self, n_descriptors: int, dropout: float):
        super().__init__()
        k = n_descriptors
        self.reduce = nn.Conv2d(k + 2, k, kernel_size=1, bias=False)
        self.res1 = nn.Conv2d(k, k, kernel_size=3, padding=1, bias=False)
        self.res2 = nn.Conv2d(k, k, kernel_size=3, padding=1, bias=False)
        self.hidden = nn.Conv2d(k, DECODER_HIDDEN, kernel_size=3, padding=1, bias=False)
        self.logit = nn.Conv2d(DECODER_HIDDEN, 1, kernel_size=1, bias=False)
        self.dropout = float(dropout)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.reduce(maps))
        x = F.relu(self.res2(F.relu(self.res1(x)))) + x
        x = F.relu(self.hidden(x))
        x = cpu_dropout(x, self.dropout, self.training, shape=(*x.shape[:2], 1, 1))
        return self.logit(x)[:, 0]


def dual_path_log_probs(fg_logit: torch.Tensor, bg_logit: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Both logit maps upsampled (bilinear, align_corners=True), softmax over [bg, fg], then the log of the
    probabilities clamped to [eps, 1 - eps] as the reference's loss takes them. ... x h x w -> ... x 2 x H x W.
    (The softmax is taken as such: 1 - sigmoid(fg - bg) would lose precision near the clamp.)"""
    logits = torch.stack([upsample_bilinear(bg_logit, size, align_corners=True),
                          upsample_bilinear(fg_logit, size, align_corners=True)], dim=-3)
    return torch.log(torch.softmax(logits, dim=-3).clamp(EPS_FLOAT32, 1.0 - EPS_FLOAT32))


# ----------------------------------------------------------------------------- the head
class GMRDHead(nn.Module):
    """Multiple representative descriptors, affinity maps and dual-path decoders (GMRD).

    forward(support {"layer3": B x S x C x h x w, ...}, support_masks B x S x H x W,
            query {"layer3": B x Q x C x h x w, "threshold": B x Q x 1})
        -> HeadOutput(log_probs B x Q x 2 x H x W, aux_losses {"align"} in training,
                      extras {"empty_support": B bool (the anomaly branch), "n_descriptors": (fg, bg)})

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
        fast: draw the random fill once per head call; by default (False) each query slice gets its own
            draw of the support descriptors, as the reference, which calls the model once per slice.
        align: add the alignment loss in training.
    """

    feature_maps = (FEATURE_MAP, "threshold")

    def __init__(self, image_size: int = 256, resize_grid: bool = False, n_fg: int = 100, n_bg: int = 600,
                 scaler: float = 20.0, kappa: float = 0.5, mlp_dropout: float = 0.2, decoder_dropout: float = 0.1,
                 bg_edge: str = "reference", fast: bool = False, align: bool = True):
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
        self.fast, self.align = bool(fast), bool(align)
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
        pooled = upsample_adjoint(weights, features.shape[-2:], align_corners=True).flatten(-2)
        return torch.einsum("...cl,...l->...c", features.flatten(-2), pooled) / (
            weights.flatten(-2).sum(-1, keepdim=True) + MAP_EPS)

    # ------------------------------------------------------------------ descriptors
    def descriptors(self, features: torch.Tensor, region: torch.Tensor, edge: torch.Tensor, mlp: DescriptorMLP,
                    draws: int) -> torch.Tensor:
        """K + 2 descriptors of one class, averaged over the N shots, for `draws` independent fills.

        features: B x N x C x P (upsampled to the G x G grid, P = G * G); region, edge: B x N x P (the
        class's mask and edge weights on the grid) -> B x draws x (K + 2) x C: [K generated, plain
        prototype, edge prototype]. The MLP reads each filled map as one (C x P) @ (P x K) product.
        """
        B, N, C, P = features.shape
        weights = torch.stack([region, edge], dim=2)                            # B x N x 2 x P
        fixed = torch.einsum("bncp,bnsp->bnsc", features, weights) / (weights.sum(-1, keepdim=True) + MAP_EPS)
        keys = torch.rand(B, draws, N, P, dtype=torch.float64).to(features.device)   # the CPU generator
        index, nonempty = fill_sources(region[:, None].expand(B, draws, N, P).reshape(-1, P), keys.view(-1, P))
        index = index.view(B, draws, N, 1, P).expand(B, draws, N, C, P)
        filled = torch.gather(features[:, None].expand(B, draws, N, C, P), -1, index)
        filled = filled * nonempty.view(B, draws, N, 1, 1).to(filled.dtype)   # an empty region: zeros
        generated = mlp(filled)                                                 # B x draws x N x K x C
        return torch.cat([generated, fixed[:, None].expand(B, draws, N, 2, C)], dim=-2).mean(dim=2)

    def class_descriptors(self, features: torch.Tensor, masks: torch.Tensor, draws: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """features B x N x C x h x w, masks B x N x G x G (on the grid)
        -> (fg B x draws x (n_fg + 2) x C, bg B x draws x (n_bg + 2) x C).
        The features are upsampled (bilinear, align_corners=True) to the grid, as the reference."""
        up = upsample_bilinear(features, tuple(masks.shape[-2:]), align_corners=True).flatten(-2)
        fg_edge, bg_edge = edge_masks(masks, self.bg_edge)
        fg = self.descriptors(up, masks.flatten(-2), fg_edge.flatten(-2), self.fg_mlp, draws)
        bg = self.descriptors(up, (1.0 - masks).flatten(-2), bg_edge.flatten(-2), self.bg_mlp, draws)
        return fg, bg

    @staticmethod
    def affinity_logits(features: torch.Tensor, descriptors: torch.Tensor, decoder: AffinityDecoder) -> torch.Tensor:
        """Cosine of every feature with every descriptor, decoded to one logit map.

        features: B x N x C x h x w; descriptors: B x R x D x C with R = N (one set per image) or 1
        (shared) -> B x N x h x w. Normalised as F.normalize (eps 1e-12) on both sides, as the reference
        (each path normalises the features itself, as the reference: one shared normalisation would
        change the gradients' rounding).
        """
        B, N = features.shape[:2]
        d = F.normalize(descriptors, dim=-1).expand(B, N, *descriptors.shape[2:])
        maps = torch.einsum("bnchw,bndc->bndhw", F.normalize(features, dim=2), d)
        return decoder(maps.flatten(0, 1)).view(B, N, *features.shape[-2:])

    def dual_path(self, features: torch.Tensor, fg_desc: torch.Tensor, bg_desc: torch.Tensor,
                  size: tuple[int, int]) -> torch.Tensor:
        """The descriptor path's prediction for `features` (B x N x C x h x w) -> B x N x 2 x H x W log-probs."""
        return dual_path_log_probs(self.affinity_logits(features, fg_desc, self.fg_decoder),
                                   self.affinity_logits(features, bg_desc, self.bg_decoder), size)

    # ------------------------------------------------------------------ forward
    def forward(self, support: dict, support_masks: torch.Tensor, query: dict) -> HeadOutput:
        fs, fq = support[FEATURE_MAP], query[FEATURE_MAP]
        B, S = fs.shape[:2]
        Q = fq.shape[1]
        size = tuple(support_masks.shape[-2:])
        grid = self.grid_size(size)
        threshold = image_thresholds(query, B, Q)                               # B x Q x 1 x 1
        masks_grid = self.to_grid(support_masks, grid)                          # B x S x G x G
        empty = support_masks.flatten(1).sum(1) == 0                            # B: the anomaly branch

        # descriptor path: one draw per query slice (the reference's one call per slice) unless fast
        fg_desc, bg_desc = self.class_descriptors(fs, masks_grid, 1 if self.fast else Q)
        log_desc = self.dual_path(fq, fg_desc, bg_desc, size)
        # anomaly path (taken when every support mask of the episode is empty)
        prototype = self.grid_average(fs, masks_grid).mean(dim=1)              # B x C (zero when empty)
        p_anomaly = upsample_bilinear(anomaly_fg_probability(fq, prototype, threshold, self.scaler, self.kappa),
                                      size, align_corners=True)                 # B x Q x H x W
        log_probs = torch.where(empty.view(B, 1, 1, 1, 1), two_class_log_probs(p_anomaly), log_desc)

        out = HeadOutput(log_probs, extras={"empty_support": empty,
                                            "n_descriptors": (fg_desc.shape[-2], bg_desc.shape[-2])})
        phase = "train" if self.training else "eval"
        self._accumulate(f"{phase}.episodes", B)
        self._accumulate(f"{phase}.empty_support", empty.sum())
        if self.training and self.align:
            loss, no_fg = self.alignment_loss(fs, support_masks, fq, grid, log_desc, p_anomaly, threshold, empty)
            out.aux_losses["align"] = loss
            out.extras["align_no_query_fg"] = no_fg
            self._accumulate(f"{phase}.align.no_query_fg", no_fg.sum())
        return out

    # ------------------------------------------------------------------ training
    def alignment_loss(self, fs: torch.Tensor, support_masks: torch.Tensor, fq: torch.Tensor,
                       grid: tuple[int, int], log_desc: torch.Tensor, p_anomaly: torch.Tensor,
                       threshold: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query -> support alignment of each episode's branch, mean over episodes.

        Descriptor branch (align_aux_Loss): the argmax of the query prediction (a tie is background)
        gives query fg/bg descriptors (the Q query images as the shots, averaged), drawn afresh for every
        support shot as the reference re-generates them inside its shot loop; they segment that shot
        through the same MLPs and decoders. Anomaly branch (alignLoss): the query prototype (pooled over
        the episode's query pixels, features upsampled with align_corners=True) segments every shot with
        the query threshold (mean over the Q query images). Unweighted NLL against the support mask
        (255 where neither 0 nor 1), mean over shots; an episode without predicted foreground adds 0.
        Returns (loss, B bool: no query foreground predicted).
        """
        B, S = support_masks.shape[:2]
        H, W = support_masks.shape[-2:]
        target = support_target(support_masks)

        pred_desc = (log_desc[:, :, 1] > log_desc[:, :, 0]).to(fq.dtype)      # B x Q x H x W
        q_fg, q_bg = self.class_descriptors(fq, self.to_grid(pred_desc, grid), S)   # B x S x D x C
        loss_desc = per_shot_nll(self.dual_path(fs, q_fg, q_bg, (H, W)), target)

        pred_anomaly = predicted_foreground(p_anomaly).to(fq.dtype)
        weights = self.to_grid(pred_anomaly, grid)                              # B x Q x G x G
        pooled = upsample_adjoint(weights, fq.shape[-2:], align_corners=True).flatten(-2)   # B x Q x hw
        q_proto = torch.einsum("bqcl,bql->bc", fq.flatten(-2), pooled) / (weights.sum((1, 2, 3))[:, None] + MAP_EPS)
        t_align = threshold.mean(dim=1, keepdim=True)                           # B x 1 x 1 x 1
        p_support = upsample_bilinear(anomaly_fg_probability(fs, q_proto, t_align, self.scaler, self.kappa),
                                      (H, W), align_corners=True)
        loss_anomaly = per_shot_nll(two_class_log_probs(p_support), target)

        pred = torch.where(empty.view(B, 1, 1, 1), pred_anomaly, pred_desc)
        has_fg = pred.flatten(1).sum(1) > 0
        loss = torch.where(empty, loss_anomaly, loss_desc) * has_fg.to(loss_desc.dtype)
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
