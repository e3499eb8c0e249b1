"""The few-shot segmenter: one encoder, one prototype head.

Episodes are batch-first (dataloaders/episodes.py):
support images B x S x 3 x H x W, support masks B x S x H x W, query images B x Q x 3 x H x W.
Support and query images of all episodes are encoded in one pass, grouped episode by episode
(the S supports then the Q queries of episode 0, then episode 1, ...).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.encoder import ResNetEncoder
from models.episode_norm import episodes_of
from models.heads.common import HeadOutput, float32_head_region
from models.heads.contract import (
    QUERY_LABELS_ARGUMENT,
    Head,
    check_head,
    prepare_support,
    query_maps,
    segment_prepared,
    takes_query_labels,
)


def _head_in_fp32(head: Head, support: dict, support_masks: torch.Tensor, query: dict,
                  query_labels: torch.Tensor | None = None) -> HeadOutput:
    """Heads run in float32 even under autocast: cosines, thresholds, soft clustering and Q-Net's
    refinement are cheap next to the encoder and sensitive to bf16's 8-bit mantissa (a head may run a
    heavy part in the caller's autocast, `caller_autocast`: GMRD's decoders).
    `query_labels` reach only heads whose forward takes them (the contract's optional argument)."""
    device_type = support_masks.device.type
    extra = {QUERY_LABELS_ARGUMENT: query_labels} if query_labels is not None and takes_query_labels(head) else {}
    with float32_head_region(device_type):
        return head({k: v.float() for k, v in support.items()}, support_masks.float(),
                    {k: v.float() for k, v in query.items()}, **extra)


def split_features(features: dict[str, torch.Tensor], B: int, S: int) -> tuple[dict, dict]:
    """Maps of B*(S+Q) images, grouped by episode -> (support B x S x ..., query B x Q x ...)."""
    support, query = {}, {}
    for name, f in features.items():
        f = f.reshape(B, -1, *f.shape[1:])
        support[name], query[name] = f[:, :S], f[:, S:]
    return support, query


class FewShotSegmenter(nn.Module):
    """Encoder + head. The head keeps the contract of models/heads/contract.py (checked here)."""

    def __init__(self, encoder: ResNetEncoder, head: Head):
        super().__init__()
        check_head(head)
        missing = [m for m in head.feature_maps if m not in encoder.output_names]
        if missing:
            raise ValueError(f"head {type(head).__name__} reads feature maps {missing} that the "
                             f"'{encoder.layout_name}' encoder does not produce ({encoder.output_names})")
        self.encoder = encoder
        self.head = head
        encoder.freeze_unread(tuple(head.feature_maps))
        self.channels_last = False

    def set_channels_last(self, enabled: bool = True) -> "FewShotSegmenter":
        """Keep the encoder's weights and inputs in channels_last memory format (faster convolutions
        with cuDNN and oneDNN; the same numbers up to float summation order)."""
        self.channels_last = bool(enabled)
        self.encoder.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self

    def encode(self, images: torch.Tensor, maps: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """N x 3 x H x W -> {name: N x ...}, only the maps the head reads, or only `maps` (a subset of
        them, e.g. `query_maps`: the encoder then skips the layers that feed only the others)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.encoder(images, maps)
        return {k: v for k, v in features.items() if k in self.head.feature_maps}

    def query_maps(self, support_masks: torch.Tensor) -> tuple[str, ...]:
        """The maps the head reads from query slices segmented with these support masks (B x S x H x W;
        models/heads/contract.py `query_maps`): what `encode` must give for them in evaluation."""
        return query_maps(self.head, support_masks)

    def encode_grouped(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """B x N x 3 x H x W -> {name: B x N x ...}."""
        B, N = images.shape[:2]
        features = self.encode(images.flatten(0, 1))
        return {k: v.reshape(B, N, *v.shape[1:]) for k, v in features.items()}

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor, query_labels: torch.Tensor | None = None) -> HeadOutput:
        """Training passes `query_labels` (B x Q x H x W); they reach the head only if it takes them."""
        B, S = support_images.shape[:2]
        images = torch.cat([support_images, query_images], dim=1)
        with episodes_of(self.encoder, images.shape[1]):    # per-episode BatchNorm statistics, if enabled
            features = self.encode(images.flatten(0, 1))
        support, query = split_features(features, B, S)
        return _head_in_fp32(self.head, support, support_masks, query, query_labels)

    def segment(self, support: dict, support_masks: torch.Tensor, query: dict) -> HeadOutput:
        """Run the head on features computed beforehand (evaluation caches the support's)."""
        return _head_in_fp32(self.head, support, support_masks, query)

    def prepare_support(self, support: dict, support_masks: torch.Tensor) -> dict:
        """The head's support state (evaluation mode; models/heads/contract.py), in float32."""
        with float32_head_region(support_masks.device.type):
            return prepare_support(self.head, {k: v.float() for k, v in support.items()}, support_masks.float())

    def segment_prepared(self, state: dict, query: dict) -> HeadOutput:
        """Query features segmented with a support state from `prepare_support`: equal to
        `segment(support, support_masks, query)`, without redoing the support's work."""
        with float32_head_region(next(iter(query.values())).device.type):
            return segment_prepared(self.head, state, {k: v.float() for k, v in query.items()})
