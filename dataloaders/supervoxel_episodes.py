"""Self-supervised training episodes from 3-D supervoxels (ADNet, Q-Net).

An episode is two neighbouring slices of one supervoxel of one training scan: one is the support
(slice + supervoxel mask), the other the query (slice + mask as label); with p = 0.5 they swap;
then the reference augmentation (dataloaders/augment.py). Reference: adnet_qnet.md §3.5-3.6.

Pair rules (`pair_rule`):

- ``adnet``: the slices containing supervoxel c are listed in z order, and a pair is two
  neighbours in that list (not always adjacent in z: supervoxels cut by the foreground mask can
  skip slices); the pair needs >= `min_size` pixels of c on its first slice.
- ``qnet``: a pair is two slices adjacent in z, both containing c (inside a run of the list);
  the pair needs >= `min_size` pixels of c on either slice. Pairs are drawn run-first as the
  reference does (uniform run, then uniform pair inside it), on the slice list in the reference's
  order: Python set iteration order, which is not sorted once slices are excluded and splits
  runs (`qnet_set_order: true`, the reference; false sorts the list and draws pairs uniformly).

The references sample by rejection (draw c, draw a pair, retry if too small); here the same
distribution is drawn directly from precomputed weights, so a scan without any valid pair is
skipped at start-up instead of looping forever.

Setting 2 removes every slice that contains a test class (rule ``any``, SSL-ALPNet's protocol;
``all`` is Q-Net's rule: only slices that contain all the test classes), using the ground truth
mapped to class ids (so CMR's 200/500/600 are handled, unlike the reference Q-Net loader).

Every episode is a pure function of (seed, episode index), so training is reproducible with any
number of DataLoader workers and resumes exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from data.core.io import DataError
from dataloaders.augment import AugmentParams, apply_draw, draw_reference_pair
from dataloaders.episodes import make_episode_arrays
from dataloaders.volumes import VolumeStore

log = logging.getLogger(__name__)


def excluded_slices(label: np.ndarray, test_labels, rule: str) -> np.ndarray:
    """Boolean Z vector: slices removed from training in setting 2."""
    if not test_labels:
        return np.zeros(label.shape[0], dtype=bool)
    present = np.stack([(label == c).any(axis=(1, 2)) for c in test_labels])   # n_test x Z
    if rule == "any":
        return present.any(axis=0)
    if rule == "all":
        return present.all(axis=0)
    raise ValueError(f"exclusion rule must be 'any' or 'all', got {rule!r}")


def slice_counts(pseudo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count of every id in every slice: (ids (K,), counts K x Z), background 0 excluded."""
    Z = pseudo.shape[0]
    ids, inverse = np.unique(pseudo, return_inverse=True)
    counts = np.bincount((inverse.reshape(Z, -1) + np.arange(Z)[:, None] * len(ids)).ravel(),
                         minlength=Z * len(ids)).reshape(Z, len(ids)).T
    keep = ids != 0
    return ids[keep], counts[keep]


@dataclass
class PairTable:
    """All valid (class, support slice, query slice) pairs of one scan with their draw weights."""

    scan_id: int
    classes: np.ndarray      # N
    z_first: np.ndarray      # N
    z_second: np.ndarray     # N
    weights: np.ndarray      # N, sum 1

    def __len__(self) -> int:
        return len(self.classes)


def _runs_in_order(zs: list[int]) -> list[list[int]]:
    runs, current = [], []
    for z in zs:
        if current and z == current[-1] + 1:
            current.append(z)
        else:
            if len(current) >= 2:
                runs.append(current)
            current = [z]
    if len(current) >= 2:
        runs.append(current)
    return runs


def build_pair_table(scan_id: int, pseudo: np.ndarray, excluded: np.ndarray, pair_rule: str,
                     min_size: int, qnet_set_order: bool = True,
                     exclude_ids: tuple[int, ...] = ()) -> PairTable:
    """Enumerate the valid pairs with the probability the reference's rejection sampling gives them."""
    ids, counts = slice_counts(pseudo)
    rows = []   # (class, z1, z2, weight before normalisation over the scan)
    for c, per_slice in zip(ids.tolist(), counts):
        if c in exclude_ids:
            continue
        present = [z for z in np.flatnonzero(per_slice).tolist() if not excluded[z]]
        if pair_rule == "adnet":
            if len(present) < 2:
                continue
            # c uniform, then j uniform over the |Z|-1 neighbour pairs, rejected if too small
            for a, b in zip(present[:-1], present[1:]):
                if per_slice[a] >= min_size:
                    rows.append((c, a, b, 1.0 / (len(present) - 1)))
        elif pair_rule == "qnet":
            order = list(set(present)) if qnet_set_order else sorted(present)
            runs = _runs_in_order(order)
            if not runs:
                continue
            for run in runs:
                for a in run[:-1]:
                    if max(per_slice[a], per_slice[a + 1]) >= min_size:
                        w = 1.0 / (len(runs) * (len(run) - 1)) if qnet_set_order else 1.0
                        rows.append((c, a, a + 1, w))
            if not qnet_set_order:   # uniform over this class's valid pairs
                n_c = sum(1 for r in rows if r[0] == c)
                rows[-n_c:] = [(r[0], r[1], r[2], 1.0 / n_c) for r in rows[-n_c:]]
        else:
            raise ValueError(f"pair_rule must be 'adnet' or 'qnet', got {pair_rule!r}")
    if not rows:
        return PairTable(scan_id, *(np.zeros(0, dtype=np.int64) for _ in range(3)), np.zeros(0))
    arr = np.array(rows)
    # each class was drawn uniformly among those with >= 2 slices; classes whose pairs are all too
    # small are rejected and redrawn, which the normalisation over the remaining mass reproduces
    weights = arr[:, 3] / arr[:, 3].sum()
    return PairTable(scan_id, arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64),
                     arr[:, 2].astype(np.int64), weights)


class SupervoxelEpisodes(torch.utils.data.Dataset):
    """Map-style dataset: item i is training episode i (1 shot, 1 query), a pure function of (seed, i)."""

    def __init__(self, store: VolumeStore, scan_ids, pseudolabel_folder: str, *, pair_rule: str = "adnet",
                 min_size: int = 200, reverse_p: float = 0.5, test_labels=(), exclude_rule: str = "any",
                 setting: int = 1, use_gt: bool = False, qnet_set_order: bool = True,
                 augment: AugmentParams | None = AugmentParams(), augment_on_device: bool = False,
                 seed: int = 0, length: int = 10 ** 9):
        self.store = store
        self.augment_on_device = bool(augment_on_device)
        self.seed = int(seed)
        self.reverse_p = float(reverse_p)
        self.augment = augment
        self.length = int(length)
        self.tables: list[PairTable] = []
        self.images, self.pseudo = {}, {}
        skipped = []
        for scan_id in scan_ids:
            scan = store.scan(scan_id)
            excluded = excluded_slices(scan.label, test_labels, exclude_rule) if setting == 2 \
                else np.zeros(scan.n_slices, dtype=bool)
            if use_gt:
                pseudo = scan.label.astype(np.int32)
                exclude_ids = tuple(test_labels)
            else:
                pseudo = store.pseudolabels(scan_id, pseudolabel_folder)
                exclude_ids = ()
            table = build_pair_table(scan_id, pseudo, excluded, pair_rule, min_size, qnet_set_order, exclude_ids)
            if len(table) == 0:
                skipped.append(scan_id)
                continue
            self.tables.append(table)
            self.images[scan_id], self.pseudo[scan_id] = scan.image, pseudo
        if skipped:
            log.warning("scans without any valid training pair (skipped): %s", skipped)
        if not self.tables:
            raise DataError(f"no training episode can be drawn from scans {list(scan_ids)}: no "
                            f"{'label' if use_gt else 'supervoxel'} spans two slices with >= {min_size} "
                            f"pixels outside the excluded slices")

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(index)])))

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        table = self.tables[rng.integers(len(self.tables))]
        k = rng.choice(len(table), p=table.weights)
        c, z_s, z_q = int(table.classes[k]), int(table.z_first[k]), int(table.z_second[k])
        if rng.random() < self.reverse_p:
            z_s, z_q = z_q, z_s
        image, pseudo = self.images[table.scan_id], self.pseudo[table.scan_id]
        support = (image[z_s], (pseudo[z_s] == c).astype(np.float32))
        query = (image[z_q], (pseudo[z_q] == c).astype(np.float32))
        draws = None
        if self.augment is not None:
            draws = draw_reference_pair(rng, image.shape[1:], self.augment)
            if not self.augment_on_device:
                support, query = apply_draw(*support, draws[0], self.augment), apply_draw(*query, draws[1], self.augment)
                draws = None
        return make_episode_arrays(support[0][None], support[1][None], query[0][None], query[1][None],
                                   *(([draws[0]], [draws[1]]) if draws else ()))
