"""RPT head (Zhu et al., MICCAI 2023): Region-enhanced Prototypical Transformer on Q-Net's encoder.

Reference behaviour (YazhouZhu19/RPT models/fewshot.py, models/attention.py; docs/rpt.md):

- features: the ``qnet_r101`` encoder's ``layer3`` map (512 x H/4 x W/4) and its per-image
  ``threshold`` T (the query's for the query, the support's for the periphery loss);
- support prototype p: masked average of the support features upsampled to the mask, mean over shots;
- regional prototypes: the support mask resized to the feature grid (bilinear, align_corners=False,
  then > 0), cut into `fg_num` regions by farthest-point sampling of centres on the mask's cells (the
  first centre drawn at random: see "Randomness"), each cell joining its nearest centre; a region's
  prototype is the mean feature of its cells. A mask of fewer than `fg_num` cells is padded, as the
  reference does, with the first `fg_num` cells of the flattened grid (the image's top rows);
- coarse query prediction with p (ADNet's anomaly form 1 - sigmoid(kappa (-S cos - T_q))), coarse
  query prototype = masked average of the query features weighted by that soft prediction at feature
  resolution; then `iterations` times: regions <- BATE(regions, query prototype) (the output is fed
  back), support prototype = mean of the regions + p, new query prediction and query prototype;
- BATE: A = R q^T (one score per region), k_c = floor((min A + mean A) / 2), regions with A < k_c get
  -10000, softmax over the regions, R' = LayerNorm(softmax(A) q + R), then one multi-head
  self-attention block over the regions and one MLP block (one set of weights, applied every time);
- output: the final foreground probability upsampled (bilinear, align_corners=True), log [1 - P, P];
- training losses (weights loss.weights.<name>): ``periphery`` (the support's periphery ring, dilated
  mask minus mask, predicted as P(dilated prototype) - P(mask prototype) on the support with the
  support's threshold), ``align`` (Q-Net/ADNet query -> support alignment with the query threshold),
  ``proto_mse`` (MSE between the prototype of the predicted query foreground and p) and
  ``query_prototype`` (the prototype of the query's labelled foreground segments the query; needs
  `query_labels`, so only in training). No test-time refinement: the released forward has none.

Randomness. Each (episode, query image, shot) draws its first centre as the reference's
``RandomState.choice(n_cells)``. In training the draw comes from NumPy's global RandomState, which the
trainer seeds and saves in every resume point (exact resume; a buffer of the head would be missing
from the reference's checkpoints, which must load strictly). In evaluation it comes from a private
RandomState(`fps_seed`) reset whenever the head enters eval mode: the reference's test.py builds a
fresh model (its stream at 1289) and calls it once per query slice, so one draw per query slice, in
order, consumes the stream as the reference does. Dropout (training only) draws its masks from
torch's CPU generator (saved by the trainer), never from a CUDA generator.

Support state. Every draw is per query image (one per episode, query image and shot), none per call,
so the draws and the regions they start belong to `segment`; `prepare_support` keeps what does not
depend on the query (p, the support features, the padded mask cells and their counts on the host).
Evaluation before the support state called forward once per query batch; it now calls segment once
per query batch with the same state: the same draws from the same stream in the same order, so the
same predictions. forward is prepare_support then segment's prediction, so they cannot drift.

Shapes: B episodes, S shots, Q query images, C channels, h x w feature cells, H x W pixels, K = fg_num
regions, N = B Q S region sets.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads.common import (
    HeadOutput,
    cpu_dropout,
    dilate,
    episode_nll,
    masked_average_pool,
    masked_average_pool_lowres,
    number_option,
    per_shot_nll,
    support_target,
    two_class_log_probs,
    upsample_bilinear,
)
from models.heads.qnet import (
    QNET_ENCODER_RULES,
    QNET_SIGNATURE,
    QNetHead,
    episode_prototype,
    image_thresholds,
    predicted_foreground,
)
from models.heads.reference_format import ReferenceFormat

MAP_EPS = 1e-5                 # the references' denominator guard in masked average pooling
SELECTION_PENALTY = -10000.0   # BATE: added to the scores of the regions below k_c
FEATURE_MAP = "layer3"

# Reference checkpoints (YazhouZhu19/RPT, `torch.save(model.state_dict())`, plain keys), loaded by
# models/engine/reference_checkpoints.py: Q-Net's encoder (reduce2 unused, still saved) plus the
# transformer of models/attention.py.
REFERENCE_CHECKPOINT = ReferenceFormat(
    title="RPT (YazhouZhu19/RPT)", method="rpt",
    rules=QNET_ENCODER_RULES + (
           ("MHA.w_qs.", "head.attention.w_q."),
           ("MHA.w_ks.", "head.attention.w_k."),
           ("MHA.w_vs.", "head.attention.w_v."),
           ("MHA.fc.", "head.attention.fc."),
           ("MHA.layer_norm.", "head.attention.norm."),
           ("MLP.mlp.0.", "head.mlp.fc1."),
           ("MLP.mlp.2.", "head.mlp.fc2."),
           ("MLP.norm.", "head.mlp.norm."),
           ("layer_norm.", "head.norm.")),
    signature=QNET_SIGNATURE | {"MHA.w_qs.weight"},
)


# ----------------------------------------------------------------------------- regional prototypes
def feature_grid_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """... x H x W masks -> ... x h x w bool: bilinear resize (align_corners=False), then nonzero.

    A cell is foreground when any mask pixel its bilinear sample touches is (the reference's
    `F.interpolate(..., mode='bilinear').bool()`)."""
    return upsample_bilinear(masks.float(), size, align_corners=False) != 0


def padded_points(cells: torch.Tensor, fg_num: int) -> torch.Tensor:
    """N x (h w) bool mask cells -> the cells the regions are built on, N x (h w) bool.

    As the reference: a mask of fewer than fg_num cells gets the first fg_num cells of the flattened
    grid (row-major: the image's top rows) switched on too, so there are at least fg_num points
    whenever the grid has that many cells."""
    short = cells.sum(dim=1) < fg_num
    head = torch.zeros_like(cells)
    head[:, :fg_num] = True
    return cells | (head & short[:, None])


def farthest_point_centres(points: torch.Tensor, first: torch.Tensor, width: int, k: int) -> torch.Tensor:
    """Farthest-point sampling of k centres among the points of each set.

    points: N x (h w) bool (row-major grid of `width` columns); first: N long, the index of the
    first centre *among the points* (in row-major order, the reference's `pts[i]`)
    -> N x k long grid indices of the centres.

    Each further centre is the point whose squared distance to its nearest centre is largest, the
    first such point in row-major order on ties (torch.argmax), exactly as the reference. Once every
    point is a centre (fewer points than k: only when the grid itself has fewer than k cells) the
    distances are all 0 and the first point repeats, as in the reference.
    """
    coords = grid_coordinates(points.shape[1], width, points.device)               # (h w) x 2
    rank = points.long().cumsum(dim=1) - 1                                         # index among the points
    start = torch.argmax((points & (rank == first[:, None])).to(torch.uint8), dim=1)
    centres = [start]
    nearest = torch.where(points, squared_distance(coords, coords[start]), -1.0)  # non-points never win
    for _ in range(k - 1):
        c = torch.argmax(nearest, dim=1)
        centres.append(c)
        nearest = torch.minimum(nearest, squared_distance(coords, coords[c]))
    return torch.stack(centres, dim=1)


def grid_coordinates(n_cells: int, width: int, device) -> torch.Tensor:
    """(y, x) of the cells of a row-major grid, float32 (exact: squared distances stay far below 2^24)."""
    idx = torch.arange(n_cells, device=device)
    return torch.stack([idx // width, idx % width], dim=1).float()


def squared_distance(coords: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """coords (h w) x 2, centres N x 2 -> N x (h w) squared distances."""
    return ((coords[None] - centres[:, None]) ** 2).sum(-1)


def region_labels(points: torch.Tensor, centres: torch.Tensor, width: int) -> torch.Tensor:
    """Each point joins its nearest centre (the first of equally near ones): N x (h w) long region
    index, -1 for cells that are not points."""
    coords = grid_coordinates(points.shape[1], width, points.device)
    d = ((coords[None, :, None] - coords[centres][:, None]) ** 2).sum(-1)          # N x (h w) x K
    return torch.where(points, torch.argmin(d, dim=2), -1)


def region_prototypes(features: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Mean feature of each region: features N x C x (h w), labels N x (h w), centres N x K -> N x K x C.

    A region is empty only when its centre repeats an earlier one (a grid of fewer than K cells),
    where the reference's mean of nothing is NaN; such a region takes the prototype of the region
    its centre belongs to (the earlier copy), so every finite reference value is unchanged."""
    K = centres.shape[1]
    onehot = F.one_hot(labels.clamp_min(0), K).to(features.dtype) * (labels >= 0).unsqueeze(-1).to(features.dtype)
    sums = torch.einsum("ncx,nxk->nkc", features, onehot)
    counts = onehot.sum(dim=1)                                                     # N x K
    protos = sums / counts.clamp_min(1.0).unsqueeze(-1)
    owner = labels.gather(1, centres)                                              # N x K: k where non-empty
    return protos.gather(1, owner.unsqueeze(-1).expand_as(protos))


# ----------------------------------------------------------------------------- transformer blocks
class RegionAttention(nn.Module):
    """The reference's MultiHeadAttention, self-attention over the K regions of each set.

    x: N x K x C -> N x K x C. q, k, v = relu(W x) per head (d_k = d_v = C), attention softmax(q k^T /
    sqrt(C)) with dropout, heads concatenated head-major, out = relu(dropout(fc(.))), then
    LayerNorm(out + x). Initialisation as the reference: W_q, W_k, W_v normal with std sqrt(2 / (2C)),
    fc xavier-normal, biases PyTorch's default.
    """

    def __init__(self, channels: int, n_heads: int, dropout: float):
        super().__init__()
        self.channels, self.n_heads, self.dropout = channels, n_heads, dropout
        self.w_q = nn.Linear(channels, n_heads * channels)
        self.w_k = nn.Linear(channels, n_heads * channels)
        self.w_v = nn.Linear(channels, n_heads * channels)
        for w in (self.w_q, self.w_k, self.w_v):
            nn.init.normal_(w.weight, mean=0.0, std=math.sqrt(2.0 / (channels + channels)))
        self.fc = nn.Linear(n_heads * channels, channels)
        nn.init.xavier_normal_(self.fc.weight)
        self.norm = nn.LayerNorm(channels)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """N x K x (n C) -> N x n x K x C."""
        N, K = x.shape[:2]
        return F.relu(x).view(N, K, self.n_heads, self.channels).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, K, C = x.shape
        q, k, v = (self.split_heads(w(x)) for w in (self.w_q, self.w_k, self.w_v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C), dim=-1)       # N x n x K x K
        attn = cpu_dropout(attn, self.dropout, self.training)
        heads = (attn @ v).transpose(1, 2).reshape(N, K, self.n_heads * C)         # head-major concat
        out = F.relu(cpu_dropout(self.fc(heads), self.dropout, self.training))
        return self.norm(out + x)


class RegionMLP(nn.Module):
    """The reference's MultiLayerPerceptron: LayerNorm(fc2(gelu(fc1(x))) + x), x: ... x C."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(x))) + x)


def self_selection_bias(scores: torch.Tensor) -> torch.Tensor:
    """BATE's selection: scores N x K -> N x K additive bias, SELECTION_PENALTY where a score is below
    k_c = floor((min + mean) / 2) of its set, 0 elsewhere."""
    kc = torch.floor((scores.amin(dim=1, keepdim=True) + scores.mean(dim=1, keepdim=True)) / 2)
    return torch.where(scores < kc, SELECTION_PENALTY, 0.0)


# ----------------------------------------------------------------------------- head
class RPTHead(nn.Module):
    """Regional prototypes refined by bias-alleviated transformer blocks, on Q-Net's layer3 features.

    forward(support {"layer3": B x S x C x h x w, "threshold": B x S x 1}, support_masks B x S x H x W,
            query {"layer3": B x Q x C x h x w, "threshold": B x Q x 1}, query_labels B x Q x H x W or None)
        -> HeadOutput(log_probs B x Q x 2 x H x W,
                      aux_losses {"periphery", "align", "proto_mse"[, "query_prototype"]} in training,
                      extras {"threshold": B x Q, "support_prototype": B x C, "prototypes": B x Q x C})

    Options:
        scaler, kappa: the anomaly score's cosine scale S and slope (20, 0.5 as the reference).
        fg_num: regions (regional prototypes) per support mask (100).
        iterations: BATE passes, each followed by a new query prediction (3).
        n_heads, mlp_dim, dropout: the transformer block (3 heads of d_k = d_v = C, MLP C -> 1024 -> C,
            dropout 0.1 in training).
        fps_seed: seed of the evaluation stream of first centres (the reference's RandomState(1289)).
        channels: C, from the encoder (build_model), not a config key.

    Support state (`prepare_support`, then `segment` per query batch, equal to forward): {
    "support_prototype": B x C, "support_features": B x S x C x (h w), "points": B x S x (h w) bool
    (the padded mask cells the regions are cut from), "point_counts": B x S long on the CPU (no device
    sync per query batch), "grid_width": w, "image_size": (H, W)}. The regional prototypes are not
    in it: their first centres are drawn per query image, in segment (see "Support state" above).
    """

    feature_maps = (FEATURE_MAP, "threshold")

    def __init__(self, scaler: float = 20.0, kappa: float = 0.5, fg_num: int = 100, iterations: int = 3,
                 n_heads: int = 3, mlp_dim: int = 1024, dropout: float = 0.1, fps_seed: int = 1289,
                 channels: int | Mapping[str, int] = 512):
        super().__init__()
        if isinstance(channels, Mapping):      # the encoder's {map: C} (build_model)
            channels = channels[FEATURE_MAP]
        for key, value in (("fg_num", fg_num), ("iterations", iterations), ("n_heads", n_heads),
                           ("mlp_dim", mlp_dim), ("channels", channels)):
            number_option(key, value, 1, whole=True)
        if not 0.0 <= number_option("dropout", dropout) < 1.0:
            raise ValueError(f"head.dropout must be in [0, 1), got {dropout!r} (the reference uses 0.1)")
        if not 0 <= number_option("fps_seed", fps_seed, whole=True) < 2 ** 32:
            raise ValueError(f"head.fps_seed must be a whole number in [0, 2^32), got {fps_seed!r} "
                             f"(the reference's RandomState(1289))")
        self.scaler = number_option("scaler", scaler, 0, low_open=True)
        self.kappa = number_option("kappa", kappa, 0, low_open=True)
        self.fg_num, self.iterations = int(fg_num), int(iterations)
        self.channels, self.fps_seed = int(channels), int(fps_seed)
        self.attention = RegionAttention(self.channels, int(n_heads), float(dropout))
        self.mlp = RegionMLP(self.channels, int(mlp_dim))
        self.norm = nn.LayerNorm(self.channels)
        self.reset_eval_stream()

    # ------------------------------------------------------------------ randomness
    def reset_eval_stream(self) -> None:
        """Restart the evaluation stream of first centres at fps_seed (a fresh reference model)."""
        self._eval_stream = np.random.RandomState(self.fps_seed)

    def train(self, mode: bool = True):
        if self.training and not mode:         # entering evaluation: the stream of a fresh model
            self.reset_eval_stream()
        return super().train(mode)

    def first_centres(self, n_points: torch.Tensor) -> torch.Tensor:
        """One draw per set, in order: n_points N (points of each set; on the CPU, or the draw waits
        for the device) -> N long on n_points' device, the first centre's index among the points,
        `RandomState.choice(n)` as the reference."""
        stream = self._eval_stream if not self.training else np.random.mtrand._rand
        draws = [int(stream.choice(int(n))) for n in n_points.tolist()]
        return torch.tensor(draws, dtype=torch.long, device=n_points.device)

    # ------------------------------------------------------------------ building blocks
    # one prototype and one threshold per image: features B x N x C x h x w, prototypes B x N x C,
    # threshold B x N x 1 x 1 -> B x N x h x w (Q-Net's per-image anomaly score)
    fg_probability = QNetHead.fg_probability

    def regional_prototypes(self, state: dict, Q: int) -> torch.Tensor:
        """The regions of every shot, drawn anew for every query image (the reference re-runs the
        sampling on each call): support state (`prepare_support`) -> B x Q x S x K x C."""
        points, counts, fs = state["points"], state["point_counts"], state["support_features"]
        B, S, C, n_cells = fs.shape
        points = points[:, None].expand(B, Q, S, n_cells).reshape(-1, n_cells)        # N, order (b, q, s)
        first = self.first_centres(counts[:, None].expand(B, Q, S).reshape(-1)).to(points.device)
        with torch.no_grad():                                                         # integer geometry
            centres = farthest_point_centres(points, first, state["grid_width"], self.fg_num)
            labels = region_labels(points, centres, state["grid_width"])
        feats = fs[:, None].expand(B, Q, S, C, n_cells).reshape(-1, C, n_cells)
        return region_prototypes(feats, labels, centres).view(B, Q, S, self.fg_num, C)

    def bate(self, regions: torch.Tensor, query_prototype: torch.Tensor) -> torch.Tensor:
        """Bias-alleviated transformer block: regions N x K x C, query prototype N x C -> N x K x C."""
        scores = torch.einsum("nkc,nc->nk", regions, query_prototype)
        weights = torch.softmax(scores + self_selection_bias(scores), dim=1)           # over the regions
        x = self.norm(weights.unsqueeze(-1) * query_prototype.unsqueeze(1) + regions)
        return self.mlp(self.attention(x))

    # ------------------------------------------------------------------ support state and prediction
    def prepare_support(self, support: dict, support_masks: torch.Tensor) -> dict:
        """What the prediction needs from the support alone (models/heads/contract.py):

        support {"layer3": B x S x C x h x w, ...}, support_masks B x S x H x W -> {
            "support_prototype": B x C, p (masked average, mean over shots),
            "support_features": B x S x C x (h w), the features the regional prototypes average,
            "points": B x S x (h w) bool, the cells the regions are cut from (padded as the reference),
            "point_counts": B x S long on the CPU, their numbers (the draws need them on the host),
            "grid_width": w, "image_size": (H, W)}

        The regions themselves are not in the state: their first centre is drawn per query image
        (the reference's sampling runs on every call), so `segment` draws and cuts them, one draw per
        (episode, query image, shot) in that order, as forward does."""
        fs = support[FEATURE_MAP]
        B, S, C, h, w = fs.shape
        cells = feature_grid_mask(support_masks, (h, w)).reshape(B * S, h * w)
        points = padded_points(cells, self.fg_num).view(B, S, h * w)
        return {"support_prototype": masked_average_pool(fs, support_masks, MAP_EPS).mean(dim=1),
                "support_features": fs.flatten(-2), "points": points,
                "point_counts": points.sum(dim=-1).cpu(), "grid_width": w,
                "image_size": tuple(support_masks.shape[-2:])}

    def segment(self, state: dict, query: dict) -> HeadOutput:
        """forward's prediction from a support state (`prepare_support`), without auxiliary losses:
        query {"layer3": B x Q x C x h x w, "threshold": B x Q x 1} -> HeadOutput as forward's. The
        state is not changed; the draws of the query images continue the head's stream."""
        return self._predict(state, query)[0]

    def _predict(self, state: dict, query: dict) -> tuple[HeadOutput, torch.Tensor, torch.Tensor]:
        """-> (the output without auxiliary losses, the probability P B x Q x H x W, the query
        thresholds T_q B x Q x 1 x 1), both still in the graph for the training losses."""
        fq = query[FEATURE_MAP]
        B, Q = fq.shape[:2]
        fg_proto = state["support_prototype"]                                          # B x C
        if fg_proto.shape[0] != B:
            raise ValueError(f"the support state holds {fg_proto.shape[0]} episodes, the query {B} "
                             f"(prepare_support and segment take the same episodes)")
        S = state["points"].shape[1]
        t_query = image_thresholds(query, B, Q, "query")
        protos = fg_proto[:, None].expand(B, Q, -1)
        p_low = self.fg_probability(fq, protos, t_query)                               # coarse, B x Q x h x w
        q_proto = masked_average_pool_lowres(fq, p_low, MAP_EPS)                       # B x Q x C
        regions = self.regional_prototypes(state, Q)                                   # B x Q x S x K x C
        K, C = regions.shape[-2:]
        for _ in range(self.iterations):
            q_rep = q_proto[:, :, None].expand(B, Q, S, C).reshape(-1, C)
            regions = self.bate(regions.reshape(-1, K, C), q_rep).view(B, Q, S, K, C)
            protos = regions.mean(dim=3).mean(dim=2) + fg_proto[:, None]               # B x Q x C
            p_low = self.fg_probability(fq, protos, t_query)
            q_proto = masked_average_pool_lowres(fq, p_low, MAP_EPS)
        p_full = upsample_bilinear(p_low, state["image_size"], align_corners=True)
        out = HeadOutput(two_class_log_probs(p_full), extras={
            "threshold": t_query.detach().view(B, Q), "support_prototype": fg_proto.detach(),
            "prototypes": protos.detach()})
        return out, p_full, t_query

    # ------------------------------------------------------------------ forward
    def forward(self, support: dict, support_masks: torch.Tensor, query: dict,
                query_labels: torch.Tensor | None = None) -> HeadOutput:
        state = self.prepare_support(support, support_masks)
        out, p_full, t_query = self._predict(state, query)
        if self.training:
            fs, fq, fg_proto = support[FEATURE_MAP], query[FEATURE_MAP], state["support_prototype"]
            B, S = fs.shape[:2]
            t_support = image_thresholds(support, B, S, "support")
            out.aux_losses["periphery"] = self.periphery_loss(fs, support_masks, fg_proto, t_support)
            pred_proto, has_fg = self.predicted_query_prototype(fq, p_full)
            out.aux_losses["align"] = self.alignment_loss(fs, support_masks, pred_proto, has_fg, t_query)
            per_episode = F.mse_loss(pred_proto, fg_proto, reduction="none").mean(dim=1)
            out.aux_losses["proto_mse"] = (per_episode * has_fg).mean()
            if query_labels is not None:
                out.aux_losses["query_prototype"] = self.query_prototype_loss(fq, query_labels, t_query)
        return out

    # ------------------------------------------------------------------ training losses
    def periphery_loss(self, fs: torch.Tensor, masks: torch.Tensor, fg_proto: torch.Tensor,
                       t_support: torch.Tensor) -> torch.Tensor:
        """The periphery ring of each shot (3 x 3 dilation minus the mask) predicted as
        P(dilated-mask prototype) - P(mask prototype) on the support features with the support's own
        threshold; unweighted NLL (clamped log of [1 - P, P]), mean over shots, then episodes."""
        B, S = masks.shape[:2]
        H, W = masks.shape[-2:]
        dilated = dilate(masks, 1)
        target = support_target(dilated - masks)
        dil_proto = masked_average_pool(fs, dilated, MAP_EPS).mean(dim=1)
        p_obj, p_dil = (upsample_bilinear(self.fg_probability(fs, p[:, None].expand(B, S, -1), t_support), (H, W),
                                          align_corners=True) for p in (fg_proto, dil_proto))
        return per_shot_nll(two_class_log_probs(p_dil - p_obj), target).mean()

    @staticmethod
    def predicted_query_prototype(fq: torch.Tensor, p_full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototype of the predicted query foreground (argmax of the output, features upsampled to the
        mask) pooled over the episode's query images -> (B x C, B float: 1 if anything is predicted)."""
        q_mask = predicted_foreground(p_full).to(fq.dtype)                             # B x Q x H x W
        counts = q_mask.sum(dim=(-2, -1))                                              # B x Q
        return episode_prototype(fq, q_mask, counts), (counts.sum(dim=1) > 0).to(fq.dtype)

    def alignment_loss(self, fs: torch.Tensor, masks: torch.Tensor, pred_proto: torch.Tensor,
                       has_fg: torch.Tensor, t_query: torch.Tensor) -> torch.Tensor:
        """The query's predicted-foreground prototype segments each support shot with the query's
        threshold (the mean over the episode's query images); unweighted NLL, mean over shots, 0 for
        an episode with an empty prediction, mean over episodes."""
        B, S = masks.shape[:2]
        H, W = masks.shape[-2:]
        t_align = t_query.mean(dim=1, keepdim=True).expand(B, S, 1, 1)
        p = self.fg_probability(fs, pred_proto[:, None].expand(B, S, -1), t_align)
        p = upsample_bilinear(p, (H, W), align_corners=True)
        return (per_shot_nll(two_class_log_probs(p), masks) * has_fg).mean()

    def query_prototype_loss(self, fq: torch.Tensor, labels: torch.Tensor, t_query: torch.Tensor) -> torch.Tensor:
        """The prototype of each query image's labelled foreground (label 1) segments that image;
        unweighted NLL ignoring 255, mean over episodes. An image without foreground gets a zero
        prototype (cosine 0), as the reference."""
        if labels.dim() != 4 or labels.shape[:2] != fq.shape[:2]:
            raise ValueError(f"query_labels must be B x Q x H x W = {tuple(fq.shape[:2])} x H x W, "
                             f"got {tuple(labels.shape)}")
        proto = masked_average_pool(fq, (labels == 1).to(fq.dtype), MAP_EPS)            # B x Q x C
        p = upsample_bilinear(self.fg_probability(fq, proto, t_query), tuple(labels.shape[-2:]), align_corners=True)
        return episode_nll(two_class_log_probs(p), labels)

