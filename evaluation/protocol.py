"""The evaluation protocol: one module, used unchanged by every method.

For one fold (data/core/specs.py: `DatasetSpec.fold`) and each evaluated class c:

1. Support: scan `fold.test_ids[supp_idx]`; with C the sorted slices containing c, the `n_part`
   support slices are C[floor(len(C) q_i)], q_i = 1/(2n) + i (1 - 1/n) / (n - 1) (1/6, 1/2, 5/6 for
   n = 3; 1/2 for n = 1). K-shot (`n_shot` = K > 1, `support_scans`): that scan and the K - 1 scans
   that follow it in the dataset's scan list (ascending ids, circularly), skipping the fold's test
   scans; each shot's support slices are chosen in its own scan by the same rule, and part i is
   segmented with the K slices i of the K scans (S = K shots).
2. Queries: the other scans of the fold (the same for every K). Scored slices (`scored`): ``labelled`` = the slices that
   contain c; ``range`` = every slice from the first to the last that contains c (SSL-ALPNet's
   z_min..z_max; equal to ``labelled`` unless the organ skips a slice).
3. Chunks (`chunking`): ``count`` (Q-Net, ADNet's EP1) cuts the scored slices into n_part runs of
   equal count, bounds floor(linspace(0, n_scored, n_part + 1)); ``zrange`` (SSL-ALPNet) assigns
   slice z to part floor((z - z_min) / ((z_max - z_min) / n_part)), clipped. Chunk i is segmented
   with support slice i.
4. Each query slice is predicted from its chunk's support slice and mask (1-way 1-shot; K shots:
   its K support slices and masks, combined as each head's reference combines shots); the
   prediction is the argmax of [bg, fg].
5. Per query scan: TP, FP, FN summed over its scored slices; Dice = 2TP / (2TP + FP + FN),
   IoU = TP / (TP + FP + FN). A class's score is the mean over query scans; the overall score is
   the mean over classes. Slices outside the scored set are never counted (as in every reference).
   Beside them, HD95 and ASSD in mm on the same slices (evaluation/surface.py).

Cross-domain (`eval_dataset` other than the training dataset): the same rules on the evaluated
dataset's fold `eval_fold`; the test classes (ids of the training dataset) are matched to the
evaluated dataset's by organ name (`match_classes`).

Which K support scans. SSL-ALPNet's K-shot evaluation extends the fold's validation block by K scans
(`pids[SEP[k]:SEP[k+1] + nsup]`) and takes the last K as supports, so its queries stay the fold's
test scans; `support_scans` takes the same scans for the alpnet fold scheme (CHAOS fold 0, K = 3:
8, 10, 13; queries 1, 2, 3, 5), and the same rule for any supp_idx and scheme. The K - 1 added scans
are training scans of the fold: their images may have been seen by the self-supervised training
(setting 1), never their labels (pseudolabels only; sampler.use_gt excludes the test classes), as
SSL-ALPNet's would be when one training serves every K. The query set is the 1-shot one, so
K-shot numbers compare query scan by query scan with 1-shot numbers.

Running a model through these rules (support encoding, query batching, the references' uncached
loop) is the engine's: `Evaluator` in models/engine/evaluation.py, on models/engine/predictor.py.
No model is called here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from data.core.errors import ConfigError


@dataclass(frozen=True)
class ProtocolOptions:
    supp_idx: int = -1
    n_part: int = 3
    chunking: str = "zrange"        # "zrange" (SSL-ALPNet) or "count" (Q-Net)
    scored: str = "range"           # "range" (SSL-ALPNet) or "labelled" (Q-Net)
    fold_scheme: str = "alpnet"     # order of the fold's scans for supp_idx (see specs.Fold)
    n_shot: int = 1                 # support scans K (support_scans)
    batch_size: int = 16            # query slices per head call
    cache_features: bool = True     # False: re-encode support + query for every slice, as the references

    def __post_init__(self):
        if self.chunking not in ("zrange", "count"):
            raise ValueError(f"eval.chunking must be 'zrange' or 'count', got {self.chunking!r}")
        if self.scored not in ("range", "labelled"):
            raise ValueError(f"eval.scored must be 'range' or 'labelled', got {self.scored!r}")
        if self.n_shot < 1:
            raise ValueError(f"evaluation.n_shot must be >= 1, got {self.n_shot}")
        if self.n_part < 1:
            raise ValueError(f"eval.n_part must be >= 1, got {self.n_part}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------- support scans
def support_scans(fold, supp_idx: int, n_shot: int, dataset: str = "the dataset") -> tuple[int, ...]:
    """The K = `n_shot` support scans of a fold (`data.core.specs.Fold`): the fold's support
    `fold.test_ids[supp_idx]`, then the scans that follow it in the dataset's scan list (ascending
    ids, circularly), skipping the fold's test scans, so that no query becomes a support
    (CHAOS fold 0, supp_idx -1, K = 3: (8, 10, 13)). Too few scans outside the fold is a ConfigError
    naming evaluation.n_shot."""
    support = fold.support_and_queries(supp_idx)[0]
    if n_shot == 1:
        return (support,)
    ids = sorted(set(fold.test_ids) | set(fold.train_ids))
    start = ids.index(support)
    following = [ids[(start + k) % len(ids)] for k in range(1, len(ids))]
    extra = [i for i in following if i not in fold.test_ids]
    if len(extra) < n_shot - 1:
        raise ConfigError(f"evaluation.n_shot={n_shot} needs {n_shot - 1} support scans besides scan {support}, "
                          f"outside fold {fold.index} of {dataset}, which leaves {len(extra)} "
                          f"({len(ids)} scans, {len(fold.test_ids)} in the fold); use evaluation.n_shot <= "
                          f"{len(extra) + 1}")
    return (support, *extra[:n_shot - 1])


# ----------------------------------------------------------------------------- classes across datasets
# Organ names that differ between the built-in datasets' label tables (SABS: KID_R, KID_l; CHAOS: RK, LK).
ORGAN_SYNONYMS = {"RK": "KIDNEY_RIGHT", "KID_R": "KIDNEY_RIGHT", "RIGHT_KIDNEY": "KIDNEY_RIGHT",
                  "LK": "KIDNEY_LEFT", "KID_L": "KIDNEY_LEFT", "LEFT_KIDNEY": "KIDNEY_LEFT",
                  "BG": "BACKGROUND", "BGD": "BACKGROUND"}


def organ_key(name: str) -> str:
    """The organ a label name means: upper case, '-' and spaces as '_', then ORGAN_SYNONYMS."""
    key = re.sub(r"[\s-]+", "_", str(name).strip().upper())
    return ORGAN_SYNONYMS.get(key, key)


def match_classes(train_spec, eval_spec, class_ids, key: str = "test_labels") -> dict[int, int]:
    """{class id of the training dataset: the id of the same organ in the evaluated dataset}, organs
    matched by name (`organ_key`); an organ the evaluated dataset lacks is a ConfigError naming it."""
    by_organ = {organ_key(name): i for name, i in eval_spec.labels.items() if i}
    matched = {}
    for c in class_ids:
        name = train_spec.label_name(int(c))
        if organ_key(name) not in by_organ:
            known = ", ".join(f"{n} ({i})" for n, i in eval_spec.labels.items() if i)
            raise ConfigError(f"{key}: class {c} {name} of {train_spec.name} has no organ of that name in "
                              f"eval_dataset {eval_spec.name} (its classes: {known}); drop it from {key}")
        matched[int(c)] = by_organ[organ_key(name)]
    return matched


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


@dataclass(frozen=True)
class QueryPlan:
    """The protocol applied to one query scan and class (steps 2-3): `chunks[i]` holds the scored
    slices of part `parts[i]` and is segmented with that part's support slice. Parts without any
    scored slice are left out."""

    scored: np.ndarray                  # the scored slices, ascending z
    parts: tuple[int, ...]              # the parts that hold scored slices, ascending
    chunks: tuple[np.ndarray, ...]      # the scored slices of each of those parts


def plan_query(scored: np.ndarray, n_part: int, chunking: str) -> QueryPlan:
    """Cut a query's scored slices (non-empty, ascending) into the chunks of the n_part support slices."""
    part_of = chunk_of_slices(scored, n_part, chunking)
    parts = tuple(part for part in range(n_part) if (part_of == part).any())
    return QueryPlan(scored, parts, tuple(scored[part_of == part] for part in parts))


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
    # on the same scored slices, in mm of the scan's grid (evaluation/surface.py: nan/inf for an empty mask)
    hd95_mm: float = float("nan")
    assd_mm: float = float("nan")

    @property
    def dice(self) -> float:
        return dice_score(self.tp, self.fp, self.fn)

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
    support_slices: dict = field(default_factory=dict)  # class_id -> [z per part] of support_id (the first shot)
    support_ids: tuple[int, ...] = ()                    # the K support scans, support_id first
    shot_slices: dict = field(default_factory=dict)      # class_id -> [[z per part] per support scan]
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


def dice_score(tp: int, fp: int, fn: int) -> float:
    """2TP / (2TP + FP + FN); NaN when both masks are empty."""
    d = 2 * tp + fp + fn
    return 2 * tp / d if d else float("nan")
