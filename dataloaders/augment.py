"""Episode augmentation as the references do it (ADNet, Q-Net, SSL-ALPNet), with explicit RNGs.

Reference behaviour (../shared/reference/adnet_qnet.md §3.7, alpnet_dspnet.md §6.4):

- gamma: gamma ~ U(lo, hi); X' = r ((X - c + 1e-5) / r)^gamma + c with c = min X, r = max X - c + 1e-5;
- affine: draws in this order: rotation theta ~ U(-rot, rot) degrees, translation tx, ty ~ U(-shift, shift)
  pixels, shear phi ~ U(-shear, shear) degrees, isotropic zoom s ~ U(scale); composite
  M = Z . Sh . Tr . R with R the OpenCV rotation about the centre (H/2, W//2), Tr a translation,
  Sh = [[1, -sin phi, 0], [0, cos phi, 0]] (not centred), Z the OpenCV zoom about the centre;
  warped with cv2.warpAffine (forward map), bilinear, constant border 0 (the volume mean in
  z-score units, not the background);
- elastic: two U(-1, 1) fields smoothed by a 21x21 Gaussian (sigma 5, REFLECT_101 border) times
  alpha = 10, displacing columns (dx) and rows (dy); sampled with linear interpolation and reflect
  mode; the mask channel is rounded back to {0, 1} with rint (0.5 -> 0).

Unlike the references, every random draw comes from the `numpy.random.Generator` passed in (the
references' elastic step used a fresh OS-seeded RandomState and could never be reproduced).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentParams:
    """Parameter ranges of the reference augmentation ('sabs_aug' in SSL-ALPNet, the only set in ADNet/Q-Net)."""

    gamma: tuple[float, float] = (0.5, 1.5)
    rotate: float = 5.0          # degrees, +-
    shift: float = 5.0           # pixels, +-
    shear: float = 5.0           # degrees, +-
    scale: tuple[float, float] = (0.9, 1.2)
    elastic_alpha: float = 10.0
    elastic_sigma: float = 5.0

    @classmethod
    def from_config(cls, cfg: dict) -> "AugmentParams":
        keys = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        for k in ("gamma", "scale"):
            if k in keys:
                keys[k] = tuple(float(v) for v in keys[k])
        return cls(**keys)


def gamma_transform(image: np.ndarray, gamma: float) -> np.ndarray:
    """Range-preserving gamma on the whole array (min and max over all of it)."""
    c = image.min()
    r = image.max() - c + 1e-5
    return (r * np.power((image - c + 1e-5) / r, gamma) + c).astype(image.dtype, copy=False)


def _opencv_rotation(center: tuple[float, float], angle: float, scale: float) -> np.ndarray:
    return np.vstack([cv2.getRotationMatrix2D(center, angle, scale), [0.0, 0.0, 1.0]])


def draw_affine(rng: np.random.Generator, shape: tuple[int, int], p: AugmentParams) -> np.ndarray:
    """2 x 3 forward affine matrix in pixel coordinates (x = column, y = row)."""
    H, W = shape
    center = (H / 2, W // 2)   # the reference's centre, (x, y) = (H/2, W//2)
    theta = rng.uniform(-p.rotate, p.rotate)
    tx, ty = rng.uniform(-p.shift, p.shift), rng.uniform(-p.shift, p.shift)
    phi = np.deg2rad(rng.uniform(-p.shear, p.shear))
    zoom = rng.uniform(*p.scale)
    rotation = _opencv_rotation(center, theta, 1.0)
    translation = np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
    shear = np.array([[1.0, -np.sin(phi), 0.0], [0.0, np.cos(phi), 0.0], [0.0, 0.0, 1.0]])
    scaling = _opencv_rotation(center, 0.0, zoom)
    return (scaling @ shear @ translation @ rotation)[:2]


def draw_elastic(rng: np.random.Generator, shape: tuple[int, int], p: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    """Row and column displacement fields (dy, dx), each H x W."""
    ksize = int(4 * p.elastic_sigma) | 1
    dx = cv2.GaussianBlur(rng.uniform(-1, 1, size=shape).astype(np.float32), (ksize, ksize), p.elastic_sigma)
    dy = cv2.GaussianBlur(rng.uniform(-1, 1, size=shape).astype(np.float32), (ksize, ksize), p.elastic_sigma)
    return dy * p.elastic_alpha, dx * p.elastic_alpha


def warp(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, dy: np.ndarray, dx: np.ndarray):
    """Apply the affine then the elastic field to an H x W image and its H x W binary mask."""
    H, W = image.shape
    stacked = np.stack([image, mask.astype(image.dtype)], axis=-1).astype(np.float32)
    stacked = cv2.warpAffine(stacked, affine, (W, H), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    coords = [rows + dy, cols + dx]
    out = np.stack([ndimage.map_coordinates(stacked[..., c], coords, order=1, mode="reflect")
                    for c in range(2)], axis=-1)
    return out[..., 0].astype(image.dtype), np.rint(out[..., 1]).astype(mask.dtype)


def geometric_transform(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                        p: AugmentParams) -> tuple[np.ndarray, np.ndarray]:
    affine = draw_affine(rng, image.shape, p)
    dy, dx = draw_elastic(rng, image.shape, p)
    return warp(image, mask, affine, dy, dx)


def augment_pair_reference(rng: np.random.Generator, support: tuple[np.ndarray, np.ndarray],
                           query: tuple[np.ndarray, np.ndarray], p: AugmentParams):
    """ADNet / Q-Net episode augmentation: gamma on exactly one of support/query (query with
    p = 0.5), then the geometric transform on exactly one of them (independently, p = 0.5)."""
    (s_img, s_mask), (q_img, q_mask) = support, query
    gamma_on_query = rng.random() < 0.5
    gamma = rng.uniform(*p.gamma)
    if gamma_on_query:
        q_img = gamma_transform(q_img, gamma)
    else:
        s_img = gamma_transform(s_img, gamma)
    if rng.random() < 0.5:
        q_img, q_mask = geometric_transform(rng, q_img, q_mask, p)
    else:
        s_img, s_mask = geometric_transform(rng, s_img, s_mask, p)
    return (s_img, s_mask), (q_img, q_mask)
