"""SSL-ALPNet head (Ouyang et al., ECCV 2020): adaptive local prototype pooling (ALP).

Reference behaviour (../shared/reference/alpnet_dspnet.md §2 and §4), reproduced exactly:

- support masks are resized to the feature size with bilinear interpolation (align_corners=False,
  no antialias): at an 8x downsample each value is the mean of a 2x2 sample of pixels, not the
  area fraction of the 8x8 block;
- local prototypes: average-pooled windows of the support features (`window` = 4 in training,
  an 8x8 grid on 32x32 features; `val_window` = 2 at evaluation, 16x16), kept where the pooled
  mask is > `fg_thresh` / `bg_thresh` (0.95, strict), taken over all cells of all shots;
- global prototype of a shot: masked average pooling at feature resolution, eps 1e-5;
- foreground mode: 'gridconv+' (local prototypes plus one global prototype per shot) if some
  window of `mode_window` = 4 (hard-coded in the reference, also at evaluation) has a mean mask
  >= `fg_thresh` (>=, while the selection uses >), else 'mask': 20 cos(q, mean of the shots'
  global prototypes) with cosine eps 1e-4;
- background mode: 'gridconv' (local prototypes only);
- grid score: sum_j softmax_j(d) d_j with d_j = 20 <n(q), n(p_j)>, n(v) = v / max(|v|, 1e-4);
- logits [bg, fg] upsampled bilinearly (align_corners=False) to the image, log-softmax;
- alignment loss (PANet PAR, training only): hard masks from the argmax of the LOW-resolution
  logits (a tie is background), roles of support and query swapped, the same modes with the
  training window, unweighted NLL on the support mask (255 ignored), mean over shots; an empty
  predicted foreground is not skipped (its 'mask' prototype is zero, so its score is zero).

Empty local prototype sets. The foreground never has an empty set ('gridconv+' always holds the
global prototypes; if none of its local cells pass the threshold, which needs every candidate
window to be exactly 0.95, only the global ones are used, as in the reference). The background
set is empty when no window of the background mask exceeds 0.95 (the foreground or, in the
alignment pass, the predicted foreground touches every window). The reference then crashes
(a convolution with 0 output channels) and its bare try/except silently skips the training
step; here the background falls back to 'mask' mode: 20 cos(q, mean over shots of the
background's global prototype), the same fallback the reference applies to a foreground
without full windows. Both branches are counted (`HeadOutput.extras` per call,
`branch_counts()` cumulative).

Support state (models/heads/contract.py). Everything but the query's scores depends on the
support alone and is computed once by `prepare_support`: the resized masks, the pooled cells and
their selection (local prototypes, normalised), the background's global prototype, the foreground
mode of the episode ('gridconv+' or 'mask', decided from the support mask) and the foreground
hook's support part (ALPNet: the shots' global prototypes; DSPNet: seeds, clustered centres, BCMA
cells), with the per-episode branch statistics. `segment` scores a batch of queries against it.
`forward` is the same two steps (`support_state`, `query_scores`) plus, in training, the alignment
loss, so the pair and the forward cannot drift. Each query image is scored on its own (no statistic
over the query batch), so any split of the queries into calls gives the same log-probabilities.
The branch counters count per prediction, as before the state existed: every `segment` call (and
every forward) adds its B episodes and their branches; `prepare_support` counts nothing, so the
counts do not depend on how often a support state is reused.

Batching: episodes (B), shots (S) and queries (Q) are vectorised; the varying number of local
prototypes is handled with masks (a masked softmax), and the per-episode mode choice with
`torch.where` over both modes' scores, so the forward has no host synchronisation. The head runs
in float32 even under autocast: the 20x-scaled cosines and, in DSPNet, the unscaled Gram softmax
are precision-sensitive, and the head costs little next to the encoder.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.heads.common import (
    HeadOutput,
    cosine_to_prototype,
    masked_average_pool_lowres,
    number_option,
    per_shot_nll,
    support_target,
    upsample_bilinear,
)


# ----------------------------------------------------------------------------- building blocks
def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of ... x H x W masks to ... x h x w."""
    return upsample_bilinear(masks, size, align_corners=False)


def safe_normalize(x: torch.Tensor, dim: int, eps: float = 1e-4) -> torch.Tensor:
    """x / max(||x||_2, eps) along `dim` (the reference's `safe_norm`)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def grid_cells(features: torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping average pool of every shot, cells of all shots in one list.

    Args:
        features: B x S x C x h x w.
        window: pooling window (= stride).
    Returns:
        B x (S * h//window * w//window) x C, shot-major.
    """
    B, S, C, h, w = features.shape
    pooled = F.avg_pool2d(features.reshape(B * S, C, h, w), window)
    return pooled.reshape(B, S, C, -1).transpose(2, 3).reshape(B, -1, C)


def mask_cells(masks: torch.Tensor, window: int) -> torch.Tensor:
    """B x S x h x w soft masks -> B x (S * cells) pooled mask values, in `grid_cells` order."""
    B, S, h, w = masks.shape
    return F.avg_pool2d(masks.reshape(B * S, 1, h, w), window).reshape(B, -1)


def prototype_similarities(query_n: torch.Tensor, prototypes: torch.Tensor, scaler: float,
                           eps: float) -> torch.Tensor:
    """d_j = scaler <n(q), n(p_j)> for shared or per-query prototype sets.

    Args:
        query_n: B x Q x C x h x w, already normalised along C.
        prototypes: B x P x C (shared by the queries) or B x Q x P x C.
    Returns:
        B x Q x P x h x w.
    """
    return normalized_similarities(query_n, safe_normalize(prototypes, dim=-1, eps=eps), scaler)


def normalized_similarities(query_n: torch.Tensor, prototypes_n: torch.Tensor, scaler: float) -> torch.Tensor:
    """`prototype_similarities` with the prototypes already normalised (a support state's)."""
    if prototypes_n.dim() == 3:
        return scaler * torch.einsum("bqchw,bpc->bqphw", query_n, prototypes_n)
    return scaler * torch.einsum("bqchw,bqpc->bqphw", query_n, prototypes_n)


def softmax_fusion(d: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_j softmax_j(d) d_j over the valid prototypes j (a smooth maximum).

    Args:
        d: B x Q x P x h x w similarities.
        valid: B x Q x P booleans, the prototypes that exist.
    Returns:
        (score B x Q x h x w, any_valid B x Q). Where no prototype is valid the score is
        finite but meaningless (computed over all P) and the caller must replace it: masking
        every entry with -inf would give NaN, whose gradient leaks through `torch.where`.
    """
    any_valid = valid.any(-1)
    keep = valid | ~any_valid[..., None]
    logits = d.masked_fill(~keep[..., None, None], float("-inf"))
    return (torch.softmax(logits, dim=2) * d).sum(2), any_valid


def fp32_region(device: torch.device):
    """Autocast switched off (see the module docstring)."""
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------- the head
class ALPNetHead(nn.Module):
    """Adaptive local prototype pooling head (SSL-ALPNet); no learnable parameters.

    forward(support {"out": B x S x C x h x w}, support_masks B x S x H x W,
            query {"out": B x Q x C x h x w}) -> HeadOutput(log_probs B x Q x 2 x H x W,
            aux_losses {"align"} in training, extras: per-episode branch statistics)

    Args:
        scaler: similarity scale (20 in the reference).
        window: local-prototype pooling window in training (4: 32 / proto_grid_size 8).
        val_window: the window at evaluation (`val_wsize`, 2).
        mode_window: window of the foreground mode check (4, also at evaluation).
        fg_thresh, bg_thresh: local-prototype thresholds (strict >) and the mode check (>=).
        norm_eps: eps of the prototype / query normalisation (1e-4).
        cos_eps: eps of the cosine in 'mask' mode (1e-4).
        map_eps: eps of masked average pooling (1e-5).
        align: add the prototype alignment loss in training.
    """

    feature_maps = ("out",)

    def __init__(self, scaler: float = 20.0, window: int = 4, val_window: int = 2, mode_window: int = 4,
                 fg_thresh: float = 0.95, bg_thresh: float = 0.95, norm_eps: float = 1e-4,
                 cos_eps: float = 1e-4, map_eps: float = 1e-5, align: bool = True):
        super().__init__()
        self.scaler = number_option("scaler", scaler, 0, low_open=True)
        self.window = number_option("window", window, 1, whole=True)
        self.val_window = number_option("val_window", val_window, 1, whole=True)
        self.mode_window = number_option("mode_window", mode_window, 1, whole=True)
        # the share of a cell inside the mask that a local prototype needs (strict >)
        self.fg_thresh = number_option("fg_thresh", fg_thresh, 0, 1)
        self.bg_thresh = number_option("bg_thresh", bg_thresh, 0, 1)
        self.norm_eps = number_option("norm_eps", norm_eps, 0, low_open=True)
        self.cos_eps = number_option("cos_eps", cos_eps, 0, low_open=True)
        self.map_eps = number_option("map_eps", map_eps, 0, low_open=True)
        self.align = bool(align)
        self._counts: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ hooks for DSPNet
    def refine_cells(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled grid cells B x M x C -> (cells for fg local prototypes, cells for bg ones)."""
        return cells, cells

    def support_context(self, support_masks: torch.Tensor, feature_size: tuple[int, int]):
        """Per-support data computed once per support from the full-resolution masks (DSPNet's seeds)."""
        return None

    def foreground_support(self, support: torch.Tensor, fg_masks: torch.Tensor, context,
                           alignment: bool) -> tuple[dict, dict]:
        """The support's part of the global foreground prototypes (see `foreground_prototypes`).

        Args:
            support: B x S x C x h x w; fg_masks: B x S x h x w.
            context: `support_context`'s result (None in the alignment pass).
            alignment: True in the alignment pass.
        Returns:
            (state for `foreground_for_queries`, extras {name: B-shaped tensor}).
            ALPNet: {"global": B x S x C}, the masked average of each shot.
        """
        return {"global": masked_average_pool_lowres(support, fg_masks, eps=self.map_eps)}, {}

    def foreground_for_queries(self, state: dict, query: torch.Tensor) -> torch.Tensor:
        """`foreground_support`'s state, query B x Q x C x h x w -> B x Q x S x C prototypes.
        ALPNet: the same prototypes for every query."""
        return state["global"][:, None].expand(-1, query.shape[1], -1, -1)

    def foreground_prototypes(self, support: torch.Tensor, fg_masks: torch.Tensor, query: torch.Tensor,
                              context, alignment: bool) -> tuple[torch.Tensor, dict]:
        """Global foreground prototype of every shot, as seen by every query.

        Args:
            support: B x S x C x h x w; fg_masks: B x S x h x w; query: B x Q x C x h x w.
            context: `support_context`'s result (None in the alignment pass).
            alignment: True in the alignment pass.
        Returns:
            (B x Q x S x C prototypes, extras).
        """
        state, extras = self.foreground_support(support, fg_masks, context, alignment)
        return self.foreground_for_queries(state, query), extras

    # ------------------------------------------------------------------ scores
    def class_scores(self, support: torch.Tensor, fg_masks: torch.Tensor, bg_masks: torch.Tensor,
                     query: torch.Tensor, window: int, context=None,
                     alignment: bool = False) -> tuple[torch.Tensor, dict]:
        """Low-resolution [bg, fg] logits of the queries given the supports.

        Args:
            support: B x S x C x h x w; fg_masks, bg_masks: B x S x h x w (soft, feature size);
            query: B x Q x C x h x w; window: local-prototype pooling window.
        Returns:
            (logits B x Q x 2 x h x w, extras {name: B-shaped tensor}).
        """
        state = self.support_state(support, fg_masks, bg_masks, window, context, alignment)
        return self.query_scores(state, query), dict(state["extras"])

    def support_state(self, support: torch.Tensor, fg_masks: torch.Tensor, bg_masks: torch.Tensor,
                      window: int, context=None, alignment: bool = False) -> dict:
        """What the scores take from the support alone (the first half of `class_scores`).

        Args:
            support: B x S x C x h x w; fg_masks, bg_masks: B x S x h x w (soft, feature size);
            window: local-prototype pooling window; context, alignment: as `foreground_support`.
        Returns:
            {"bg_local", "fg_local": B x M x C normalised local prototypes (M cells of all shots),
             "bg_valid", "fg_valid": B x M the cells kept, "bg_global": B x C, "fg_grid_mode": B,
             "foreground": the `foreground_support` state, "extras": {name: B-shaped statistics}}.
        """
        B, S, C, h, w = support.shape
        if h % window or w % window:
            raise ValueError(f"the {h}x{w} feature map is not divisible by the pooling window {window} "
                             f"(head.window / head.val_window)")
        fg_cells, bg_cells = self.refine_cells(grid_cells(support, window))           # B x M x C
        y_fg, y_bg = mask_cells(fg_masks, window), mask_cells(bg_masks, window)        # B x M
        # background: local prototypes only ('gridconv'); no local prototype -> 'mask' mode
        valid_bg = y_bg > self.bg_thresh
        bg_global = masked_average_pool_lowres(support, bg_masks, eps=self.map_eps).mean(1)   # B x C
        # foreground: 'gridconv+' (local + one global per shot) or 'mask' (shot-averaged global)
        foreground, extras = self.foreground_support(support, fg_masks, context, alignment)
        valid_fg = y_fg > self.fg_thresh
        mode_max = F.avg_pool2d(fg_masks.reshape(B * S, 1, h, w), self.mode_window).reshape(B, -1).amax(1)
        use_grid = mode_max >= self.fg_thresh
        extras.update({
            "fg_grid_mode": use_grid,
            "fg_local_empty": use_grid & ~valid_fg.any(1),
            "bg_local_empty": ~valid_bg.any(1),
            "n_fg_local": valid_fg.sum(1),
            "n_bg_local": valid_bg.sum(1),
        })
        return {"bg_local": safe_normalize(bg_cells, dim=-1, eps=self.norm_eps), "bg_valid": valid_bg,
                "bg_global": bg_global,
                "fg_local": safe_normalize(fg_cells, dim=-1, eps=self.norm_eps), "fg_valid": valid_fg,
                "fg_grid_mode": use_grid, "foreground": foreground, "extras": extras}

    def query_scores(self, state: dict, query: torch.Tensor) -> torch.Tensor:
        """`support_state`'s state, query B x Q x C x h x w -> [bg, fg] logits B x Q x 2 x h x w
        (the second half of `class_scores`; every query image on its own)."""
        B, Q = query.shape[:2]
        query_n = safe_normalize(query, dim=2, eps=self.norm_eps)
        d_bg = normalized_similarities(query_n, state["bg_local"], self.scaler)
        bg_grid, bg_any = softmax_fusion(d_bg, state["bg_valid"][:, None].expand(-1, Q, -1))
        bg_mask = self.scaler * cosine_to_prototype(query, state["bg_global"][:, None], eps=self.cos_eps)
        bg = torch.where(bg_any[..., None, None], bg_grid, bg_mask)

        g = self.foreground_for_queries(state["foreground"], query)                  # B x Q x S x C
        S = g.shape[2]
        d_fg = torch.cat([normalized_similarities(query_n, state["fg_local"], self.scaler),
                          prototype_similarities(query_n, g, self.scaler, self.norm_eps)], dim=2)
        valid = torch.cat([state["fg_valid"][:, None].expand(-1, Q, -1),
                           torch.ones(B, Q, S, dtype=torch.bool, device=query.device)], dim=-1)
        fg_grid, _ = softmax_fusion(d_fg, valid)
        fg_mask = self.scaler * cosine_to_prototype(query, g.mean(2), eps=self.cos_eps)
        fg = torch.where(state["fg_grid_mode"][:, None, None, None], fg_grid, fg_mask)
        return torch.stack([bg, fg], dim=2)

    # ------------------------------------------------------------------ support state (evaluation)
    def prepare_support(self, support: dict, support_masks: torch.Tensor) -> dict:
        """The support's work once (contract: models/heads/contract.py; see the module docstring).

        Args:
            support: {"out": B x S x C x h x w}; support_masks: B x S x H x W.
        Returns:
            `support_state`'s dict plus "training" (the mode it was prepared in: the window and
            DSPNet's `cal` depend on it), "image_size" (H, W) and "query_shape" (B, C). Read only.
        """
        fs = support["out"]
        if fs.dim() != 5 or support_masks.dim() != 4 or fs.shape[:2] != support_masks.shape[:2]:
            raise ValueError(f"expected support B x S x C x h x w and masks B x S x H x W; "
                             f"got {tuple(fs.shape)}, {tuple(support_masks.shape)}")
        with fp32_region(fs.device):
            return self._prepare(fs.float(), support_masks.float())

    def segment(self, state: dict, query: dict) -> HeadOutput:
        """Query {"out": B x Q x C x h x w} against a `prepare_support` state -> HeadOutput
        (log_probs B x Q x 2 x H x W, extras: the episodes' branch statistics); counts branches."""
        fq = query["out"]
        if fq.dim() != 5 or (fq.shape[0], fq.shape[2]) != state["query_shape"]:
            raise ValueError(f"expected query features B x Q x C x h x w with the support's (B, C) = "
                             f"{state['query_shape']}, got {tuple(fq.shape)}")
        if bool(state["training"]) != self.training:
            raise RuntimeError(f"this support state was prepared in {'training' if state['training'] else 'evaluation'}"
                               f" mode but the head is in {'training' if self.training else 'evaluation'} mode "
                               f"(the pooling window differs); prepare it again after switching modes")
        with fp32_region(fq.device):
            return self._segment(state, fq.float())[0]

    def _prepare(self, fs: torch.Tensor, masks: torch.Tensor) -> dict:
        """float32 support B x S x C x h x w and masks B x S x H x W -> the support state."""
        size = fs.shape[-2:]
        fg_masks, bg_masks = downsample_masks(masks, size), downsample_masks(1.0 - masks, size)
        window = self.window if self.training else self.val_window
        state = self.support_state(fs, fg_masks, bg_masks, window, self.support_context(masks, size))
        state.update(training=self.training, image_size=tuple(masks.shape[-2:]),
                     query_shape=(fs.shape[0], fs.shape[2]))
        return state

    def _segment(self, state: dict, fq: torch.Tensor) -> tuple[HeadOutput, torch.Tensor]:
        """float32 query B x Q x C x h x w -> (HeadOutput, low-resolution logits B x Q x 2 x h x w)."""
        low = self.query_scores(state, fq)
        log_probs = F.log_softmax(upsample_bilinear(low, state["image_size"], align_corners=False), dim=2)
        out = HeadOutput(log_probs, extras=dict(state["extras"]))
        self._accumulate("train" if state["training"] else "eval", out.extras, fq.shape[0])
        return out, low

    # ------------------------------------------------------------------ forward
    def forward(self, support: dict, support_masks: torch.Tensor, query: dict) -> HeadOutput:
        fs, fq = support["out"], query["out"]
        if fs.dim() != 5 or fq.dim() != 5 or support_masks.dim() != 4 or fs.shape[:2] != support_masks.shape[:2]:
            raise ValueError(f"expected support B x S x C x h x w, masks B x S x H x W and query B x Q x C x h x w; "
                             f"got {tuple(fs.shape)}, {tuple(support_masks.shape)}, {tuple(fq.shape)}")
        with fp32_region(fs.device):
            fs, fq, masks = fs.float(), fq.float(), support_masks.float()
            out, low = self._segment(self._prepare(fs, masks), fq)
            if self.training and self.align:
                loss, align_extras = self.alignment_loss(fs, masks, fq, low)
                out.aux_losses["align"] = loss
                out.extras.update({f"align.{k}": v for k, v in align_extras.items()})
                self._accumulate("train.align", align_extras, fs.shape[0])
        return out

    def alignment_loss(self, fs: torch.Tensor, masks: torch.Tensor, fq: torch.Tensor,
                       low: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Query -> support prototype alignment (PANet PAR with ALP modes).

        Args:
            fs: B x S x C x h x w; masks: B x S x H x W support masks; fq: B x Q x C x h x w;
            low: B x Q x 2 x h x w low-resolution query logits.
        Returns:
            (scalar loss: per-shot unweighted NLL, mean over shots then episodes; extras).
        """
        H, W = masks.shape[-2:]
        pred_fg = (low[:, :, 1] > low[:, :, 0]).to(fq.dtype)        # argmax; a tie is background
        support_low, extras = self.class_scores(fq, pred_fg, 1.0 - pred_fg, fs, self.window, None, alignment=True)
        log_probs = F.log_softmax(upsample_bilinear(support_low, (H, W), align_corners=False), dim=2)
        return per_shot_nll(log_probs, support_target(masks)).mean(), extras

    # ------------------------------------------------------------------ branch counters
    @torch.no_grad()
    def _accumulate(self, prefix: str, extras: dict, n_episodes: int) -> None:
        """Add the boolean per-episode statistics to the running counters (on the device; no sync)."""
        key = f"{prefix}.episodes"
        self._counts[key] = self._counts.get(key, 0) + n_episodes
        for name, value in extras.items():
            if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
                key = f"{prefix}.{name}"
                total = value.sum()
                previous = self._counts.get(key)
                self._counts[key] = total if previous is None else previous.to(total.device) + total

    def branch_counts(self, reset: bool = False) -> dict[str, int]:
        """How often each branch ran since construction (or the last reset).

        Keys `<train|eval>[.align].<name>`: `episodes` counts episodes; the others count episodes
        (per shot for DSPNet's FSPA statistics) in which the branch ran: `fg_grid_mode`
        ('gridconv+' rather than 'mask'), `bg_local_empty` (background fell back to 'mask'),
        `fg_local_empty` ('gridconv+' with global prototypes only). Reading synchronises.
        """
        counts = {k: int(v) for k, v in sorted(self._counts.items())}
        if reset:
            self._counts.clear()
        return counts
