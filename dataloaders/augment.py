"""Episode augmentation as the references do it (ADNet, Q-Net, SSL-ALPNet), with explicit RNGs.

Reference behaviour (the `sabs_aug` transforms of the released SSL-ALPNet / ADNet / Q-Net code):

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

Drawing and applying are separate: the samplers draw every parameter here (`AugmentDraw`), then
either apply it on the CPU with OpenCV/SciPy as the references (`apply_draw`) or hand the draws to
the training step, which applies them to the whole batch on the device
(dataloaders/augment_torch.py). Both paths share the draws, so their parameter distributions are
the same by construction; the elastic noise of a draw is generated from its own seed.
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


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of one image's augmentation.

    gamma: exponent, or None for no gamma; affine: 2 x 3 forward matrix and elastic_seed: seed of
    the elastic noise, or None for no geometric transform; gamma_first: ADNet / Q-Net apply gamma
    before the geometric transform, SSL-ALPNet after it.
    """

    gamma: float | None = None
    affine: np.ndarray | None = None
    elastic_seed: int | None = None
    gamma_first: bool = True

    VECTOR_SIZE = 11

    def to_vector(self) -> np.ndarray:
        """[has_gamma, gamma, has_geometry, affine (6), elastic_seed, gamma_first] as float64."""
        v = np.zeros(self.VECTOR_SIZE, dtype=np.float64)
        if self.gamma is not None:
            v[0], v[1] = 1.0, self.gamma
        if self.affine is not None:
            v[2] = 1.0
            v[3:9] = np.asarray(self.affine, dtype=np.float64).ravel()
            v[9] = float(self.elastic_seed)
        v[10] = float(self.gamma_first)
        return v


def draw_geometry(rng: np.random.Generator, shape: tuple[int, int], p: "AugmentParams"):
    """Affine matrix and elastic-noise seed of one geometric transform."""
    return draw_affine(rng, shape, p), int(rng.integers(2 ** 31 - 1))


def draw_reference_pair(rng: np.random.Generator, shape: tuple[int, int], p: "AugmentParams"):
    """ADNet / Q-Net episode: gamma on exactly one of support/query (the query with p = 0.5), then
    the geometric transform on exactly one of them (independently, p = 0.5). -> (support, query)."""
    gamma_on_query = rng.random() < 0.5
    gamma = float(rng.uniform(*p.gamma))
    geometry_on_query = rng.random() < 0.5
    affine, seed = draw_geometry(rng, shape, p)
    query = AugmentDraw(gamma if gamma_on_query else None, affine if geometry_on_query else None,
                        seed if geometry_on_query else None, gamma_first=True)
    support = AugmentDraw(None if gamma_on_query else gamma, None if geometry_on_query else affine,
                          None if geometry_on_query else seed, gamma_first=True)
    return support, query


def draw_alpnet_copy(rng: np.random.Generator, shape: tuple[int, int], p: "AugmentParams") -> AugmentDraw:
    """SSL-ALPNet: every copy gets the geometric transform, then gamma."""
    affine, seed = draw_geometry(rng, shape, p)
    return AugmentDraw(float(rng.uniform(*p.gamma)), affine, seed, gamma_first=False)


def elastic_from_seed(seed: int, shape: tuple[int, int], p: "AugmentParams"):
    return draw_elastic(np.random.default_rng(seed), shape, p)


def apply_draw(image: np.ndarray, mask: np.ndarray, draw: AugmentDraw, p: "AugmentParams"):
    """Apply one draw on the CPU as the references do (OpenCV affine, SciPy elastic)."""
    if draw.gamma is not None and draw.gamma_first:
        image = gamma_transform(image, draw.gamma)
    if draw.affine is not None:
        dy, dx = elastic_from_seed(draw.elastic_seed, image.shape, p)
        image, mask = warp(image, mask, draw.affine, dy, dx)
    if draw.gamma is not None and not draw.gamma_first:
        image = gamma_transform(image, draw.gamma)
    return image, mask


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
