"""The reference augmentation applied to a whole batch on the device (torch ops).

The samplers draw the parameters (dataloaders/augment.py: `AugmentDraw`, one float vector per
image) exactly as for the CPU path; this module applies them to all images of a batch at once:

- gamma: the reference formula with each image's own min and max;
- affine then elastic, two bilinear resamplings as the reference (one would smooth textures less
  and shift the intensity distribution): the affine with a zero border (OpenCV's constant border),
  then the displacement by the reference's Gaussian-smoothed uniform fields (21 x 21 kernel,
  reflect-101 border; generated on the device from the draw's seed) with a reflecting border;
- masks resampled with the same grids and rounded half to even, as np.rint.

Differences from the CPU path: OpenCV's warpAffine interpolates with 1/32-pixel fixed-point weights
(differences of a few hundredths of the intensity range); the elastic noise comes from torch's
generator instead of NumPy's (same distribution, other numbers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dataloaders.augment import AugmentParams
from dataloaders.episodes import Episode


def gaussian_kernel(sigma: float, ksize: int, device, dtype=torch.float32) -> torch.Tensor:
    """OpenCV's Gaussian kernel (sum 1) of odd size ksize."""
    x = torch.arange(ksize, device=device, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (k / k.sum()).to(dtype)


def elastic_fields(seeds: list[int], shape: tuple[int, int], p: AugmentParams, device) -> torch.Tensor:
    """N x 2 x H x W displacement fields (dx, dy) in pixels, one per seed."""
    H, W = shape
    noise = []
    for seed in seeds:
        g = torch.Generator(device=device).manual_seed(int(seed))
        noise.append(torch.rand(2, H, W, generator=g, device=device) * 2 - 1)
    noise = torch.stack(noise)                                             # N x 2 x H x W
    ksize = int(4 * p.elastic_sigma) | 1
    k = gaussian_kernel(p.elastic_sigma, ksize, device)
    pad = ksize // 2
    x = noise.reshape(-1, 1, H, W)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    return x.view(-1, 2, H, W) * p.elastic_alpha


def gamma_batch(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """N x H x W images, N exponents -> the reference gamma with per-image min and max."""
    c = images.amin(dim=(-2, -1), keepdim=True)
    r = images.amax(dim=(-2, -1), keepdim=True) - c + 1e-5
    return r * ((images - c + 1e-5) / r).pow(gamma.view(-1, 1, 1)) + c


def affine_grid(affines: torch.Tensor, shape: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    """Grid (N x H x W x 2, align_corners=True) reading the source at M^-1 (c, r) for forward affines
    M (N x 2 x 3, pixel coordinates x = column, y = row): OpenCV's warpAffine."""
    H, W = shape
    full = torch.zeros(affines.shape[0], 3, 3, dtype=torch.float64, device=affines.device)
    full[:, :2] = affines
    full[:, 2, 2] = 1.0
    inverse = torch.linalg.inv(full)[:, :2].to(dtype)                       # N x 2 x 3
    rows = torch.arange(H, device=affines.device, dtype=dtype).view(1, H, 1)
    cols = torch.arange(W, device=affines.device, dtype=dtype).view(1, 1, W)
    src_x = inverse[:, 0, 0, None, None] * cols + inverse[:, 0, 1, None, None] * rows + inverse[:, 0, 2, None, None]
    src_y = inverse[:, 1, 0, None, None] * cols + inverse[:, 1, 1, None, None] * rows + inverse[:, 1, 2, None, None]
    return torch.stack([2 * src_x / (W - 1) - 1, 2 * src_y / (H - 1) - 1], dim=-1)


def displacement_grid(fields: torch.Tensor) -> torch.Tensor:
    """Grid (N x H x W x 2, align_corners=False) reading the source at (c + dx, r + dy); with
    padding_mode="reflection" this is SciPy's map_coordinates(mode="reflect")."""
    N, _, H, W = fields.shape
    rows = torch.arange(H, device=fields.device, dtype=fields.dtype).view(1, H, 1)
    cols = torch.arange(W, device=fields.device, dtype=fields.dtype).view(1, 1, W)
    x, y = cols + fields[:, 0], rows + fields[:, 1]
    return torch.stack([(2 * x + 1) / W - 1, (2 * y + 1) / H - 1], dim=-1)


def warp_batch(stacked: torch.Tensor, affines: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    """The reference's two resamplings: affine with a zero border, then elastic with reflection.
    stacked: N x C x H x W; affines N x 2 x 3; fields N x 2 x H x W (dx, dy)."""
    shape = stacked.shape[-2:]
    out = F.grid_sample(stacked, affine_grid(affines, shape, stacked.dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return F.grid_sample(out, displacement_grid(fields.to(stacked.dtype)), mode="bilinear",
                         padding_mode="reflection", align_corners=False)


def apply_draws(images: torch.Tensor, masks: torch.Tensor, draws: torch.Tensor, p: AugmentParams):
    """Augment N images (N x H x W) and masks (N x H x W) with their draws (N x AugmentDraw.VECTOR_SIZE).

    `draws` stays on the host: which images get which transform is decided there, so the step
    never waits for the device.
    """
    draws = draws.cpu()
    device = images.device
    gamma = draws[:, 1].to(device=device, dtype=images.dtype, non_blocking=True)
    before = torch.nonzero((draws[:, 0] > 0) & (draws[:, 10] > 0)).flatten()
    after = torch.nonzero((draws[:, 0] > 0) & (draws[:, 10] == 0)).flatten()
    geometry = torch.nonzero(draws[:, 2] > 0).flatten()
    if len(before):
        i = before.to(device)
        images = images.index_copy(0, i, gamma_batch(images[i], gamma[i]))
    if len(geometry):
        shape = images.shape[-2:]
        i = geometry.to(device)
        fields = elastic_fields(draws[geometry, 9].long().tolist(), shape, p, device)
        stacked = torch.stack([images[i], masks[i].to(images.dtype)], dim=1)
        warped = warp_batch(stacked, draws[geometry, 3:9].view(-1, 2, 3).to(device), fields)
        images = images.index_copy(0, i, warped[:, 0])
        masks = masks.index_copy(0, i, torch.round(warped[:, 1]).to(masks.dtype))
    if len(after):
        i = after.to(device)
        images = images.index_copy(0, i, gamma_batch(images[i], gamma[i]))
    return images, masks


def augment_episode(episode: Episode, p: AugmentParams) -> Episode:
    """Apply an episode batch's pending draws (support_aug, query_aug) on its device."""
    if episode.support_aug is None:
        return episode
    out = []
    for images, masks, draws in ((episode.support_images, episode.support_masks, episode.support_aug),
                                 (episode.query_images, episode.query_labels, episode.query_aug)):
        B, N, C, H, W = images.shape
        grey = images[:, :, 0].reshape(B * N, H, W)
        new_images, new_masks = apply_draws(grey, masks.reshape(B * N, H, W), draws.reshape(B * N, -1), p)
        out.append((new_images.view(B, N, 1, H, W).expand(-1, -1, C, -1, -1), new_masks.view(B, N, H, W)))
    return Episode(out[0][0], out[0][1], out[1][0], out[1][1])
