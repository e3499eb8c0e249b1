"""Q-Net head (Shen et al. 2022): ADNet's anomaly head with a query-informed threshold, two
feature scales, and test-time prototype refinement.

Reference behaviour (../shared/reference/adnet_qnet.md §2.2-2.8, ZJLAB-AMMI/Q-Net models/fewshot.py):

- two scales n, read from the ``qnet_r101`` encoder: n = 0 ``layer3`` (h x w = H/4 x W/4, 64 x 64
  for 256 x 256 images) and n = 1 ``layer4`` (H/8 x W/8, 32 x 32);
- per scale one foreground prototype p_n: masked average of the support features upsampled
  (bilinear, align_corners=False) to the mask, averaged over shots (models/heads/common.py);
- the threshold T_q of each query image comes from the encoder's threshold branch
  (``threshold``: one value per image; the support's values are unused, as in the reference);
  P_n = 1 - sigmoid(kappa (-S cos(F_q, p_n) - T_q)) at feature resolution, with T_q shaped
  B x Q x 1 x 1 (the reference's N x 1 only broadcasts correctly for one query slice);
- fusion: P = (a_0 Up(P_0) + a_1 Up(P_1)) / (a_0 + a_1), Up bilinear with align_corners=True to
  H x W, `alpha` = [a_0, a_1] (0.9/0.1 in setting 1, 0.6/0.4 in setting 2; used in training and in
  evaluation, whereas the reference's train.py always trained with 0.9); output log [1 - P, P];
- training: the alignment loss of §2.5 (Q-Net variant); no threshold loss;
- evaluation (``eval()`` mode) with ``refine_steps > 0``: each query slice refines its own copy of
  each scale's prototype with Adam (§2.8) before the final prediction.

Reference checkpoints (`REFERENCE_CHECKPOINT`; `torch.save(model.state_dict())`, plain keys;
ZJLAB-AMMI/Q-Net models/encoder.py), loaded by models/engine/reference_checkpoints.py:

| reference key (as saved)                          | our key (`FewShotSegmenter.state_dict()`) |
|---------------------------------------------------|-------------------------------------------|
| `encoder.backbone.<conv1,bn1,layer1-4,fc>.*`      | `encoder.backbone.<same>.*`               |
| `encoder.reduce1.weight` (layer3 1x1, 1024->512)  | `encoder.reduce.layer3.weight`            |
| `encoder.reduce2.weight` (layer4 1x1, 2048->512)  | `encoder.reduce.layer4.weight`            |
| `encoder.reduce1d.{weight,bias}` (Linear 1000->1) | `encoder.threshold.{weight,bias}`         |

RPT and GMRD, built on Q-Net's code, save the same encoder keys (`QNET_ENCODER_RULES`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads.adnet import anomaly_fg_probability
from models.heads.common import (
    HeadOutput,
    feature_norms,
    masked_average_pool,
    number_option,
    per_shot_nll,
    two_class_log_probs,
    upsample_bilinear,
)
from models.heads.reference_format import ReferenceFormat

SCALES = ("layer3", "layer4")       # scale index 0 (fine, weight a_0) and 1 (coarse, weight a_1)
MAP_EPS = 1e-5                      # the references' denominator guard in masked average pooling
ADAM_BETAS = (0.9, 0.999)           # torch's Adam defaults, which the reference uses
ADAM_EPS = 1e-8
REFINE_LOSSES = ("reference", "reconstruction")

# Q-Net's encoder as Q-Net, RPT and GMRD save it (models/encoder.py of each: the same Res101Encoder)
QNET_ENCODER_RULES = (("encoder.backbone.", "encoder.backbone."),
                      ("encoder.reduce1.", "encoder.reduce.layer3."),
                      ("encoder.reduce2.", "encoder.reduce.layer4."),
                      ("encoder.reduce1d.", "encoder.threshold."))
QNET_SIGNATURE = frozenset({"encoder.reduce1.weight", "encoder.reduce2.weight", "encoder.reduce1d.weight"})

REFERENCE_CHECKPOINT = ReferenceFormat(
    title="Q-Net (ZJLAB-AMMI/Q-Net)", method="qnet",
    rules=QNET_ENCODER_RULES,
    signature=QNET_SIGNATURE,
)


def predicted_foreground(fg_prob: torch.Tensor) -> torch.Tensor:
    """Argmax of [1 - P, P] as the references take it (a tie goes to background): any shape -> bool."""
    return fg_prob > 1.0 - fg_prob


def image_thresholds(features: dict, B: int, N: int, which: str = "query") -> torch.Tensor:
    """The encoder's threshold of each image (its qnet_r101 threshold branch), B x N x 1 -> B x N x 1 x 1.
    `which` names the features ("query", "support") in the error."""
    t = features["threshold"]
    if tuple(t.shape) != (B, N, 1):
        raise ValueError(f"{which}['threshold'] has shape {tuple(t.shape)}, expected {(B, N, 1)} (one value per "
                         f"image, from the qnet_r101 encoder's threshold branch)")
    return t.unsqueeze(-1)


def episode_prototype(features: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One prototype per episode from its Q images: features B x Q x C x h x w, masks B x Q x H x W,
    counts B x Q (the masks' pixel counts) -> B x C. The per-image masked averages re-weighted by their
    pixel counts = one average over all the episode's pixels: sum_q sum_x Up(F_q) m_q / (sum_q sum_x m_q + eps)."""
    per_image = masked_average_pool(features, masks, MAP_EPS)                  # B x Q x C
    return (per_image * (counts + MAP_EPS).unsqueeze(-1)).sum(1) / (counts.sum(1, keepdim=True) + MAP_EPS)


def channel_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the min and max over the channels: N x C x h x w -> (N x h x w, N x h x w), in one pass."""
    return torch.aminmax(x, dim=1)


def minmax_sigmoid(x: torch.Tensor, extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sigmoid((x - min x) / (max x - min x)) with min and max over all but the first axis.

    x: N x C x h x w -> N x C x h x w, each of the N maps normalised on its own (Q-Net normalises
    one query slice at a time). A constant map gives 0.5 instead of the reference's 0/0 NaN.
    `extremes`: `channel_extremes(x)` if the caller has them (fixed maps, no gradient): the map's
    extremes are then their extremes (a min of mins is exact, so the values are the same), and the
    result is computed in place of one buffer instead of three.
    """
    if extremes is None:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return torch.sigmoid((x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny))
    lo = extremes[0].amin(dim=(1, 2), keepdim=True).unsqueeze(1)
    hi = extremes[1].amax(dim=(1, 2), keepdim=True).unsqueeze(1)
    return (x - lo).div_((hi - lo).clamp_min(torch.finfo(x.dtype).tiny)).sigmoid_()


class _ReferenceRefinementLoss:
    """The reference refinement loss -mean(B logit(A)) per slice, with its exact gradient in p,
    computed without building the full reconstructed map F' at every step.

    B = sigmoid((F' - lo) / (hi - lo)) where F' is F with the prototype p written into the predicted
    foreground pixels and lo, hi the min and max of F' over all channels and pixels. So

        sum B logit(A) = sum_c sigmoid(z_c) S_c + G(lo, hi),   z_c = (p_c - lo) / (hi - lo),

    with S_c the sum of logit(A) over channel c's foreground pixels, and G the background's share,
    which depends on p only through lo and hi: when p holds neither extreme, G is a constant and is
    left out (the gradient is unchanged; only the loss value shifts); otherwise it is computed for
    those slices. Per step this costs one masked sum instead of several differentiated passes over
    the C x h x w maps.

    What depends only on the predicted foreground (S_c, the background's extremes, the background
    weights of G) is kept from the previous step while the foreground is unchanged, which it mostly
    is between Adam steps: the same inputs give the same values, so this changes no number. A slice
    whose foreground covers every pixel has G = 0 (a sum of zeros) and skips its share.
    """

    def __init__(self, features: torch.Tensor, slope: torch.Tensor,
                 extremes: tuple[torch.Tensor, torch.Tensor] | None = None):
        """features, slope (logit(A)): N x C x h x w; extremes: `channel_extremes(features)` if known."""
        N, C, h, w = features.shape
        self.features, self.slope = features, slope                     # N x C x h x w
        self.slope_flat = slope.reshape(N, C, h * w)
        pixel_min, pixel_max = channel_extremes(features) if extremes is None else extremes
        self.pixel_min = pixel_min.reshape(N, h * w)                     # extremes over channels, per pixel
        self.pixel_max = pixel_max.reshape(N, h * w)
        self.n_elements = C * h * w
        self._mask = None                                                # the foreground of the cached terms
        self._terms = None
        self._bg_weight = None

    def _foreground_terms(self, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """mask: N x (h*w) bool -> (S_c N x C, lo_bg N, hi_bg N, has_fg N, has_bg N), recomputed only
        when the mask changed since the last call."""
        if self._mask is None or not torch.equal(mask, self._mask):
            with torch.no_grad():
                fg_slope = torch.einsum("ncx,nx->nc", self.slope_flat, mask.to(self.slope_flat.dtype))   # S_c
                lo_bg = torch.where(mask, torch.inf, self.pixel_min).amin(dim=1)
                hi_bg = torch.where(mask, -torch.inf, self.pixel_max).amax(dim=1)
                self._terms = (fg_slope, lo_bg, hi_bg, mask.any(dim=1), ~mask.all(dim=1))
            self._mask, self._bg_weight = mask, None
        return self._terms

    def _background_weight(self, fg: torch.Tensor) -> torch.Tensor:
        """logit(A) on the background, 0 on the foreground: N x C x h x w, once per foreground. The
        0/1 factor is exact, so slope * bg times sigmoid equals sigmoid times slope times bg."""
        if self._bg_weight is None:
            self._bg_weight = self.slope * ~fg.unsqueeze(1)
        return self._bg_weight

    def __call__(self, proto: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        """proto: N x C (requires grad); fg: N x h x w bool -> N per-slice losses."""
        N = proto.shape[0]
        fg_slope, lo_bg, hi_bg, has_fg, has_bg = self._foreground_terms(fg.reshape(N, -1))
        lo = torch.where(has_fg, torch.minimum(lo_bg, proto.amin(dim=1)), lo_bg)
        hi = torch.where(has_fg, torch.maximum(hi_bg, proto.amax(dim=1)), hi_bg)
        span = (hi - lo).clamp_min(torch.finfo(proto.dtype).tiny)
        total = (torch.sigmoid((proto - lo[:, None]) / span[:, None]) * fg_slope).sum(dim=1)
        # without background pixels G is a sum of zeros: nothing to add, nothing to differentiate
        holds_extreme = has_fg & has_bg & ((proto.detach().amin(dim=1) < lo_bg) | (proto.detach().amax(dim=1) > hi_bg))
        idx = torch.nonzero(holds_extreme).flatten()
        if len(idx):
            weight = self._background_weight(fg)
            if len(idx) == N:                   # every slice: the maps themselves, no gathered copies
                features, lo_i, span_i = self.features, lo, span
            else:
                features, weight, lo_i, span_i = self.features[idx], weight[idx], lo[idx], span[idx]
            z = (features - lo_i[:, None, None, None]) / span_i[:, None, None, None]
            share = (torch.sigmoid(z) * weight).sum(dim=(1, 2, 3))
            total = total.index_add(0, idx, share)
        return -total / self.n_elements


class QNetHead(nn.Module):
    """Dual-scale anomaly head with a per-query threshold and test-time prototype refinement.

    forward(support {"layer3": B x S x C x h3 x w3, "layer4": B x S x C x h4 x w4, ...},
            support_masks B x S x H x W,
            query {"layer3": B x Q x C x h3 x w3, "layer4": B x Q x C x h4 x w4, "threshold": B x Q x 1})
        -> HeadOutput(log_probs B x Q x 2 x H x W, aux_losses {"align"} in training,
                      extras {"threshold": B x Q, "support_prototypes": {scale: B x C},
                              "prototypes": {scale: B x Q x C} (after refinement)})

    Support state (evaluation: `prepare_support` once per support slice and mask, then `segment` per
    query batch, equal to forward): {"prototype.layer3", "prototype.layer4": B x C support prototypes,
    "image_size": (H, W)}; forward is prepare_support then segment's prediction (plus the alignment loss in
    training), so the two cannot drift.

    Options:
        scaler: S, the cosine scale of the anomaly score.
        kappa: slope of the soft threshold.
        alpha: [a_0, a_1], fusion weights of the layer3 (fine) and layer4 (coarse) probabilities.
        align: add the query -> support prototype alignment loss in training.
        refine_steps: Adam steps of test-time prototype refinement (0: off). Only in eval mode.
        refine_lr: Adam learning rate of the refinement.
        refine_loss: "reference" reproduces the released loss BCE(input=A, target=B) with A the
            min-max-sigmoid-normalised query features and B the same for the features with the
            predicted foreground replaced by the prototype. The gradient flows through the *target*;
            the loss is linear in B with a non-negative slope logit(A), so Adam moves nearly every
            prototype component by about +refine_lr per step (a uniform shift, §2.8).
            "reconstruction" swaps the arguments, BCE(input=B, target=A): a proper reconstruction
            loss, minimal where B = A, whose gradient pulls the prototype towards the predicted
            foreground features (in the same normalised space; same loss family and
            normalisation as the reference, only the argument order differs).
    """

    feature_maps = ("layer3", "layer4", "threshold")

    def __init__(self, scaler: float = 20.0, kappa: float = 0.5, alpha: Sequence[float] = (0.9, 0.1),
                 align: bool = True, refine_steps: int = 7, refine_lr: float = 0.01,
                 refine_loss: str = "reference"):
        super().__init__()
        alpha = tuple(number_option("alpha", a) for a in alpha)
        if len(alpha) != len(SCALES) or min(alpha) < 0 or sum(alpha) <= 0:
            raise ValueError(f"head.alpha must be two non-negative weights [layer3, layer4] with a positive "
                             f"sum (Q-Net: [0.9, 0.1] setting 1, [0.6, 0.4] setting 2), got {list(alpha)}")
        if refine_loss not in REFINE_LOSSES:
            raise ValueError(f"head.refine_loss must be one of {', '.join(REFINE_LOSSES)}, got {refine_loss!r}")
        self.scaler = number_option("scaler", scaler, 0, low_open=True)
        self.kappa = number_option("kappa", kappa, 0, low_open=True)
        self.alpha = alpha
        self.align = bool(align)
        self.refine_steps = number_option("refine_steps", refine_steps, 0, whole=True)
        self.refine_lr = number_option("refine_lr", refine_lr, 0, low_open=True)
        self.refine_loss = refine_loss

    # ------------------------------------------------------------------ building blocks
    def fg_probability(self, features: torch.Tensor, prototypes: torch.Tensor,
                       threshold: torch.Tensor) -> torch.Tensor:
        """One prototype and one threshold per query image.

        features: B x Q x C x h x w; prototypes: B x Q x C; threshold: B x Q x 1 x 1 -> B x Q x h x w.
        """
        B, Q = features.shape[:2]
        p = anomaly_fg_probability(features.flatten(0, 1).unsqueeze(1), prototypes.flatten(0, 1),
                                   threshold.flatten(0, 1).unsqueeze(1), self.scaler, self.kappa)
        return p.view(B, Q, *p.shape[-2:])

    def fuse(self, probs: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Weighted mean of the per-scale probabilities upsampled (align_corners=True) to size.

        probs: per scale ... x h_n x w_n (same leading axes) -> ... x H x W.
        """
        w = torch.tensor(self.alpha, dtype=probs[0].dtype, device=probs[0].device)   # float32, as the reference
        total = sum(w[n] * upsample_bilinear(p, size, align_corners=True) for n, p in enumerate(probs))
        return total / w.sum()

    # ------------------------------------------------------------------ support state and prediction
    def prepare_support(self, support: dict, support_masks: torch.Tensor) -> dict:
        """What the prediction needs from the support alone (models/heads/contract.py):

        support {"layer3": B x S x C x h3 x w3, "layer4": B x S x C x h4 x w4, ...},
        support_masks B x S x H x W
            -> {"prototype.layer3": B x C, "prototype.layer4": B x C, "image_size": (H, W)}

        The prototypes are the support's, from which every query slice's refinement starts (the
        refinement needs nothing else of the support, and Q-Net's thresholds come from the query).
        forward builds the same state, so training's gradients reach the support through it."""
        state = {f"prototype.{n}": masked_average_pool(support[n], support_masks, MAP_EPS).mean(dim=1)
                 for n in SCALES}
        state["image_size"] = tuple(support_masks.shape[-2:])
        return state

    def segment(self, state: dict, query: dict) -> HeadOutput:
        """forward's prediction from a support state (`prepare_support`), without auxiliary losses:
        query {"layer3": B x Q x C x h3 x w3, "layer4": ..., "threshold": B x Q x 1} -> HeadOutput as
        forward's. Each query slice refines its own copy of the state's prototypes (in eval mode),
        so any split of the queries into calls gives the same predictions; the state is not changed."""
        return self._predict(state, query)[0]

    def _predict(self, state: dict, query: dict) -> tuple[HeadOutput, torch.Tensor, torch.Tensor]:
        """-> (the output without auxiliary losses, the fused probability P B x Q x H x W, the
        thresholds T_q B x Q x 1 x 1), both P and T_q still in the graph for the alignment loss."""
        B, Q = query[SCALES[0]].shape[:2]
        support_protos = [state[f"prototype.{n}"] for n in SCALES]
        if support_protos[0].shape[0] != B:
            raise ValueError(f"the support state holds {support_protos[0].shape[0]} episodes, the query {B} "
                             f"(prepare_support and segment take the same episodes)")
        threshold = image_thresholds(query, B, Q)
        protos = [p.unsqueeze(1).expand(B, Q, p.shape[-1]) for p in support_protos]
        p_low = [self.fg_probability(query[n], protos[i], threshold) for i, n in enumerate(SCALES)]
        if not self.training and self.refine_steps > 0:
            protos = [self.refine_prototypes(query[n], protos[i], threshold, p_low[i]) for i, n in enumerate(SCALES)]
            p_low = [self.fg_probability(query[n], protos[i], threshold) for i, n in enumerate(SCALES)]
        p_full = self.fuse(p_low, state["image_size"])                                # B x Q x H x W
        out = HeadOutput(two_class_log_probs(p_full), extras={
            "threshold": threshold.detach().view(B, Q),
            "support_prototypes": {n: p.detach() for n, p in zip(SCALES, support_protos)},
            "prototypes": {n: p.detach() for n, p in zip(SCALES, protos)},
        })
        return out, p_full, threshold

    # ------------------------------------------------------------------ forward
    def forward(self, support: dict, support_masks: torch.Tensor, query: dict) -> HeadOutput:
        out, p_full, threshold = self._predict(self.prepare_support(support, support_masks), query)
        if self.training and self.align:
            out.aux_losses["align"] = self.alignment_loss(support, support_masks, query, p_full, threshold)
        return out

    # ------------------------------------------------------------------ training
    def alignment_loss(self, support: dict, support_masks: torch.Tensor, query: dict, p_full: torch.Tensor,
                       threshold: torch.Tensor) -> torch.Tensor:
        """Q-Net's query -> support alignment (reference §2.5, Q-Net differences), mean over episodes.

        The fused full-resolution query prediction (argmax) masks the query features upsampled to
        H x W (masked_average_pool), giving one query prototype per scale and episode (pooled over
        the episode's query images, as ADNet's head does; the reference has one query). Each
        support shot is segmented at both scales with the query threshold (the mean over the
        episode's query images; T_q itself for Q = 1), fused with alpha, and scored against its
        mask with the unweighted NLL, averaged over shots. An episode whose query prediction is
        empty contributes 0. Gradients reach the query features, the support features and T_q.
        """
        B, S = support_masks.shape[:2]
        H, W = support_masks.shape[-2:]
        q_mask = predicted_foreground(p_full).to(p_full.dtype)                 # B x Q x H x W
        counts = q_mask.sum(dim=(-2, -1))                                      # B x Q
        has_fg = (counts.sum(dim=1) > 0).to(p_full.dtype)                      # B
        t_align = threshold.mean(dim=1, keepdim=True).expand(B, S, 1, 1)
        p_supp = []
        for n in SCALES:
            q_proto = episode_prototype(query[n], q_mask, counts)              # B x C
            p_supp.append(self.fg_probability(support[n], q_proto.unsqueeze(1).expand(B, S, -1), t_align))
        fused = self.fuse(p_supp, (H, W))                                      # B x S x H x W
        return (per_shot_nll(two_class_log_probs(fused), support_masks) * has_fg).mean()

    # ------------------------------------------------------------------ test-time refinement
    def refine_prototypes(self, features: torch.Tensor, prototypes: torch.Tensor, threshold: torch.Tensor,
                          fg_prob: torch.Tensor) -> torch.Tensor:
        """Q-Net's test-time prototype refinement for one scale, all query slices at once.

        features: B x Q x C x h x w; prototypes (initial, the support's): B x Q x C;
        threshold: B x Q x 1 x 1; fg_prob (with the initial prototypes): B x Q x h x w
        -> refined prototypes B x Q x C (detached).

        Every query slice owns one prototype row of a (B*Q) x C tensor, optimised by one Adam.
        The loss is the sum over slices of each slice's own mean loss, and each slice is min-max
        normalised over itself, so the rows never interact: Adam is element-wise, hence this equals
        refining slice by slice (the reference; a mean over slices would rescale the gradients,
        and Adam is not exactly scale invariant because of its eps). Per step (reference §2.8):
        m = argmax [1 - P, P]; F' = F (1 - m) + p m; loss(A = norm(F), B = norm(F')); one Adam step;
        P recomputed with the new p and the same T_q. Features and threshold are frozen (detached),
        so nothing but the prototype rows changes; float32 and no autocast, as the reference.

        Cost (issue 24): what does not change across the steps is computed once per call (A and
        logit(A) in one buffer, the per-pixel channel extremes in one pass, the feature norms), the
        foreground's terms of the loss only when the foreground changed, and the last step's P is
        not computed (nothing reads it). The arithmetic of every number is the one of the
        step-by-step computation, so the refined prototypes are bit-identical to it (checked on
        256 x 256 episodes with both losses). At 256 x 256 (512 x 64 x 64 and 512 x 32 x 32) this
        is about ten passes over the maps per scale and call (~60 ms per slice, both scales, on a
        shared 2-core CPU); each step in which a slice's prototype holds its map's min or max while
        background pixels are left adds ~15 differentiated passes over that slice's map (the
        background's share G; up to ~0.5 s per slice over 7 steps at 64 x 64).
        """
        B, Q, C, h, w = features.shape
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
            f = features.detach().float().reshape(B * Q, C, h, w)
            t = threshold.detach().float().reshape(B * Q, 1, 1, 1)
            proto = prototypes.detach().float().reshape(B * Q, C).clone().requires_grad_(True)
            optimizer = torch.optim.Adam([proto], lr=self.refine_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
            extremes = channel_extremes(f)
            original = minmax_sigmoid(f, extremes)                             # A, constant in p
            if self.refine_loss == "reference":
                # BCE(input=A, target=B) = -mean(B logit(A) + log(1 - A)): linear in B, and the
                # second term does not depend on p, so the gradient is that of -mean(B logit(A)).
                # A lies in [sigmoid(0), sigmoid(1)], where BCE's log clamp (-100) never acts.
                reference = _ReferenceRefinementLoss(f, original.logit_(), extremes)
                del original                         # its buffer now holds logit(A), not A
            p = fg_prob.detach().float().reshape(B * Q, h, w)
            norms = feature_norms(f.unsqueeze(1))              # fixed features: their norms once, not per step
            for step in range(self.refine_steps):
                fg = predicted_foreground(p)                                   # (B*Q) x h x w
                if self.refine_loss == "reference":
                    per_slice = reference(proto, fg)
                else:
                    # F' = F (1 - m) + p m, written as a selection (the same values, fewer full-size passes)
                    recon = minmax_sigmoid(torch.where(fg.unsqueeze(1), proto[:, :, None, None], f))   # B
                    per_slice = F.binary_cross_entropy(recon, original, reduction="none").mean(dim=(1, 2, 3))
                loss = per_slice.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step + 1 < self.refine_steps:     # the last step's P would feed no further step
                    with torch.no_grad():
                        p = anomaly_fg_probability(f.unsqueeze(1), proto, t, self.scaler, self.kappa, norms)[:, 0]
        return proto.detach().view(B, Q, C).to(prototypes.dtype)
