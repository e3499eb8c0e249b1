"""ADNet head (Hansen et al. 2022): one foreground prototype, anomaly score, one learned threshold.

Reference behaviour (../shared/reference/adnet_qnet.md §2.2-2.5):

- prototype p: masked average of the support features upsampled (bilinear, align_corners=False)
  to the mask size, averaged over shots (empty masks count as zero vectors);
- anomaly score s(x) = -S cos(F_q(x), p); foreground probability P = 1 - sigmoid(kappa (s - T))
  at feature resolution, upsampled bilinearly with align_corners=True; output [1 - P, P];
- T is one learned scalar (init -10) shared by all images; threshold loss T / S;
- prototype alignment (training only): the query's hard prediction at feature resolution gives a
  query prototype, which segments the support with the same T; unweighted NLL on the support mask,
  averaged over shots; skipped (zero) when the query prediction is empty.

Support state (models/heads/contract.py): `prepare_support` gives {"prototype": B x C, "image_size":
(H, W)}; `segment` scores the queries against it with the current threshold T (a parameter, read
at every call, not copied into the state). `forward` runs the same two steps, so the pair and the
forward cannot drift; the alignment loss (training only) needs the query prediction of the whole
episode and stays in `forward`.

Reference checkpoints (`REFERENCE_CHECKPOINT`; sha168/ADNet models/fewshot_anom.py, saved through
`nn.DataParallel`, so a `module.` prefix), loaded by models/engine/reference_checkpoints.py:

| reference key (as saved)                                           | our key                               |
|--------------------------------------------------------------------|---------------------------------------|
| `module.encoder.backbone.<conv1,bn1,layer1-4>.*`                   | `encoder.backbone.<same>.*`           |
| `module.encoder.localconv.weight` (1x1, 2048->256)                 | `encoder.reduce.layer4.weight`        |
| `module.t` (shape [1])                                             | `head.threshold` (shape [], reshaped) |
| `module.encoder.asppconv.weight`, `module.encoder.aspp_out.*` (37) | dropped, ignored by design            |

`aspp_out` is torchvision's ASPP followed by the DeepLab head's 3x3 conv; like `asppconv` it is
never used in ADNet's forward pass (use_aspp=False), so these 38 tensors are the only ones dropped.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.heads.common import (
    HeadOutput,
    cosine_to_prototype,
    masked_average_pool,
    number_option,
    per_shot_nll,
    two_class_log_probs,
    upsample_bilinear,
)
from models.heads.reference_format import ReferenceFormat


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _dead_aspp_keys() -> frozenset[str]:
    """ADNet's `asppconv` and `aspp_out` = Sequential(torchvision ASPP(2048, [12, 24, 36]), 3x3 conv):
    created, put in the optimiser, saved, never used (use_aspp=False)."""
    aspp = [f"0.convs.{i}.0.weight" for i in range(4)] + [k for i in range(4) for k in _bn(f"0.convs.{i}.1")]
    aspp += ["0.convs.4.1.weight", *_bn("0.convs.4.2"), "0.project.0.weight", *_bn("0.project.1"), "1.weight"]
    return frozenset(["module.encoder.asppconv.weight"] + [f"module.encoder.aspp_out.{k}" for k in aspp])


REFERENCE_CHECKPOINT = ReferenceFormat(
    title="ADNet 2-D (sha168/ADNet)", method="adnet",
    rules=(("module.encoder.backbone.", "encoder.backbone."),
           ("module.encoder.localconv.", "encoder.reduce.layer4."),
           ("module.t", "head.threshold")),
    signature=frozenset({"module.encoder.localconv.weight", "module.t"}),
    dead=_dead_aspp_keys(),
    reshape=frozenset({"head.threshold"}),
)


def anomaly_fg_probability(features: torch.Tensor, prototype: torch.Tensor, threshold: torch.Tensor,
                           scaler: float, kappa: float, norms: torch.Tensor | None = None) -> torch.Tensor:
    """P_fg = 1 - sigmoid(kappa (-S cos(F, p) - T)).

    features: B x N x C x h x w; prototype: B x C; threshold: broadcastable to B x N x 1 x 1
    (a scalar for ADNet, one value per query image for Q-Net); norms: optional precomputed
    feature_norms(features)  ->  B x N x h x w.
    """
    score = -scaler * cosine_to_prototype(features, prototype.unsqueeze(1), norms=norms)
    return 1.0 - torch.sigmoid(kappa * (score - threshold))


class ADNetHead(nn.Module):
    """Anomaly-detection head with a learned threshold.

    forward(support {"out": B x S x C x h x w}, support_masks B x S x H x W,
            query {"out": B x Q x C x h x w}) -> HeadOutput (log_probs B x Q x 2 x H x W)
    prepare_support(support, support_masks) -> state {"prototype": B x C, "image_size": (H, W)}
    segment(state, query) -> HeadOutput: forward's log_probs and extras, without auxiliary losses
    """

    feature_maps = ("out",)

    def __init__(self, scaler: float = 20.0, kappa: float = 0.5, init_threshold: float = -10.0,
                 align: bool = True):
        super().__init__()
        self.scaler = number_option("scaler", scaler, 0, low_open=True)    # the threshold loss divides by it
        self.kappa = number_option("kappa", kappa, 0, low_open=True)
        self.align = bool(align)
        self.threshold = nn.Parameter(torch.tensor(number_option("init_threshold", init_threshold)))

    def prototype(self, support: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """B x S x C x h x w, B x S x H x W -> B x C (mean over shots)."""
        return masked_average_pool(support, masks).mean(dim=1)

    # ------------------------------------------------------------------ support state
    def prepare_support(self, support: dict, support_masks: torch.Tensor) -> dict:
        """The support's prototype: support {"out": B x S x C x h x w}, masks B x S x H x W ->
        {"prototype": B x C, "image_size": (H, W)}."""
        return {"prototype": self.prototype(support["out"], support_masks),
                "image_size": tuple(support_masks.shape[-2:])}

    def segment(self, state: dict, query: dict) -> HeadOutput:
        """Query {"out": B x Q x C x h x w} against a `prepare_support` state -> HeadOutput
        (log_probs B x Q x 2 x H x W, extras {"threshold"})."""
        return self._segment(state, query["out"])[0]

    def _segment(self, state: dict, fq: torch.Tensor) -> tuple[HeadOutput, torch.Tensor]:
        """(HeadOutput, the foreground probability B x Q x h x w at feature resolution)."""
        prototype = state["prototype"]
        if fq.dim() != 5 or fq.shape[0] != prototype.shape[0] or fq.shape[2] != prototype.shape[1]:
            raise ValueError(f"expected query features B x Q x C x h x w with the support's B x C = "
                             f"{tuple(prototype.shape)}, got {tuple(fq.shape)}")
        p_low = anomaly_fg_probability(fq, prototype, self.threshold, self.scaler, self.kappa)
        p_full = upsample_bilinear(p_low, state["image_size"], align_corners=True)
        return HeadOutput(two_class_log_probs(p_full), extras={"threshold": self.threshold.detach()}), p_low

    # ------------------------------------------------------------------ forward
    def forward(self, support: dict, support_masks: torch.Tensor, query: dict) -> HeadOutput:
        fs, fq = support["out"], query["out"]
        out, p_low = self._segment(self.prepare_support(support, support_masks), fq)
        if self.training:
            out.aux_losses["threshold"] = self.threshold / self.scaler
            if self.align:
                out.aux_losses["align"] = self.alignment_loss(fs, support_masks, fq, p_low)
        return out

    def alignment_loss(self, fs: torch.Tensor, support_masks: torch.Tensor, fq: torch.Tensor,
                       p_low: torch.Tensor) -> torch.Tensor:
        """Query -> support prototype alignment (feature-resolution query prototype), mean over episodes."""
        pred_mask = (p_low > 0.5).to(fq.dtype)                             # B x Q x h x w
        has_fg = (pred_mask.flatten(1).sum(1) > 0).to(fq.dtype)            # B; empty -> no alignment
        # summed over all query images of an episode, as the reference
        num = torch.einsum("bqchw,bqhw->bc", fq, pred_mask)
        q_proto = num / (pred_mask.sum(dim=(1, 2, 3)).unsqueeze(-1) + 1e-5)  # B x C
        p_supp = anomaly_fg_probability(fs, q_proto, self.threshold, self.scaler, self.kappa)
        p_supp = upsample_bilinear(p_supp, support_masks.shape[-2:], align_corners=True)
        return (per_shot_nll(two_class_log_probs(p_supp), support_masks) * has_fg).mean()
