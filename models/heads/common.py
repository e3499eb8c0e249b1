"""Operations shared by the prototype heads: pooling, cosine scoring, resizing, losses.

Shapes: B episodes, S support shots, Q query images, C channels, h x w feature maps,
H x W images.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

EPS_FLOAT32 = float(torch.finfo(torch.float32).eps)  # the references' clamp for log-probabilities


# ----------------------------------------------------------------------------- constructor options
def number_option(key: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                  high_open: bool = False, whole: bool = False):
    """A head's option `head.<key>` as a float (an int with `whole`), refusing with a ValueError that
    names it a value that is not a finite number or lies outside [low, high] (an open end with
    low_open / high_open). Heads call this in their constructors; the config check builds the head
    to run it before anything is written."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"head.{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or (whole and not number.is_integer()):
        raise ValueError(f"head.{key} must be a finite {'whole ' if whole else ''}number, got {value!r}")
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if below or above:
        if high == math.inf:
            rule = f"{'>' if low_open else '>='} {low:g}"
        elif low == -math.inf:
            rule = f"{'<' if high_open else '<='} {high:g}"
        else:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"head.{key} must be {rule}, got {value!r}")
    if whole:
        return int(value) if isinstance(value, int) else int(number)
    return number


@dataclass
class HeadOutput:
    """What a head returns for a batch of episodes.

    log_probs: B x Q x 2 x H x W log-probabilities of [background, foreground]; the prediction is
        their argmax (a tie goes to background).
    aux_losses: named scalar losses (already averaged over episodes), weighted by the `loss` config.
    extras: diagnostics (thresholds, low-resolution probabilities, prototype counts).
    """

    log_probs: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- precision
# The autocast dtype the caller ran the encoder under, recorded when a head call enters its float32
# region (`float32_head_region`). Heads compute in float32; a head may run one heavy part that
# tolerates bf16 in the caller's precision (GMRD's decoders, `head.decoder_bf16=auto`), so that
# `train.amp` / `evaluation.amp` decide it as they decide the encoder's.
_CALLER_AUTOCAST: ContextVar[torch.dtype | None] = ContextVar("caller_autocast", default=None)


def caller_autocast() -> torch.dtype | None:
    """Inside a head call: the caller's autocast dtype (e.g. torch.bfloat16), None for float32."""
    return _CALLER_AUTOCAST.get()


@contextmanager
def float32_head_region(device_type: str) -> Iterator[None]:
    """Autocast off for a head call, remembering the caller's autocast for `caller_autocast`."""
    outer = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    token = _CALLER_AUTOCAST.set(outer)
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        _CALLER_AUTOCAST.reset(token)


# ----------------------------------------------------------------------------- resizing
@lru_cache(maxsize=64)
def _linear_interp_matrix(n_in: int, n_out: int, device_type: str, device_index,
                          align_corners: bool = False, float32_weights: bool = False) -> torch.Tensor:
    """n_out x n_in matrix A with A @ v == 1-D linear interpolation of v (torch's own weights).

    float32_weights: the weights F.interpolate computes for a float32 map (its source coordinates in
    float32), so that products with A match F.interpolate on float32 maps at float rounding (about
    1e-7); otherwise the weights of a float64 map (the exact ones, up to 3e-6 relative from float32's)."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    dtype = torch.float32 if float32_weights else torch.float64
    eye = torch.eye(n_in, dtype=dtype, device=device).unsqueeze(0)                # 1 x n_in(ch) x n_in
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)[0].T.float()


def interpolation_matrices(size: tuple[int, int], out_size: tuple[int, int], device: torch.device,
                           align_corners: bool = False, float32_weights: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_y H x h, A_x W x w) float32: bilinear upsampling from h x w to H x W is A_y F A_x^T, one row
    of each per output row / column with at most two nonzeros (`_linear_interp_matrix`)."""
    key = (device.type, device.index)
    return (_linear_interp_matrix(size[0], out_size[0], *key, align_corners, float32_weights),
            _linear_interp_matrix(size[1], out_size[1], *key, align_corners, float32_weights))


def upsample_adjoint(masks: torch.Tensor, size: tuple[int, int], align_corners: bool = False,
                     float32_weights: bool = False) -> torch.Tensor:
    """Weights w (..., h, w) with sum_x Up(f)(x) * m(x) == sum_p f(p) * w(p) for every map f.

    Up is bilinear upsampling from h x w to the mask size (separable, so its adjoint is
    A_y^T M A_x); align_corners=False as the 2-D references, True as GMRD. This pools features
    "upsampled to the mask" without ever materialising the C x H x W upsampled map, which is what
    the references do. float32_weights: see `_linear_interp_matrix`.
    """
    a_y, a_x = interpolation_matrices(size, tuple(masks.shape[-2:]), masks.device, align_corners, float32_weights)
    return a_y.T.to(masks.dtype) @ masks @ a_x.to(masks.dtype)


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Bilinear resize of the last two axes of a tensor of any rank >= 2."""
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=size, mode="bilinear", align_corners=align_corners)
    return y.reshape(*lead, *size)


def cpu_dropout(x: torch.Tensor, p: float, training: bool, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverted dropout whose keep mask comes from torch's CPU generator on any device: the trainer
    saves that generator in resume points (a CUDA generator it does not), so a resumed run draws
    the same masks. `shape` broadcasts the mask (Dropout2d: N x C x 1 x 1)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(shape or tuple(x.shape)) >= p
    return x * keep.to(device=x.device, dtype=x.dtype) / (1.0 - p)


# ----------------------------------------------------------------------------- prototypes
def masked_average_pool(features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Masked average of features upsampled (bilinear, align_corners=False) to the mask size.

    features: ... x C x h x w;  masks: ... x H x W (same leading axes)  ->  ... x C.
    Equals sum_x Up(F)(x) M(x) / (sum_x M(x) + eps) (ADNet / Q-Net, reference §2.2); an empty mask
    gives a zero vector.
    """
    weights = upsample_adjoint(masks.to(features.dtype), features.shape[-2:])
    num = torch.einsum("...chw,...hw->...c", features, weights)
    return num / (masks.sum(dim=(-2, -1)).to(features.dtype).unsqueeze(-1) + eps)


def masked_average_pool_lowres(features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Masked average with the mask already at feature resolution: ... x C x h x w, ... x h x w -> ... x C."""
    num = torch.einsum("...chw,...hw->...c", features, masks.to(features.dtype))
    return num / (masks.sum(dim=(-2, -1)).to(features.dtype).unsqueeze(-1) + eps)


def feature_norms(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """... x C x h x w -> ... x h x w: the clamped L2 norms cosine_to_prototype divides by."""
    return torch.linalg.vector_norm(features, dim=-3).clamp_min(eps)


def cosine_to_prototype(features: torch.Tensor, prototype: torch.Tensor, eps: float = 1e-8,
                        norms: torch.Tensor | None = None) -> torch.Tensor:
    """torch cosine similarity of every feature vector to one prototype per image.

    features: ... x C x h x w;  prototype: ... x C  ->  ... x h x w. `norms` (feature_norms of the
    same features) lets a caller that scores many prototypes against fixed features (Q-Net's
    refinement) compute the feature norms once: x.p / (max(|x|, eps) max(|p|, eps)), which is
    torch's cosine_similarity up to float rounding.
    """
    if norms is None:
        return F.cosine_similarity(features, prototype[..., None, None], dim=-3, eps=eps)
    dot = torch.einsum("...chw,...c->...hw", features, prototype)
    return dot / (norms * torch.linalg.vector_norm(prototype, dim=-1).clamp_min(eps)[..., None, None])


# ----------------------------------------------------------------------------- losses
def episode_nll(log_probs: torch.Tensor, target: torch.Tensor, class_weights=None,
                ignore_index: int = 255, reduction: str = "mean") -> torch.Tensor:
    """Weighted NLL per episode, averaged over episodes (`reduction="none"`: one value per episode).

    log_probs: B x N x 2 x H x W; target: B x N x H x W (0, 1 or ignore_index).
    Within an episode this is PyTorch's weighted-mean NLLLoss (sum of w_y * -log p_y over the
    pixels, divided by the sum of w_y), i.e. the references' loss for their single episode; a
    batch of episodes gets the mean of the per-episode losses.
    """
    B = log_probs.shape[0]
    lp = log_probs.movedim(2, -1).reshape(B, -1, 2)
    y = target.reshape(B, -1).long()
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    picked = -lp.gather(-1, y_safe.unsqueeze(-1)).squeeze(-1)
    if class_weights is None:
        w = valid.to(lp.dtype)
    else:
        cw = torch.as_tensor(class_weights, dtype=lp.dtype, device=lp.device)
        w = cw[y_safe] * valid.to(lp.dtype)
    per_episode = (picked * w).sum(1) / w.sum(1).clamp_min(torch.finfo(lp.dtype).tiny)
    return per_episode if reduction == "none" else per_episode.mean()


def per_shot_nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The unweighted NLL of every shot (each its own episode_nll), mean over the shots: the
    references' support losses. log_probs B x S x 2 x H x W, target B x S x H x W -> B."""
    B, S = target.shape[:2]
    nll = episode_nll(log_probs.flatten(0, 1).unsqueeze(1), target.flatten(0, 1).unsqueeze(1), reduction="none")
    return nll.view(B, S).mean(1)


def support_target(masks: torch.Tensor) -> torch.Tensor:
    """The references' support label: 1 where the mask is 1, 0 where it is 0, 255 (ignored) elsewhere."""
    return torch.where(masks == 1, 1, torch.where(masks == 0, 0, 255)).long()


def two_class_log_probs(fg_prob: torch.Tensor) -> torch.Tensor:
    """[1 - P, P] stacked on a new axis -3, clamped to [eps, 1 - eps] and logged, as the references."""
    probs = torch.stack([1.0 - fg_prob, fg_prob], dim=-3)
    return torch.log(probs.clamp(EPS_FLOAT32, 1.0 - EPS_FLOAT32))


# ----------------------------------------------------------------------------- masks
def erode(masks: torch.Tensor, iterations: int) -> torch.Tensor:
    """cv2.erode(m, ones(3, 3), iterations) on ... x H x W: the minimum over the 3 x 3 window, pixels
    outside the image ignored (OpenCV's default border for erosion is +inf); max_pool2d pads with
    -inf, so the negated pooling ignores the border the same way."""
    x = masks.reshape(-1, 1, *masks.shape[-2:])
    for _ in range(iterations):
        x = -F.max_pool2d(-x, kernel_size=3, stride=1, padding=1)
    return x.reshape(masks.shape)


def dilate(masks: torch.Tensor, iterations: int) -> torch.Tensor:
    """cv2.dilate(m, ones(3, 3), iterations): the 3 x 3 maximum, pixels outside the image ignored."""
    x = masks.reshape(-1, 1, *masks.shape[-2:])
    for _ in range(iterations):
        x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return x.reshape(masks.shape)
