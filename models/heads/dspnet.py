"""DSPNet head (Tang et al. 2024): the ALP head with FSPA foreground and BCMA-refined local prototypes.

Reference behaviour (../shared/reference/alpnet_dspnet.md §3), on top of models/heads/alp.py:

- **Seeds** (§3.1), computed here on the device from the full-resolution support mask: the mask
  (== 1) is resized with nearest interpolation (pixel `stride * i`, as OpenCV's INTER_NEAREST) to
  floor((H - 1) / stride + 1) cells, cropped to its bounding box; num = min(round_half_even(area
  / seed_area), max_seeds); seeds are placed only if num >= min_seeds: each one at the first
  (row-major) maximum of the Euclidean distance transform of the cropped mask (distance to the
  nearest zero cell inside the crop: the crop border is not background), after which that cell
  is zeroed. When the crop has no zero cell, SciPy's EDT measures the distance to a virtual zero
  at crop position (-1, 0), which puts the first seed of a filled rectangle on its bottom-right
  corner; this is reproduced. The reference smooths the EDT with a Gaussian of sigma 0.1, whose
  SciPy kernel has radius int(4 * 0.1 + 0.5) = 0, i.e. it is exactly the identity: it is left out.
  As the reference module does, the number of seeds used is max(#nonzero rows, #nonzero columns)
  of the 5 padded seed rows (a seed at row 0 or column 0 can be mistaken for padding).
- **FSPA** (§3.2): support-query cross attention S^_j = S_j + sum_i softmax_i(R_ji) V_i with
  R_ji = <S_j, Q_i> / (|S_j| |Q_i| + 1e-5) and, reproducing the reference's index slip, V = S
  (`cross_attention_slip: true`; false aggregates the query, V = Q); clustering of the support
  features + coordinates inside the ROI (m~ == 1) from the seeds, 10 iterations under no_grad,
  distances divided by 100, weights normalised over the pixels of each centre; fusion into one
  class prototype g = MAP(S + sum_k c_k softmax_p(<S^_p, c_k>), m~). Fallback (no seeds, and
  always in the alignment pass): the single centre g0 = MAP(S^, m~). Seeds placed but an empty
  ROI (no cell with m~ == 1: thin or striped masks): the reference's centres are sums over no
  pixel, i.e. zero, so g = MAP(S, m~), the plain masked average; reproduced.
  The prototype depends on the query (through S^), so it is computed per query image.
- **BCMA** (§3.3): on the pooled grid P (C x M, all cells of all shots), A = 1 + alpha
  T ⊙ softmax_rows(P P^T) with T the tridiagonal band (end rows: diagonal only), W = A ⊙ cal,
  P' = W P; alpha_fg for the foreground local prototypes, alpha_bg (0.2, hard-coded in the
  reference) for the background ones. `cal` is a learnable C x C parameter initialised to the
  (w1, w2, w3) band with identity end rows, trained with lr x `cal_lr_multiplier` (1e-4).

Reference bugs that change numbers, each a head option:

- `reset_cal_at_eval: true` (reference): the reference loads its checkpoint before `cal` exists,
  so evaluation always runs with the initial band. `cal` is still saved and loaded with the
  state dict; false evaluates with the trained `cal`.
- `cross_attention_slip: true` (reference): see FSPA above; false is the textbook cross attention.
- The reference also places seeds in the alignment pass from a 3-D mask (garbage seeds under
  OpenCV 4, an exception under OpenCV 5). They are never used: the alignment pass always takes
  the FSPA fallback branch. No option: the seeds are simply not computed there.

Support state (models/heads/contract.py, on top of ALPNet's): the seeds, the clustered centres
(the clustering reads the support features, the ROI and the seeds only), the branch each shot
takes (clustered / no seeds / empty ROI), the BCMA-refined local prototypes, the support's masked
average MAP(S, m~) and its feature norms for the cross attention. What involves the query, the
cross attention S^, the fallback centre g0 and the fusion into g, is computed per query image in
`segment`. The branch counters (`fspa_clustered`, `fspa_roi_empty`, per shot) count per
prediction as ALPNet's.

Shots: the reference is 1-shot only. With S > 1 every shot gets its own seeds, centres and FSPA
prototype; 'gridconv+' adds one prototype per shot and 'mask' mode averages them (the ALPNet rule;
the reference's un-averaged 'mask' prototype only works for S = 1, where both agree).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from models.heads.alp import ALPNetHead
from models.heads.common import masked_average_pool_lowres, number_option


# ----------------------------------------------------------------------------- seeds
def seed_grid_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The reference's int((H - 1) / stride + 1) cells per axis."""
    return tuple((int(n) - 1) // int(stride) + 1 for n in size)


@torch.no_grad()
def place_seeds(masks: torch.Tensor, stride: int = 8, max_seeds: int = 5, seed_area: float = 100.0,
                min_seeds: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """ASGNet / DSPNet seed placement on the device (vectorised over all masks).

    Args:
        masks: ... x H x W support masks (foreground = value 1).
        stride: downsampling stride of the seed grid (8).
        max_seeds: at most this many seeds (5).
        seed_area: grid cells per seed (100).
        min_seeds: seeds are placed only if the count reaches this (2).
    Returns:
        (seeds ... x max_seeds x 2 int64 (row, col) on the seed grid, zero rows as padding;
         placed ... int64, the number of seeds placed: 0 or min_seeds..max_seeds).
    """
    lead, (H, W) = masks.shape[:-2], masks.shape[-2:]
    gh, gw = seed_grid_size((H, W), stride)
    n = gh * gw
    device = masks.device
    flat = (masks.reshape(-1, 1, H, W) == 1).float()
    G = flat.shape[0]
    # torch's 'nearest' samples source pixel floor(i * H / gh), as OpenCV's INTER_NEAREST
    down = nn.functional.interpolate(flat, size=(gh, gw), mode="nearest")[:, 0] > 0.5     # G x gh x gw
    rows_any, cols_any = down.any(2), down.any(1)
    ar, ac = torch.arange(gh, device=device), torch.arange(gw, device=device)
    r0 = torch.where(rows_any, ar, gh).amin(1)
    c0 = torch.where(cols_any, ac, gw).amin(1)
    r1 = torch.where(rows_any, ar, -1).amax(1)
    c1 = torch.where(cols_any, ac, -1).amax(1)
    pr, pc = ar.repeat_interleave(gw), ac.repeat(gh)                                    # N (row-major)
    in_crop = ((pr >= r0[:, None]) & (pr <= r1[:, None]) & (pc >= c0[:, None]) & (pc <= c1[:, None]))  # G x N
    area = down.flatten(1).sum(1).float()            # every foreground cell is inside its bounding box
    count = torch.round(area / float(seed_area)).clamp(max=max_seeds).long()   # half to even, as NumPy
    count = torch.where(count >= min_seeds, count, torch.zeros_like(count))

    # squared distances between grid cells (exact small integers), and to SciPy's virtual zero
    d2 = ((pr[:, None] - pr[None, :]) ** 2 + (pc[:, None] - pc[None, :]) ** 2).float()   # N x N
    virtual = ((pr[None] - (r0[:, None] - 1)) ** 2 + (pc[None] - c0[:, None]) ** 2).float()  # G x N
    roi = down.flatten(1).clone()
    seeds = torch.zeros(G, max_seeds, 2, dtype=torch.long, device=device)
    for i in range(max_seeds):
        zero = in_crop & ~roi
        nearest = d2[None].masked_fill(~zero[:, None, :], float("inf")).amin(-1)      # G x N
        dist2 = torch.where(zero.any(1, keepdim=True), nearest, virtual)
        value = torch.where(roi, dist2, torch.zeros_like(dist2))
        value = torch.where(in_crop, value, torch.full_like(value, -1.0))
        idx = value.argmax(1)                                            # first maximum, row-major
        take = i < count
        seeds[:, i, 0] = torch.where(take, idx // gw, 0)
        seeds[:, i, 1] = torch.where(take, idx % gw, 0)
        roi = roi & ~((torch.arange(n, device=device) == idx[:, None]) & take[:, None])   # no one_hot: no sync
    return seeds.reshape(*lead, max_seeds, 2), count.reshape(lead)


def band_matrix(n: int, lower: float, diag: float, upper: float) -> torch.Tensor:
    """n x n band with (lower, diag, upper) on rows 1..n-2 and identity first and last rows."""
    m = (torch.diag(torch.full((n,), float(diag))) + torch.diag(torch.full((n - 1,), float(lower)), -1)
         + torch.diag(torch.full((n - 1,), float(upper)), 1))
    m[0], m[-1] = 0.0, 0.0
    m[0, 0], m[-1, -1] = 1.0, 1.0
    return m


# ----------------------------------------------------------------------------- the head
class DSPNetHead(ALPNetHead):
    """ALP head with FSPA (clustered, fused foreground prototype) and BCMA (banded channel attention).

    forward: as `ALPNetHead` (log_probs B x Q x 2 x H x W, aux_losses {"align"} in training).

    Args (besides the `ALPNetHead` ones):
        alpha_fg: BCMA alpha of the foreground local prototypes (README: 0.3 setting 1, 0.2 setting 2).
        alpha_bg: BCMA alpha of the background local prototypes (0.2, hard-coded in the reference).
        w: (w1, w2, w3), the initial band of `cal`.
        channels: feature channels C (the size of `cal`): filled by build_model from the encoder
            ({"out": 256} for deeplab_r101), not a config key; an int when built by hand.
        learn_cal: train `cal` (the reference does, at lr x 1e-4).
        cal_lr_multiplier: learning-rate factor of `cal` (1e-4).
        reset_cal_at_eval: evaluate with the initial band (the reference's load-order bug).
        cross_attention_slip: aggregate support features in the cross attention (the reference's slip).
        attention_eps: eps added to the norm product of the cross-attention cosine (1e-5).
        cluster_iters: clustering iterations (10).
        cluster_feature_scale, cluster_spatial_scale: divisors of the squared feature and
            coordinate distances (100, 100).
        seed_stride, max_seeds, seed_area, min_seeds: seed placement (8, 5, 100, 2).
    """

    def __init__(self, scaler: float = 20.0, window: int = 4, val_window: int = 2, mode_window: int = 4,
                 fg_thresh: float = 0.95, bg_thresh: float = 0.95, norm_eps: float = 1e-4,
                 cos_eps: float = 1e-4, map_eps: float = 1e-5, align: bool = True,
                 alpha_fg: float = 0.3, alpha_bg: float = 0.2, w=(0.2, 0.8, 0.2),
                 channels: int | Mapping[str, int] = 256,
                 learn_cal: bool = True, cal_lr_multiplier: float = 1e-4, reset_cal_at_eval: bool = True,
                 cross_attention_slip: bool = True, attention_eps: float = 1e-5, cluster_iters: int = 10,
                 cluster_feature_scale: float = 100.0, cluster_spatial_scale: float = 100.0,
                 seed_stride: int = 8, max_seeds: int = 5, seed_area: float = 100.0, min_seeds: int = 2):
        super().__init__(scaler=scaler, window=window, val_window=val_window, mode_window=mode_window,
                         fg_thresh=fg_thresh, bg_thresh=bg_thresh, norm_eps=norm_eps, cos_eps=cos_eps,
                         map_eps=map_eps, align=align)
        w = tuple(number_option("w", v) for v in w)
        if len(w) != 3:
            raise ValueError(f"head.w must be three numbers (w1, w2, w3), got {w}")
        if isinstance(channels, Mapping):     # the encoder's {map: C} (build_model)
            channels = channels[self.feature_maps[0]]
        if int(channels) < 3:
            raise ValueError(f"head.channels must be >= 3, got {channels}")
        self.alpha_fg, self.alpha_bg = number_option("alpha_fg", alpha_fg), number_option("alpha_bg", alpha_bg)
        self.w = w
        self.channels = int(channels)
        self.reset_cal_at_eval = bool(reset_cal_at_eval)
        self.cross_attention_slip = bool(cross_attention_slip)
        self.attention_eps = number_option("attention_eps", attention_eps, 0, low_open=True)
        self.cluster_iters = number_option("cluster_iters", cluster_iters, 0, whole=True)
        # divisors of the squared distances
        self.cluster_feature_scale = number_option("cluster_feature_scale", cluster_feature_scale, 0, low_open=True)
        self.cluster_spatial_scale = number_option("cluster_spatial_scale", cluster_spatial_scale, 0, low_open=True)
        self.seed_stride = number_option("seed_stride", seed_stride, 1, whole=True)
        self.max_seeds = number_option("max_seeds", max_seeds, 1, whole=True)
        self.seed_area = number_option("seed_area", seed_area, 0, low_open=True)       # area / seed_area seeds
        # seeds are placed only if their count reaches min_seeds, and there are at most max_seeds
        self.min_seeds = number_option("min_seeds", min_seeds, 1, self.max_seeds, whole=True)
        initial = band_matrix(self.channels, *w)
        self.cal = nn.Parameter(initial.clone(), requires_grad=bool(learn_cal))
        # buffers, not state: both follow from the options (non-persistent keeps checkpoints to `cal`)
        self.register_buffer("cal_init", initial, persistent=False)
        self.register_buffer("band", band_matrix(self.channels, 1.0, 1.0, 1.0), persistent=False)
        # parameter-name fragment -> lr factor (contract.HasLrMultipliers, make_optimizer); "head.cal" rather
        # than "cal", which the encoder's names could contain (e.g. a "localconv")
        self.lr_multipliers = {"head.cal": number_option("cal_lr_multiplier", cal_lr_multiplier, 0)}

    # ------------------------------------------------------------------ BCMA
    def current_cal(self) -> torch.Tensor:
        return self.cal_init if (not self.training and self.reset_cal_at_eval) else self.cal

    def refine_cells(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BCMA on the pooled grid: B x M x C -> (fg cells with alpha_fg, bg cells with alpha_bg)."""
        if cells.shape[-1] != self.channels:
            raise ValueError(f"the features have {cells.shape[-1]} channels but head.channels is {self.channels} "
                             f"(build_model takes it from the encoder)")
        P = cells.transpose(1, 2)                                                   # B x C x M
        attention = self.band * torch.softmax(P @ P.transpose(1, 2), dim=-1)        # T ⊙ softmax_rows(P P^T)
        cal = self.current_cal()
        fg = (cal * (1.0 + self.alpha_fg * attention)) @ P
        bg = (cal * (1.0 + self.alpha_bg * attention)) @ P
        return fg.transpose(1, 2), bg.transpose(1, 2)

    # ------------------------------------------------------------------ FSPA
    def support_context(self, support_masks: torch.Tensor, feature_size: tuple[int, int]):
        grid = seed_grid_size(support_masks.shape[-2:], self.seed_stride)
        if grid != tuple(feature_size):
            raise ValueError(f"the seed grid of a {tuple(support_masks.shape[-2:])} mask with head.seed_stride="
                             f"{self.seed_stride} is {grid} but the features are {tuple(feature_size)}; "
                             f"set head.seed_stride to the encoder's output stride")
        seeds, placed = place_seeds(support_masks, self.seed_stride, self.max_seeds, self.seed_area,
                                    self.min_seeds)
        # the reference module counts max(#nonzero rows, #nonzero cols) and uses the first ones
        n_used = torch.maximum((seeds[..., 0] != 0).sum(-1), (seeds[..., 1] != 0).sum(-1))   # B x S
        return seeds, n_used, placed

    def cross_attention(self, support: torch.Tensor, query: torch.Tensor,
                        support_norms: torch.Tensor | None = None) -> torch.Tensor:
        """S^ = S + attention-weighted sum of features (see the module docstring).

        Args:
            support: B x S x C x N; query: B x Q x C x N;
            support_norms: support.norm(dim=2), B x S x N, if already computed (a support state's).
        Returns:
            B x Q x S x C x N.
        """
        if support_norms is None:
            support_norms = support.norm(dim=2)
        dots = torch.einsum("bscn,bqcm->bqsnm", support, query)
        norms = support_norms[:, None, :, :, None] * query.norm(dim=2)[:, :, None, None, :]
        attention = torch.softmax(dots / (norms + self.attention_eps), dim=-1)     # over query positions
        if self.cross_attention_slip:
            mixed = torch.einsum("bqsnm,bscm->bqscn", attention, support)
        else:
            mixed = torch.einsum("bqsnm,bqcm->bqscn", attention, query)
        return support[:, None] + mixed

    @torch.no_grad()
    def cluster_centres(self, support: torch.Tensor, fg_masks: torch.Tensor,
                        seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft clustering of the ROI (m~ == 1) from the seeds (`sp_center_iter`).

        Args:
            support: B x S x C x h x w; fg_masks: B x S x h x w; seeds: B x S x K x 2 (row, col).
        Returns:
            (centres B x S x K x C, roi_any B x S).
        """
        B, S, C, h, w = support.shape
        K, n = seeds.shape[2], h * w
        device = support.device
        rows = torch.arange(h, device=device, dtype=support.dtype).repeat_interleave(w)
        cols = torch.arange(w, device=device, dtype=support.dtype).repeat(h)
        feats = torch.cat([support.reshape(B * S, C, n),
                           rows.expand(B * S, 1, n), cols.expand(B * S, 1, n)], dim=1)    # G x (C+2) x N
        index = (seeds[..., 0] * w + seeds[..., 1]).reshape(B * S, 1, K)
        centres = feats.gather(2, index.expand(-1, C + 2, -1))                        # G x (C+2) x K
        roi = fg_masks.reshape(B * S, n) == 1
        roi_any = roi.any(1)
        # an empty ROI would give 0/0; its rows get uniform weights and the caller ignores them
        outside = ~(roi | ~roi_any[:, None])
        for _ in range(self.cluster_iters):
            diff2 = (feats[..., None] - centres[:, :, None, :]) ** 2                 # G x (C+2) x N x K
            dist = torch.sqrt(diff2[:, :C].sum(1) / self.cluster_feature_scale
                              + diff2[:, C:].sum(1) / self.cluster_spatial_scale)     # G x N x K
            # exp(-d) / sum_ROI exp(-d) as a softmax over the ROI pixels (no underflow to 0/0)
            weights = torch.softmax((-dist).masked_fill(outside[..., None], float("-inf")), dim=1)
            centres = torch.einsum("gcn,gnk->gck", feats, weights)
        return centres[:, :C].transpose(1, 2).reshape(B, S, K, C), roi_any.reshape(B, S)

    def foreground_support(self, support: torch.Tensor, fg_masks: torch.Tensor, context,
                           alignment: bool) -> tuple[dict, dict]:
        """The support's part of FSPA: seeds' centres and branches, MAP(S, m~), norms.

        Args:
            support: B x S x C x h x w; fg_masks: B x S x h x w; context: `support_context`'s
                (seeds, n_used, placed), None in the alignment pass; alignment: True there.
        Returns:
            ({"support": B x S x C x N, "support_norms": B x S x N, "mask": B x S x N,
              "denom": B x S, "base": B x S x C, "clusters": B x S x K x C clustered centres or
              None (alignment pass), "clustered", "roi_empty": B x S, "valid": B x S x K the
              centres used}, extras {"fspa_clustered", and with seeds "n_seeds", "fspa_roi_empty"}).
        """
        B, S = support.shape[:2]
        K, device = self.max_seeds, support.device
        s_flat = support.flatten(3)                                                   # B x S x C x N
        m = fg_masks.flatten(2)                                                       # B x S x N
        slot0 = torch.zeros(K, dtype=torch.bool, device=device)
        slot0[0] = True
        extras = {}
        if alignment or context is None:
            clusters, valid = None, slot0.expand(B, S, K)
            clustered = roi_empty = torch.zeros(B, S, dtype=torch.bool, device=device)
        else:
            seeds, n_used, placed = context
            clusters, roi_any = self.cluster_centres(support, fg_masks, seeds)        # B x S x K x C
            clustered = (n_used > 0) & roi_any
            # seeds placed but no cell fully inside the mask (thin or striped masks): the reference's
            # clustering sums over an empty ROI, so its centres are zero and g = MAP(S, m~)
            roi_empty = (n_used > 0) & ~roi_any
            seed_valid = torch.arange(K, device=device) < n_used[..., None]          # B x S x K
            valid = torch.where(clustered[..., None], seed_valid, slot0.expand(B, S, K))
            extras = {"n_seeds": placed, "fspa_roi_empty": roi_empty}
        extras["fspa_clustered"] = clustered
        state = {"support": s_flat, "support_norms": s_flat.norm(dim=2), "mask": m,
                 "denom": m.sum(-1) + self.map_eps,
                 "base": masked_average_pool_lowres(support, fg_masks, eps=self.map_eps),
                 "clusters": clusters, "clustered": clustered, "roi_empty": roi_empty, "valid": valid}
        return state, extras

    def foreground_for_queries(self, state: dict, query: torch.Tensor) -> torch.Tensor:
        """FSPA prototype of every shot for every query: B x Q x S x C (see the module docstring)."""
        s_flat, m, denom = state["support"], state["mask"], state["denom"]
        B, S, C = s_flat.shape[:3]
        Q, K = query.shape[1], state["valid"].shape[-1]
        refined = self.cross_attention(s_flat, query.flatten(3), state["support_norms"])   # B x Q x S x C x N
        g0 = torch.einsum("bqscn,bsn->bqsc", refined, m) / denom[:, None, :, None]    # fallback centre
        centres = torch.cat([g0[..., None, :], g0.new_zeros(B, Q, S, K - 1, C)], dim=3)
        if state["clusters"] is not None:
            use = state["clustered"][:, None, :, None, None]
            centres = torch.where(use, state["clusters"][:, None].expand(-1, Q, -1, -1, -1), centres)
            centres = centres.masked_fill(state["roi_empty"][:, None, :, None, None], 0.0)
        # E_k = softmax_p <S^_p, c_k>; g = MAP(S, m) + sum_k c_k (sum_p m_p E_kp) / (sum_p m_p + eps)
        attention = torch.softmax(torch.einsum("bqscn,bqskc->bqskn", refined, centres), dim=-1)
        mass = torch.einsum("bqskn,bsn->bqsk", attention, m) / denom[:, None, :, None]
        mass = mass * state["valid"][:, None].to(mass.dtype)
        return state["base"][:, None] + torch.einsum("bqsk,bqskc->bqsc", mass, centres)
