"""Few-shot inference, once: the predictor behind the evaluator (models/engine/evaluation.py) and
one-shot segmentation of new scans (models/engine/segmentation.py, scripts/segment.py).

A scan is read as a stack of z-scored slices, `image` Z x H x W float32; a slice enters the encoder
as its grey value repeated into 3 channels (3 x H x W). The model (models/fewshot.py) provides
    encode(images N x 3 x H x W, maps=None) -> {name: N x C x h x w} (maps: only those; None: all)
    query_maps(support_masks B x S x H x W) -> the maps the head reads from the query (optional: a
        model without it gets all maps, and its encode is called without `maps`)
    prepare_support(support {name: 1 x S x C x h x w}, support masks 1 x S x H x W) -> state
    segment_prepared(state, query {name: 1 x Q x C x h x w}) -> HeadOutput, log_probs 1 x Q x 2 x H x W
        ([bg, fg]); equal to segment(support, support masks, query) (models/heads/contract.py).
Every prediction is 1-way: S support slices and their masks (S = 1: 1-shot; S = K for the K-shot
protocol, one slice per support scan, `predict_chunks_shots`) against query slices; the head combines
the shots as its reference does. Q-Net's test-time prototype refinement runs inside the head's
`segment` call (in eval mode), per query slice.

Speed without changing the numbers. With `cache_features` (the default) each slice is encoded once
per scan and kept under the caller's key until `forget`: the support slices once for all classes
and parts, each query slice once for all classes; the slices a caller `warm`s together are encoded
in ascending z, `batch_size` per encoder call. The query slices of a chunk then go through the head
`batch_size` at a time, and the head's support state (prototypes, regions, descriptors: what it
computes from the support alone) is computed once per set of support slices and masks (every shot's
scan, slice and mask digest) and reused for every chunk, batch and query scan. Query slices are
encoded with only the maps the head reads for the support masks they are segmented with (the model's
`query_maps`: GMRD's skip layer4 and the threshold unless a support mask is empty); a slice lacking a
map asked for later is encoded again. tests/test_protocol.py, tests/test_qnet_end_to_end.py and
tests/test_query_maps.py check that batch sizes, caching and the query maps change no prediction.
`cache_features=False` runs the references' loop instead: for every query slice, its support slice
and it are encoded together (a batch of 2, all maps) and segmented alone; the benchmark's reference
mode times it.

Precision. With `autocast_dtype` (bf16) the encoder runs under torch.autocast and its features are
cast back to float32; the head always runs in float32 (models/fewshot.py). Without it, autocast is
explicitly off, so the references' fp32 arithmetic holds even inside a caller's autocast region.
"""
from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class ScanImage:
    """The slices of one scan as the predictor reads them."""

    key: Hashable           # names the scan in the feature cache: unique among the scans cached at one time
    image: np.ndarray       # Z x H x W float32, z-scored


def slice_batch(image: np.ndarray, zs: Sequence[int], device: torch.device) -> torch.Tensor:
    """Slices zs of a Z x H x W volume -> N x 3 x H x W on the device (grey repeated into 3 channels)."""
    x = torch.from_numpy(np.ascontiguousarray(image[np.asarray(zs)])).to(device)
    return x[:, None].expand(-1, 3, -1, -1)


def mask_digest(mask: np.ndarray) -> str:
    """A short digest of a support mask (H x W, on the host: no device sync): support states are kept
    per slice and mask (one per class)."""
    return hashlib.blake2b(np.ascontiguousarray(mask).tobytes(), digest_size=16).hexdigest()


def foreground_mask(log_probs: torch.Tensor) -> torch.Tensor:
    """N x 2 x H x W log-probabilities -> N x H x W bool: the argmax of [bg, fg], a tie going to
    background as in the references."""
    return log_probs[:, 1] > log_probs[:, 0]


def foreground_probability(log_probs: torch.Tensor) -> torch.Tensor:
    """N x 2 x H x W log-probabilities -> N x H x W float32 foreground probability."""
    return torch.softmax(log_probs.float(), dim=1)[:, 1]


class Predictor:
    """Runs a few-shot model (in eval mode: the caller's job) on slices of scans.

    Args:
        model: `encode` and `segment` as in the module docstring, already on `device`.
        device: where slices and masks are sent.
        batch_size: slices per encoder call and query slices per head call.
        autocast_dtype: the encoder's autocast dtype (e.g. torch.bfloat16); None: float32.
        cache_features: False runs the references' uncached loop (see the module docstring).
    """

    def __init__(self, model, device: torch.device | str = "cpu", batch_size: int = 16,
                 autocast_dtype: torch.dtype | None = None, cache_features: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.autocast_dtype = autocast_dtype
        self.cache_features = bool(cache_features)
        self._cache: dict[Hashable, dict[int, dict[str, torch.Tensor]]] = {}   # key -> z -> {name: C x h x w}
        self._all_maps: tuple[str, ...] | None = None      # the maps an encode without `maps` gives (once seen)
        # ((scan key, z, mask digest) per shot) -> the head's support state
        self._states: dict[tuple, dict] = {}

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ encoder
    @torch.no_grad()
    def encode(self, images: torch.Tensor, maps: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """One encoder call: N x 3 x H x W -> {name: N x C x h x w} float32, only `maps` if given."""
        with self.autocast():
            features = self.model.encode(images) if maps is None else self.model.encode(images, maps)
        if maps is None:
            self._all_maps = tuple(features)
        return {k: v.float() for k, v in features.items()}

    def query_maps(self, *support_masks: np.ndarray) -> tuple[str, ...] | None:
        """The maps the model's head reads from query slices segmented with these support masks (each
        P x S x H x W on the host, foreground nonzero; the union over all), in the order the model
        names them; None (all maps) for a model without `query_maps`. Host masks: no device sync."""
        if not hasattr(self.model, "query_maps"):
            return None
        wanted = []
        for masks in support_masks:
            masks = torch.from_numpy(np.asarray(masks).astype(np.float32))
            wanted += [m for m in self.model.query_maps(masks) if m not in wanted]
        return tuple(wanted)

    def _lacks(self, key: Hashable, z: int, maps: tuple[str, ...] | None) -> bool:
        """Whether slice z of scan `key` must be encoded (again) to have `maps` (None: all; before any
        encode without `maps` the predictor does not know them, so a cached slice is encoded again)."""
        row = self._cache.get(key, {}).get(z)
        wanted = self._all_maps if maps is None else maps
        return row is None or wanted is None or any(m not in row for m in wanted)

    def warm(self, scan: ScanImage, zs: Sequence[int], maps: tuple[str, ...] | None = None) -> None:
        """Encode the slices zs of `scan` that lack one of `maps` (None: all the model's maps) in the
        cache, in ascending z, `batch_size` per encoder call, computing only `maps` (a map's values do
        not depend on the others computed with it). Slices warmed together share full batches.
        Without the cache: nothing."""
        if not self.cache_features:
            return
        cached = self._cache.setdefault(scan.key, {})
        missing = [int(z) for z in np.unique(np.asarray(zs, dtype=int)) if self._lacks(scan.key, int(z), maps)]
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start:start + self.batch_size]
            features = self.encode(slice_batch(scan.image, batch, self.device), maps)
            for i, z in enumerate(batch):
                cached.setdefault(z, {}).update({k: v[i] for k, v in features.items()})

    def features(self, scan: ScanImage, zs: Sequence[int], maps: tuple[str, ...] | None = None
                 ) -> dict[str, torch.Tensor]:
        """Features of slices zs (N) of `scan`, from the cache (encoded first if lacking):
        {name: N x C x h x w} for the names in `maps` (None: all the model's maps)."""
        self.warm(scan, zs, maps)
        rows = [self._cache[scan.key][int(z)] for z in zs]
        names = list(rows[0]) if maps is None else maps
        return {k: torch.stack([row[k] for row in rows]) for k in names}

    def forget(self, key: Hashable) -> None:
        """Drop the cached features (and support states) of the scan named `key` (a query that is done)."""
        self._cache.pop(key, None)
        for state_key in [k for k in self._states if any(shot[0] == key for shot in k)]:
            del self._states[state_key]

    # ------------------------------------------------------------------ head
    @torch.no_grad()
    def support_state(self, support: dict[str, torch.Tensor], support_masks: torch.Tensor,
                      key: tuple | None = None) -> dict:
        """The head's support state (models/heads/contract.py) of S support slices (shots), support
        {name: S x C x h x w} and support_masks S x H x W; kept under `key` (one (scan key, z, mask
        digest) per shot, until `forget` of one of those scans) so every chunk and query scan
        segmented with those slices and masks reuses it."""
        if key is not None and key in self._states:
            return self._states[key]
        with self.autocast():
            state = self.model.prepare_support({k: v[None] for k, v in support.items()}, support_masks[None])
        if key is not None:
            self._states[key] = state
        return state

    @torch.no_grad()
    def segment(self, support: dict[str, torch.Tensor], support_masks: torch.Tensor,
                query: dict[str, torch.Tensor], state_key: tuple | None = None) -> torch.Tensor:
        """S support slices (shots) against N query slices, `batch_size` query slices per head call,
        the support's work done once (`support_state`, reused under `state_key` if given).

        support {name: S x C x h x w}, support_masks S x H x W float32, query {name: N x C x h x w}
        -> log-probabilities N x 2 x H x W. (Q-Net's refinement enables gradients itself.)"""
        state = self.support_state(support, support_masks, state_key)
        n = next(iter(query.values())).shape[0]
        out = []
        for start in range(0, n, self.batch_size):
            q = {k: v[start:start + self.batch_size][None] for k, v in query.items()}   # 1 x n x C x h x w
            with self.autocast():
                out.append(self.model.segment_prepared(state, q).log_probs[0])
        return torch.cat(out)

    def segment_uncached(self, support_images: Sequence[np.ndarray], support_zs: Sequence[int],
                         support_masks: torch.Tensor, query_image: np.ndarray, zs: Sequence[int]) -> torch.Tensor:
        """The references' loop: for each query slice z, encode [the S support slices, slice z]
        together and segment z alone. support_images: S volumes Z x H x W (slice support_zs[s] of
        volume s is shot s), support_masks S x H x W -> log-probabilities N x 2 x H x W."""
        n_shots = len(support_zs)
        out = []
        for z in zs:
            batch = [slice_batch(image, [sz], self.device) for image, sz in zip(support_images, support_zs)]
            both = self.encode(torch.cat([*batch, slice_batch(query_image, [z], self.device)]))
            out.append(self.segment({k: v[:n_shots] for k, v in both.items()}, support_masks,
                                    {k: v[n_shots:] for k, v in both.items()}))
        return torch.cat(out)

    # ------------------------------------------------------------------ chunks
    def predict_chunks(self, support: ScanImage, support_zs: Sequence[int], support_masks: np.ndarray,
                       query: ScanImage, chunks: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Chunk i of the query (its slice indices) segmented with support slice support_zs[i] and
        its mask support_masks[i] (P x H x W, foreground nonzero) -> [log-probabilities
        len(chunks[i]) x 2 x H x W]. With the cache, all the support and query slices named are
        encoded first, so they share full batches. (1-shot: `predict_chunks_shots` with one shot.)"""
        return self.predict_chunks_shots([support], [[z] for z in support_zs],
                                         np.asarray(support_masks)[:, None], query, chunks)

    def predict_chunks_shots(self, supports: Sequence[ScanImage], support_zs: Sequence[Sequence[int]],
                             support_masks: np.ndarray, query: ScanImage,
                             chunks: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """K-shot chunks: chunk i of the query segmented with the S = len(supports) support slices
        support_zs[i][s] of scan supports[s] and their masks support_masks[i] (P x S x H x W,
        foreground nonzero) -> [log-probabilities len(chunks[i]) x 2 x H x W]. The support state is
        kept per chunk's (scan, slice, mask) of every shot. The query slices are encoded with only
        the maps the head reads for these support masks (`query_maps`, the union over the chunks)."""
        host_masks = np.asarray(support_masks).astype(np.float32)                               # P x S x H x W
        masks = torch.from_numpy(host_masks).to(self.device)
        if not chunks:
            return []
        if not self.cache_features:
            return [self.segment_uncached([s.image for s in supports], zs_s, shot_masks, query.image, zs)
                    for zs_s, shot_masks, zs in zip(support_zs, masks, chunks)]
        for s, scan in enumerate(supports):
            self.warm(scan, [zs_s[s] for zs_s in support_zs])
        maps = self.query_maps(host_masks)
        self.warm(query, np.concatenate([np.asarray(zs) for zs in chunks]), maps)
        out = []
        for zs_s, shot_masks, host_shot_masks, zs in zip(support_zs, masks, host_masks, chunks):
            shots = [self.features(scan, [z]) for scan, z in zip(supports, zs_s)]          # S x {name: 1 x C x h x w}
            support = {k: torch.cat([shot[k] for shot in shots]) for k in shots[0]}      # {name: S x C x h x w}
            key = tuple((scan.key, int(z), mask_digest(mask)) for scan, z, mask in zip(supports, zs_s, host_shot_masks))
            out.append(self.segment(support, shot_masks, self.features(query, zs, maps), state_key=key))
        return out
