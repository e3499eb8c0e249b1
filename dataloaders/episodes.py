"""The training/evaluation episode: one type, batch-first.

    support_images  B x S x 3 x H x W   float32 (one grey slice repeated into 3 channels)
    support_masks   B x S x H x W       float32 in {0, 1}
    query_images    B x Q x 3 x H x W   float32
    query_labels    B x Q x H x W       int64 in {0, 1} (255 = ignore)

Samplers return single episodes (arrays without the B axis, images with one channel);
`collate_episodes` stacks them and `Episode.to` moves them to the device, where the grey channel
is expanded to three without a copy. With augmentation on the device, the episode also carries each
image's augmentation draw (support_aug B x S x 11, query_aug B x Q x 11; dataloaders/augment.py),
which stay on the host until dataloaders/augment_torch.py applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Episode:
    support_images: torch.Tensor
    support_masks: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    support_aug: torch.Tensor | None = None
    query_aug: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.support_images.shape[0]

    def check(self) -> "Episode":
        B, S = self.support_images.shape[:2]
        Q = self.query_images.shape[1]
        H, W = self.support_images.shape[-2:]
        expect = {
            "support_images": (B, S, 3, H, W), "support_masks": (B, S, H, W),
            "query_images": (B, Q, 3, H, W), "query_labels": (B, Q, H, W),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"episode {name} has shape {got}, expected {shape} "
                                 f"(B={B} episodes, S={S} shots, Q={Q} queries, {H}x{W})")
        return self

    def to(self, device, non_blocking: bool = False, memory_format=None) -> "Episode":
        def move(t, images=False):
            t = t.to(device, non_blocking=non_blocking)
            if images and t.shape[2] == 1:
                t = t.expand(-1, -1, 3, -1, -1)
            return t
        return Episode(move(self.support_images, True), move(self.support_masks),
                       move(self.query_images, True), move(self.query_labels), self.support_aug, self.query_aug)


def make_episode_arrays(support_image: np.ndarray, support_mask: np.ndarray,
                        query_image: np.ndarray, query_label: np.ndarray,
                        support_draws=None, query_draws=None) -> dict[str, np.ndarray]:
    """One unbatched episode from S x H x W / Q x H x W arrays (images keep one channel), with the
    augmentation draws still to apply on the device (lists of AugmentDraw), if any."""
    arrays = {
        "support_images": np.ascontiguousarray(support_image, dtype=np.float32)[:, None],
        "support_masks": np.ascontiguousarray(support_mask, dtype=np.float32),
        "query_images": np.ascontiguousarray(query_image, dtype=np.float32)[:, None],
        "query_labels": np.ascontiguousarray(query_label, dtype=np.int64),
    }
    if support_draws is not None:
        arrays["support_aug"] = np.stack([d.to_vector() for d in support_draws])
        arrays["query_aug"] = np.stack([d.to_vector() for d in query_draws])
    return arrays


def collate_episodes(items: list[dict]) -> Episode:
    """Stack unbatched episodes (dicts of arrays) into one batch-first Episode."""
    def stack(key):
        return torch.from_numpy(np.stack([it[key] for it in items])) if key in items[0] else None
    return Episode(stack("support_images"), stack("support_masks"), stack("query_images"),
                   stack("query_labels"), stack("support_aug"), stack("query_aug"))
