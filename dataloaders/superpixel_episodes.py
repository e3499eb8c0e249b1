"""Self-supervised training episodes from 2-D superpixels (SSL-ALPNet, DSPNet).

An episode is one training slice and one of its superpixels, seen through two independent
random augmentations: copy 0 is the support (foreground = the superpixel, background = the rest
of the slice, air included), copy 1 is the query (label = the superpixel).
Reference: alpnet_dspnet.md §6.2 and §6.4.

Augmentation of each copy, with its own draws (as the reference's `transform_with_label` called
twice): affine then elastic with the same draws for image and mask (dataloaders/augment.py,
mask rounded with rint), then gamma on the image (min and max over the warped slice).

Superpixel choice (`id_draw`):

- ``present`` (default): uniform over the ids present in the slice with >= `min_size` pixels.
  Every episode has a foreground.
- ``reference``: the reference's draw, an integer uniform in [1, max id of the slice). It never
  picks the largest id and can pick an id absent from the slice (ids have gaps, see
  data/superpixels.py `reference_ids`), giving an episode with an empty foreground that the
  reference trains on silently. Slices whose max id is 1 crash the reference's worker
  (randint(1, 1)); here they are left out of the draw.

Slices: drawn uniformly among the training slices that have at least one candidate id and are
not excluded. Setting 2 removes every slice whose ground truth contains a test class (rule
`exclude_rule`: ``any``, SSL-ALPNet's, or ``all``); ground truth is used for nothing else.
The reference reaches the same slices by redirection (a slice without superpixels moves on to
the next index, an excluded one to a random index), which slightly favours the slice after a
run of empty ones; on CHAOST2 its fixed 1000-episode epochs also wrap indices modulo the slice
count, favouring the first (1000 mod n) slices. Neither bias is reproduced.

Every episode is a pure function of (seed, episode index), so training is reproducible with any
number of DataLoader workers and resumes exactly.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from data.core.io import DataError
from dataloaders.augment import AugmentParams, apply_draw, draw_alpnet_copy
from dataloaders.episodes import make_episode_arrays
from dataloaders.supervoxel_episodes import excluded_slices, slice_counts
from dataloaders.volumes import VolumeStore

log = logging.getLogger(__name__)
ID_DRAWS = ("present", "reference")


class SuperpixelEpisodes(torch.utils.data.Dataset):
    """Map-style dataset: item i is training episode i (1 shot, 1 query), a pure function of (seed, i).

    Args:
        store: the volume store of the dataset.
        scan_ids: training scans.
        pseudolabel_folder: folder of the superpixels under the data dir (superpixels_<min size>).
        id_draw: "present" or "reference" (module docstring).
        min_size: pixels an id needs in the slice to be drawn ("present" only).
        test_labels, exclude_rule, setting: setting-2 exclusion of slices with test classes.
        augment: augmentation ranges; None for identical, unaugmented copies.
        augment_on_device: return the draws with the raw slices (the training step applies them on
            its device) instead of applying them here with OpenCV.
        seed: episode seed; length: dataset length (episodes).
    """

    def __init__(self, store: VolumeStore, scan_ids, pseudolabel_folder: str, *, id_draw: str = "present",
                 min_size: int = 1, test_labels=(), exclude_rule: str = "any", setting: int = 1,
                 augment: AugmentParams | None = AugmentParams(), augment_on_device: bool = False,
                 seed: int = 0, length: int = 10 ** 9):
        self.augment_on_device = bool(augment_on_device)
        if id_draw not in ID_DRAWS:
            raise ValueError(f"sampler.id_draw must be one of {ID_DRAWS}, got {id_draw!r}")
        if int(min_size) < 1:
            raise ValueError(f"sampler.min_size must be >= 1, got {min_size}")
        folder = store.data_dir / pseudolabel_folder
        if not folder.is_dir():
            size = pseudolabel_folder.rpartition("_")[2]
            raise DataError(f"superpixel folder not found: {folder}. Generate it with `python -m data.pseudolabels "
                            f"{store.data_dir} --dataset {store.spec.name} --kind superpixels"
                            + (f" --min-size {size}`" if size.isdigit() else "`") + " (see data/README.md)")
        self.store = store
        self.id_draw = id_draw
        self.min_size = int(min_size)
        self.augment = augment
        self.seed = int(seed)
        self.length = int(length)
        self.images, self.pseudo = {}, {}
        scans, zs, offsets, candidates = [], [], [0], []
        n_excluded, n_crashing = 0, 0
        for scan_id in scan_ids:
            scan = store.scan(scan_id)
            pseudo = store.pseudolabels(scan_id, pseudolabel_folder)
            excluded = excluded_slices(scan.label, test_labels, exclude_rule) if setting == 2 \
                else np.zeros(scan.n_slices, dtype=bool)
            n_excluded += int(excluded.sum())
            ids, counts = slice_counts(pseudo)                      # K ids, K x Z pixel counts
            max_id = pseudo.reshape(pseudo.shape[0], -1).max(1)
            used = False
            for z in np.flatnonzero(~excluded):
                if id_draw == "present":
                    cand = ids[counts[:, z] >= self.min_size]
                    if len(cand) == 0:
                        continue
                else:
                    if max_id[z] < 1:
                        continue
                    if max_id[z] == 1:
                        n_crashing += 1
                        continue
                    cand = np.array([max_id[z]])
                scans.append(scan_id)
                zs.append(int(z))
                candidates.append(cand.astype(np.int64))
                offsets.append(offsets[-1] + len(cand))
                used = True
            if used:
                self.images[scan_id], self.pseudo[scan_id] = scan.image, pseudo
        if n_crashing:
            log.warning("%d slices whose only superpixel id is 1 left out (the reference draw would crash there)",
                        n_crashing)
        if not scans:
            raise DataError(f"no training episode can be drawn from scans {list(scan_ids)}: no slice of "
                            f"{pseudolabel_folder} has a superpixel"
                            + (f" of >= {self.min_size} pixels" if id_draw == "present" else " with id >= 2")
                            + (f" outside the {n_excluded} excluded slices" if n_excluded else ""))
        self.slice_scan = np.asarray(scans, dtype=np.int64)
        self.slice_z = np.asarray(zs, dtype=np.int64)
        self.candidates = np.concatenate(candidates)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        log.info("superpixel episodes: %d slices of %d scans (%d excluded in setting 2), id draw %s",
                 len(zs), len(self.images), n_excluded, id_draw)

    @property
    def n_slices(self) -> int:
        return len(self.slice_z)

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(index)])))

    def draw(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(scan id, slice z, superpixel id) of one episode."""
        k = int(rng.integers(self.n_slices))
        if self.id_draw == "present":
            cand = self.candidates[self.offsets[k]:self.offsets[k + 1]]
            sp = int(cand[rng.integers(len(cand))])
        else:
            sp = int(rng.integers(1, int(self.candidates[self.offsets[k]])))   # [1, max id)
        return int(self.slice_scan[k]), int(self.slice_z[k]), sp

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        scan_id, z, sp = self.draw(rng)
        image = self.images[scan_id][z]
        mask = (self.pseudo[scan_id][z] == sp).astype(np.float32)
        if self.augment is None:
            return make_episode_arrays(image[None], mask[None], image[None], mask[None])
        draws = [draw_alpnet_copy(rng, image.shape, self.augment) for _ in range(2)]   # support, query
        if self.augment_on_device:
            return make_episode_arrays(image[None], mask[None], image[None], mask[None], [draws[0]], [draws[1]])
        (s_img, s_mask), (q_img, q_mask) = (apply_draw(image, mask, d, self.augment) for d in draws)
        return make_episode_arrays(s_img[None], s_mask[None], q_img[None], q_mask[None])
