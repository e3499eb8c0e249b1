"""The evaluation protocol: one module, used unchanged by every method.

For one fold (dataloaders/specs.py: `DatasetSpec.fold`) and each evaluated class c:

1. Support: scan `fold.test_ids[supp_idx]`; with C the sorted slices containing c, the `n_part`
   support slices are C[floor(len(C) q_i)], q_i = 1/(2n) + i (1 - 1/n) / (n - 1) (1/6, 1/2, 5/6 for
   n = 3; 1/2 for n = 1).
2. Queries: the other scans of the fold. Scored slices (`scored`): ``labelled`` = the slices that
   contain c; ``range`` = every slice from the first to the last that contains c (SSL-ALPNet's
   z_min..z_max; equal to ``labelled`` unless the organ skips a slice).
3. Chunks (`chunking`): ``count`` (Q-Net, ADNet's EP1) cuts the scored slices into n_part runs of
   equal count, bounds floor(linspace(0, n_scored, n_part + 1)); ``zrange`` (SSL-ALPNet) assigns
   slice z to part floor((z - z_min) / ((z_max - z_min) / n_part)), clipped. Chunk i is segmented
   with support slice i.
4. Each query slice is predicted from its chunk's single support slice and mask (1-way 1-shot);
   the prediction is the argmax of [bg, fg].
5. Per query scan: TP, FP, FN summed over its scored slices; Dice = 2TP / (2TP + FP + FN),
   IoU = TP / (TP + FP + FN). A class's score is the mean over query scans; the overall score is
   the mean over classes. Slices outside the scored set are never counted (as in every reference).

Speed without changing the numbers: each query slice is encoded once per scan and reused for every
class, support slices once per class and part, and the slices of a chunk go through the head in
batches of `batch_size`. `cache_features=False` (with batch_size 1) runs the references' loop
instead: support and query encoded together for every query slice of every class; the benchmark
times both ways.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from data.io import DataError
from dataloaders.specs import DatasetSpec, Fold
from dataloaders.volumes import Scan, VolumeStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProtocolOptions:
    supp_idx: int = -1
    n_part: int = 3
    chunking: str = "zrange"        # "zrange" (SSL-ALPNet) or "count" (Q-Net)
    scored: str = "range"           # "range" (SSL-ALPNet) or "labelled" (Q-Net)
    fold_scheme: str = "alpnet"     # order of the fold's scans for supp_idx (see specs.Fold)
    batch_size: int = 16            # query slices per head call
    cache_features: bool = True     # False: re-encode support + query for every slice, as the references

    def __post_init__(self):
        if self.chunking not in ("zrange", "count"):
            raise ValueError(f"eval.chunking must be 'zrange' or 'count', got {self.chunking!r}")
        if self.scored not in ("range", "labelled"):
            raise ValueError(f"eval.scored must be 'range' or 'labelled', got {self.scored!r}")
        if self.n_part < 1:
            raise ValueError(f"eval.n_part must be >= 1, got {self.n_part}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------- slice choice
def support_fractions(n_part: int) -> list[float]:
    if n_part == 1:
        return [0.5]
    return [1 / (2 * n_part) + i * (1 - 1 / n_part) / (n_part - 1) for i in range(n_part)]


def support_slices(labelled: np.ndarray, n_part: int) -> list[int]:
    """The support slice of each part: labelled[floor(len * q_i)] (C = 24, n = 3 -> 4, 12, 20)."""
    return [int(labelled[int(len(labelled) * q)]) for q in support_fractions(n_part)]


def scored_slices(labelled: np.ndarray, mode: str) -> np.ndarray:
    if mode == "labelled" or len(labelled) == 0:
        return labelled
    return np.arange(labelled.min(), labelled.max() + 1)


def chunk_of_slices(scored: np.ndarray, n_part: int, mode: str) -> np.ndarray:
    """Part index (0..n_part-1) of every scored slice."""
    n = len(scored)
    if mode == "count":
        bounds = np.floor(np.linspace(0, n, n_part + 1)).astype(int)
        return np.searchsorted(bounds, np.arange(n), side="right") - 1
    z_min, z_max = scored.min(), scored.max()
    if z_max == z_min:
        return np.zeros(n, dtype=int)
    part = np.floor((scored - z_min) / ((z_max - z_min) / n_part)).astype(int)
    return np.clip(part, 0, n_part - 1)


# ----------------------------------------------------------------------------- results
@dataclass
class ScanScore:
    class_id: int
    class_name: str
    scan_id: int
    tp: int
    fp: int
    fn: int
    n_slices: int

    @property
    def dice(self) -> float:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else float("nan")

    @property
    def iou(self) -> float:
        d = self.tp + self.fp + self.fn
        return self.tp / d if d else float("nan")


@dataclass
class EvaluationResult:
    dataset: str
    fold: int
    support_id: int
    query_ids: tuple[int, ...]
    scores: list[ScanScore] = field(default_factory=list)
    predictions: dict = field(default_factory=dict)   # (scan_id, class_id) -> Z x H x W uint8
    support_slices: dict = field(default_factory=dict)  # class_id -> [z per part]
    seconds: float = 0.0
    n_query_slices: int = 0

    def class_ids(self) -> list[int]:
        return sorted({s.class_id for s in self.scores})

    def class_scores(self, class_id: int) -> list[ScanScore]:
        return [s for s in self.scores if s.class_id == class_id]

    def class_mean(self, class_id: int, metric: str = "dice") -> float:
        values = [getattr(s, metric) for s in self.class_scores(class_id)]
        return float(np.mean(values)) if values else float("nan")

    def class_std(self, class_id: int, metric: str = "dice") -> float:
        values = [getattr(s, metric) for s in self.class_scores(class_id)]
        return float(np.std(values)) if values else float("nan")

    def mean(self, metric: str = "dice") -> float:
        values = [self.class_mean(c, metric) for c in self.class_ids()]
        return float(np.mean(values)) if values else float("nan")


def count_overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """TP, FP, FN of two binary arrays."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


# ----------------------------------------------------------------------------- inference
def _slice_batch(scan: Scan, zs, device) -> torch.Tensor:
    """Slices zs of a scan as N x 3 x H x W on the device (grey repeated into 3 channels)."""
    x = torch.from_numpy(np.ascontiguousarray(scan.image[np.asarray(zs)])).to(device)
    return x[:, None].expand(-1, 3, -1, -1)


def _take(features: dict, index) -> dict:
    return {k: v[index] for k, v in features.items()}


class Evaluator:
    """Runs a few-shot model through the protocol on one fold.

    The model needs `encode(images N x 3 x H x W) -> {name: N x ...}` and
    `segment(support {name: 1 x S x ...}, support_masks 1 x S x H x W, query {name: 1 x Q x ...})
    -> HeadOutput` (models/fewshot.py).
    """

    def __init__(self, model, store: VolumeStore, spec: DatasetSpec, fold: Fold, options: ProtocolOptions,
                 device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                 progress: bool = True):
        self.model = model
        self.store = store
        self.spec = spec
        self.fold = fold
        self.options = options
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.progress = progress
        self.support_id, self.query_ids = fold.support_and_queries(options.supp_idx)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def _encode(self, scan: Scan, zs) -> dict:
        feats = []
        for start in range(0, len(zs), self.options.batch_size):
            with self._autocast():
                f = self.model.encode(_slice_batch(scan, zs[start:start + self.options.batch_size], self.device))
            feats.append({k: v.float() for k, v in f.items()})
        return {k: torch.cat([f[k] for f in feats]) for k in feats[0]}

    def _support_labelled(self, class_id: int) -> np.ndarray:
        labelled = self.store.scan(self.support_id).slices_with(class_id)
        if len(labelled) == 0:
            raise DataError(f"support scan {self.support_id} of fold {self.fold.index} contains no "
                            f"{self.spec.label_name(class_id)} (class {class_id}); choose another "
                            f"support with evaluation.supp_idx or drop the class from test_labels")
        return labelled

    def _supports(self, class_ids) -> dict[int, tuple[list[int], dict, torch.Tensor]]:
        """class -> (support slices, their features, their masks). Classes share slices of the one
        support scan, so each distinct slice is encoded once, as on the query side."""
        scan = self.store.scan(self.support_id)
        slices = {c: support_slices(self._support_labelled(c), self.options.n_part) for c in class_ids}
        feats, rows_of = self._encode_distinct(scan, slices.values())
        out = {}
        for c, zs in slices.items():
            masks = torch.from_numpy((scan.label[zs] == c).astype(np.float32)).to(self.device)
            out[c] = (zs, _take(feats, rows_of(zs)), masks)
        return out

    def _encode_distinct(self, scan: Scan, slice_lists) -> tuple[dict, Callable]:
        """Encode every slice named in any of the lists once -> (features of the distinct slices in
        ascending z, rows_of(zs): the rows of those features holding slices zs)."""
        needed = np.unique(np.concatenate([np.asarray(zs) for zs in slice_lists]))
        row_of = {int(z): i for i, z in enumerate(needed)}

        def rows_of(zs) -> torch.Tensor:
            return torch.as_tensor([row_of[int(z)] for z in zs], device=self.device)
        return self._encode(scan, needed), rows_of

    def _predict(self, support_feats: dict, support_mask: torch.Tensor, query_feats: dict) -> torch.Tensor:
        """One support (feats with leading 1, mask H x W) against Q query slices -> Q x H x W bool."""
        out = []
        n = next(iter(query_feats.values())).shape[0]
        for start in range(0, n, self.options.batch_size):
            q = {k: v[start:start + self.options.batch_size][None] for k, v in query_feats.items()}
            s = {k: v[None, None] for k, v in support_feats.items()}
            with self._autocast():
                log_probs = self.model.segment(s, support_mask[None, None], q).log_probs
            out.append(log_probs[0, :, 1] > log_probs[0, :, 0])   # argmax, a tie goes to background
        return torch.cat(out)

    def _predict_uncached(self, scan: Scan, zs, class_id: int, support_z: int) -> torch.Tensor:
        """The references' loop: for each query slice, encode [support slice, query slice] together."""
        support = self.store.scan(self.support_id)
        mask = torch.from_numpy((support.label[support_z] == class_id).astype(np.float32)).to(self.device)
        out = []
        for z in zs:
            with torch.no_grad(), self._autocast():
                both = self.model.encode(torch.cat([_slice_batch(support, [support_z], self.device),
                                                    _slice_batch(scan, [z], self.device)]))
            both = {k: v.float() for k, v in both.items()}
            with self._autocast():
                log_probs = self.model.segment({k: v[:1][None] for k, v in both.items()}, mask[None, None],
                                               {k: v[1:][None] for k, v in both.items()}).log_probs
            out.append(log_probs[0, :, 1] > log_probs[0, :, 0])
        return torch.cat(out)

    def run(self, class_ids) -> EvaluationResult:
        start = time.perf_counter()
        self.model.eval()
        opts = self.options
        result = EvaluationResult(self.spec.name, self.fold.index, self.support_id, self.query_ids)
        supports = {}
        if opts.cache_features:
            for c, (zs, feats, masks) in self._supports(class_ids).items():
                supports[c] = (feats, masks)
                result.support_slices[c] = zs
        else:
            for c in class_ids:
                result.support_slices[c] = support_slices(self._support_labelled(c), opts.n_part)
        bar = tqdm(self.query_ids, desc=f"fold {self.fold.index} queries", disable=not self.progress,
                   unit="scan")
        for scan_id in bar:
            scan = self.store.scan(scan_id)
            plan = {}
            for c in class_ids:
                labelled = scan.slices_with(c)
                if len(labelled) == 0:
                    log.warning("query scan %d has no %s; it is not scored for this class",
                                scan_id, self.spec.label_name(c))
                    continue
                scored = scored_slices(labelled, opts.scored)
                plan[c] = (scored, chunk_of_slices(scored, opts.n_part, opts.chunking))
            if not plan:
                continue
            if opts.cache_features:
                feats, rows_of = self._encode_distinct(scan, [p[0] for p in plan.values()])
            for c, (scored, parts) in plan.items():
                pred_volume = np.zeros(scan.image.shape, dtype=np.uint8)
                for part in range(opts.n_part):
                    zs = scored[parts == part]
                    if len(zs) == 0:
                        continue
                    if opts.cache_features:
                        s_feats, s_masks = supports[c]
                        pred = self._predict(_take(s_feats, part), s_masks[part], _take(feats, rows_of(zs)))
                    else:
                        pred = self._predict_uncached(scan, zs, c, result.support_slices[c][part])
                    pred_volume[zs] = pred.cpu().numpy()
                truth = scan.label[scored] == c
                tp, fp, fn = count_overlap(pred_volume[scored], truth)
                result.scores.append(ScanScore(c, self.spec.label_name(c), scan_id, tp, fp, fn, len(scored)))
                result.predictions[(scan_id, c)] = pred_volume
                result.n_query_slices += len(scored)
        result.seconds = time.perf_counter() - start
        return result
