"""Synthetic abdominal phantoms: the embedded default dataset (SYNTH) for the demo and the tests, and
its second modality (SYNTH_CT) for cross-domain evaluation.

    python -m data.phantoms data/SYNTH [--n-scans 10] [--size 128] [--slices 24] [--overwrite]
    python -m data.phantoms data/SYNTH_CT --modality CT       # the same scans with CT-like contrast

Each scan is a deterministic function of (seed, scan id): a body (ellipse with a bright fat rim)
holding four labelled organs, liver (1), right kidney (2), left kidney (3) and spleen (4) as in
CHAOS, plus unlabelled structures (spine, aorta, stomach, gallbladder) that the self-supervised
sampler sees as just more supervoxels. Organs are ellipsoids, flattened at their upper and lower
ends, with smoothly deformed surfaces; shape, size, position and intensity vary across scans;
each tissue has its own texture, and the volume carries Gaussian noise and a smooth
multiplicative bias field. Spacing is anisotropic (2.5 x 2.5 x 8.0 mm by default, thick slices as
in the MR data). Organs sit in patient coordinates as in the CHAOS files (LAS: columns towards
patient left, rows towards anterior, slices towards superior).

The output is exactly the real data's layout (data/core/specs.py):
`<out>/synth_normalized/image_<id>.nii.gz`, `label_<id>.nii.gz` and
`<out>/supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz` (3-D Felzenszwalb, data/supervoxels.py).

Second modality (`--modality CT`, dataset SYNTH_CT, configs/datasets/synth_ct.yaml, image folder
`synth_ct_normalized`): scan i is SYNTH scan i (same seed: the same anatomy, labels and noise) seen
through `ct_contrast`, a fixed piecewise-linear lookup of the MR intensities that gives each tissue a
CT-like grey level: fat dark instead of bright, bone brightest, fluid (gallbladder) darker than the
liver, liver brighter than the soft tissue, kidneys and spleen close to it; air stays 0. The label
maps are identical, so a model trained on SYNTH and evaluated on SYNTH_CT (`eval_dataset=SYNTH_CT`)
meets the intensity shift alone, as a scanner change on the same patients.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from data.core.cli import add_logging_arguments, run_cli
from data.core.io import DataError, Geometry, write_json, write_volume
from data.core.specs import load_spec
from data.pseudolabels import generate_pseudolabels

log = logging.getLogger(__name__)

IMAGE_DIR = "synth_normalized"
MODALITIES = {"MR": ("SYNTH", IMAGE_DIR), "CT": ("SYNTH_CT", "synth_ct_normalized")}   # -> dataset, image folder
# Bump when make_phantom's output changes, so folders written by an older version are regenerated
# instead of silently mixing old and new scans (see generate_phantoms).
GENERATOR_VERSION = 2
MANIFEST = "phantoms.json"
DEFAULT_SPACING = (2.5, 2.5, 8.0)   # x, y, z in mm


@dataclass(frozen=True)
class Structure:
    """An ellipsoid in normalised coordinates (x, y in [-1, 1] across the slice; z in [0, 1] upwards)."""

    name: str
    label: int                       # 0: unlabelled
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    intensity: float
    texture: float = 0.08            # relative amplitude of the tissue texture
    jitter: float = 0.05             # s.d. of the centre across scans (normalised units)
    roughness: float = 0.15          # amplitude of the surface deformation


# x: towards patient left (liver at negative x); y: towards posterior (spine at y = 0.58); z: superior.
# The labelled organs are larger than anatomy (kidneys ~8 cm across, not 5-6): the encoder sees them at
# stride 8, and at 128 x 128 anatomical kidneys would be 3 feature cells wide, so one cell of boundary
# error would halve their Dice; at this size they are 4-5 cells wide, about as many as real kidneys at
# 256 x 256. Measured with the demo (ADNet from scratch, 1000 episodes, fold 0): kidneys 25 px
# across gave a mean Dice of 0.56, these (about 33 px) 0.70.
ANATOMY = (
    Structure("stomach", 0, (0.20, -0.28, 0.55), (0.22, 0.16, 0.16), 105.0, texture=0.25),
    Structure("liver", 1, (-0.38, -0.10, 0.66), (0.48, 0.48, 0.26), 65.0),
    Structure("spleen", 4, (0.52, 0.16, 0.66), (0.29, 0.377, 0.17), 135.0),
    Structure("right_kidney", 2, (-0.34, 0.36, 0.40), (0.2465, 0.3045, 0.20), 175.0, roughness=0.10),
    Structure("left_kidney", 3, (0.34, 0.36, 0.44), (0.2465, 0.3045, 0.20), 175.0, roughness=0.10),
    Structure("gallbladder", 0, (-0.14, -0.38, 0.50), (0.07, 0.08, 0.08), 235.0, roughness=0.05),
)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]) -> np.ndarray:
    """Smooth random field in [-1, 1]: coarse uniform noise upsampled with cubic splines."""
    field = rng.uniform(-1, 1, size=coarse)
    zoom = [s / c for s, c in zip(shape, coarse)]
    out = ndimage.zoom(field, zoom, order=3, mode="reflect")[tuple(slice(0, s) for s in shape)]
    return np.clip(out, -1.5, 1.5) / 1.5


def _grid(shape):
    Z, H, W = shape
    z = np.linspace(0.0, 1.0, Z)[:, None, None]
    y = np.linspace(1.0, -1.0, H)[None, :, None]     # row 0 is posterior (LAS rows run anterior)
    x = np.linspace(-1.0, 1.0, W)[None, None, :]
    return z, y, x


def _ellipsoid(grid, center, radii, deform: np.ndarray | None, roughness: float) -> np.ndarray:
    """Organ mask: elliptic in-plane, with flattened ends along z (a superellipsoid, exponent 4).

    A plain ellipsoid's cross-section shrinks to a sliver at its first and last slices; organs in the
    scans keep most of their width until close to their ends, and slivers are scored too.
    """
    z, y, x = grid
    in_plane = ((x - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
    r = (in_plane ** 2 + ((z - center[2]) / radii[2]) ** 4) ** 0.25
    limit = 1.0 if deform is None else 1.0 + roughness * deform
    return r < limit


def make_phantom(scan_id: int, size: int = 128, slices: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One scan: image (float32, raw units 0..~300) and label (uint8), both slices x size x size."""
    rng = np.random.default_rng([seed, scan_id])
    shape = (slices, size, size)
    grid = _grid(shape)
    z, y, x = grid
    coarse = (4, 6, 6)

    # body: ellipse whose size changes slowly with z, a fat rim, textured soft tissue inside
    ax, ay = rng.uniform(0.86, 0.95), rng.uniform(0.70, 0.80)
    taper = 1.0 + rng.uniform(-0.06, 0.06) * (z - 0.5)
    body_r = np.sqrt((x / (ax * taper)) ** 2 + ((y - 0.05) / (ay * taper)) ** 2) + 0 * z
    body = body_r < 1.0
    image = np.where(body, 90.0 * (1 + 0.12 * smooth_noise(rng, shape, (6, 12, 12))), 0.0)
    image = np.where(body & (body_r > 0.90), 210.0, image)
    label = np.zeros(shape, dtype=np.uint8)

    # spine and aorta: vertical cylinders, unlabelled
    spine = np.sqrt((x - rng.normal(0, 0.02)) ** 2 + (y - 0.58) ** 2) + 0 * z < 0.09
    image = np.where(spine, 245.0, image)
    image = np.where(spine & (np.sqrt(x ** 2 + (y - 0.58) ** 2) < 0.04), 120.0, image)
    aorta = np.sqrt((x - 0.06) ** 2 + (y - 0.38) ** 2) + 0 * z < 0.045
    image = np.where(aorta, 225.0, image)

    for s in ANATOMY:
        center = tuple(c + rng.normal(0, s.jitter if i < 2 else s.jitter * 0.8) for i, c in enumerate(s.center))
        radii = tuple(r * rng.uniform(0.82, 1.18) for r in s.radii)
        organ = _ellipsoid(grid, center, radii, smooth_noise(rng, shape, coarse), s.roughness) & body
        level = s.intensity * rng.uniform(0.88, 1.12)
        tissue = level * (1 + s.texture * smooth_noise(rng, shape, (8, 24, 24)))
        image = np.where(organ, tissue, image)
        if s.label:
            label[organ] = s.label
        else:
            label[organ] = 0

    bias = np.exp(0.25 * smooth_noise(rng, shape, (3, 4, 4)))
    image = image * bias + rng.normal(0, 4.0, shape)
    image = np.abs(image)   # magnitude images: noise keeps the background positive, as in MR
    return image.astype(np.float32), label


# (MR phantom intensity, CT-like intensity) knots of `ct_contrast`, by the tissue that sits at that MR level
# (ANATOMY and make_phantom): air, liver, body soft tissue, stomach, spleen, kidneys, fat rim, aorta,
# gallbladder, spine, and beyond.
CT_CONTRAST = ((0.0, 0.0), (65.0, 150.0), (90.0, 120.0), (105.0, 105.0), (135.0, 140.0), (175.0, 165.0),
               (210.0, 40.0), (225.0, 200.0), (235.0, 70.0), (245.0, 255.0), (400.0, 255.0))


def ct_contrast(image: np.ndarray) -> np.ndarray:
    """A phantom's MR intensities (Z x H x W, raw 0..~300) -> CT-like intensities (float32): the
    piecewise-linear lookup CT_CONTRAST (textures, bias field and noise go through it too)."""
    mr, ct = zip(*CT_CONTRAST)
    return np.interp(image, mr, ct).astype(np.float32)


def make_scan(scan_id: int, size: int = 128, slices: int = 24, seed: int = 0,
              modality: str = "MR") -> tuple[np.ndarray, np.ndarray]:
    """One scan of a modality: MR as `make_phantom`, CT its image through `ct_contrast`, the same label."""
    image, label = make_phantom(scan_id, size, slices, seed)
    return (ct_contrast(image) if modality == "CT" else image), label


def phantom_geometry(spacing=DEFAULT_SPACING, size: int = 128) -> Geometry:
    """LAS orientation like the CHAOS files (sitk direction diag(1, -1, 1))."""
    origin = (-spacing[0] * size / 2, spacing[1] * size / 2, 0.0)
    return Geometry(tuple(float(s) for s in spacing), origin, (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def _existing_ids(out_dir: Path, dataset: str = "SYNTH") -> set[int]:
    try:
        return set(load_spec(dataset).scan_ids(out_dir, require_labels=False))
    except DataError:    # no folder, or no image in it
        return set()


def _stale_reason(out_dir: Path, recipe: dict, dataset: str = "SYNTH") -> str | None:
    """Why the phantoms already in out_dir cannot be kept (None: there are none, or they match recipe)."""
    if not _existing_ids(out_dir, dataset):
        return None
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return f"they have no {MANIFEST} (written by generator version 1)"
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return f"{manifest} is unreadable ({err})"
    # a manifest written before the CT phantoms existed describes MR phantoms
    changed = [f"{k} {found.get(k, 'MR' if k == 'modality' else None)} -> {v}" for k, v in recipe.items()
               if found.get(k, "MR" if k == "modality" else None) != v]
    return f"they were made with another recipe ({', '.join(changed)})" if changed else None


def generate_phantoms(out_dir: str | Path, n_scans: int = 10, size: int = 128, slices: int = 24,
                      seed: int = 0, n_sv: int = 1000, overwrite: bool = False, progress: bool = True,
                      supervoxels: bool = True, modality: str = "MR") -> list[Path]:
    """Write scans 1..n_scans (and their supervoxels) into out_dir; returns the images written.
    `modality` "MR" writes SYNTH, "CT" SYNTH_CT (the same scans through `ct_contrast`).

    Scans already there are kept when `<out_dir>/phantoms.json` says they come from this generator
    version with the same size, slices and seed; otherwise (or with overwrite) every scan is rewritten,
    those above n_scans included, since phantoms of two recipes in one folder would make a
    meaningless dataset.
    """

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    dataset, image_dir = MODALITIES[modality]
    out_dir = Path(out_dir)
    folder = out_dir / image_dir
    recipe = {"generator_version": GENERATOR_VERSION, "size": size, "slices": slices, "seed": seed}
    if modality != "MR":
        recipe["modality"] = modality       # MR folders keep the manifest they always had
    stale = _stale_reason(out_dir, recipe, dataset)
    if stale and not overwrite:
        log.warning("phantoms in %s are rewritten: %s", out_dir, stale)
        overwrite = True
    scan_ids = set(range(1, n_scans + 1)) | (_existing_ids(out_dir, dataset) if overwrite else set())
    geometry = phantom_geometry(size=size)
    written = []
    for scan_id in tqdm(sorted(scan_ids), desc="phantoms", disable=not progress, unit="scan"):
        image_path, label_path = folder / f"image_{scan_id}.nii.gz", folder / f"label_{scan_id}.nii.gz"
        if image_path.is_file() and label_path.is_file() and not overwrite:
            continue
        image, label = make_scan(scan_id, size, slices, seed, modality)
        write_volume(label_path, label, geometry)      # label first: an image is never left without its label
        write_volume(image_path, image, geometry)
        written.append(image_path)
    write_json(out_dir / MANIFEST, recipe)
    if supervoxels:
        generate_pseudolabels(out_dir, dataset, kind="supervoxels", min_size=n_sv, overwrite=overwrite or bool(written),
                              ids=None)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="dataset folder to write (e.g. data/SYNTH)")
    parser.add_argument("--n-scans", type=int, default=10)
    parser.add_argument("--size", type=int, default=128, help="in-plane size in pixels")
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sv", type=int, default=1000, help="supervoxel minimum size")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing scans")
    parser.add_argument("--modality", choices=sorted(MODALITIES), default="MR",
                        help="MR: the SYNTH phantoms; CT: SYNTH_CT, the same scans with CT-like contrast")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    if args.n_scans < 6:
        parser.error("--n-scans must be at least 6 (five folds plus a support scan)")

    def body() -> int:
        start = time.perf_counter()
        written = generate_phantoms(args.out_dir, args.n_scans, args.size, args.slices, args.seed, args.n_sv,
                                    args.overwrite, progress=args.log_level != "WARNING", modality=args.modality)
        print(f"phantoms: {len(written)} scans written, {args.n_scans - len(written)} kept, in {args.out_dir} "
              f"({time.perf_counter() - start:.1f} s)")
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
