"""Dataset specifications: label tables, file layout, scan discovery and the five folds.

A built-in dataset is described by `configs/datasets/<name>.yaml`; a dataset of your own by a
`dataset.json` in its folder (see README, "Bring your own data"). Both give a `DatasetSpec`.

File layout inside a dataset folder (`data_dir`), identical for every dataset:

    <data_dir>/<image_dir>/image_<id>.nii.gz      image, raw intensities (z-scored on load)
    <data_dir>/<image_dir>/label_<id>.nii.gz      ground truth, raw label values
    <data_dir>/supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz    3-D supervoxels (ADNet, Q-Net)
    <data_dir>/superpixels_<min_size>/superpix-MIDDLE_<id>.nii.gz  2-D superpixels (SSL-ALPNet, DSPNet)

Scans are paired by id, never by list position.

The optional `preprocessing` block of a spec (`Preprocessing`) says how raw scans became the
dataset's arrays (orientation, grid, intensity), so that a new scan can be prepared the same way
(`data/convert_nnunet.prepare_scan`, `scripts/segment.py`).
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from data.core.io import ConfigError, DataError, check_safe_name

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_SPEC_DIR = PROJECT_ROOT / "configs" / "datasets"

_IMAGE_RE = re.compile(r"^image_(\d+)\.nii(\.gz)?$")
_AXIS_LETTERS = ("RL", "AP", "SI")


@dataclass(frozen=True)
class Preprocessing:
    """How a raw scan becomes one of the dataset's arrays, in the order applied.

    1. `orientation`: SimpleITK DICOMOrient code (LAS: columns towards patient left, rows towards
       anterior, slices towards superior; nibabel axcodes use the same letters), or None to keep
       the scan's own axes (CMR short axis, SABS). A permutation/flip only, no interpolation.
    2. `intensity`: "clip_top" (MR: voxels above the `clip_percentile`-th percentile set to it),
       "ct_window" (CT: clip to `window` HU, rescale to [0, 255]) or "none".
    3. Grid, `in_plane`:
       - "spacing": resample to (`spacing` x, y, `z_spacing`) mm (z kept when `z_spacing` is None),
         then centre crop/pad in-plane to `size` x `size` (CHAOS, CMR, SYNTH);
       - "fit": remove round(L * `border`) pixels from each in-plane side, then resample so the
         remaining field of view spans `size` pixels, z kept (SABS: 32 of 512, 448 -> 256).
    `compat` is the resampling flavour of data/preprocessing.py ("reference" | "clean").
    """

    orientation: str | None = None
    in_plane: str = "spacing"
    spacing: tuple[float, float] | None = None
    border: float = 0.0
    z_spacing: float | None = None
    size: int = 256
    intensity: str = "none"
    clip_percentile: float = 99.5
    window: tuple[float, float] = (-125.0, 275.0)
    compat: str = "reference"

    IN_PLANE_RULES = ("spacing", "fit")
    INTENSITY_RULES = ("clip_top", "ct_window", "none")

    @classmethod
    def from_mapping(cls, d: dict, source: str) -> "Preprocessing":
        """Parse and check a `preprocessing` block; `DataError` naming `source` on any problem."""
        if not isinstance(d, dict):
            raise DataError(f"{source}: 'preprocessing' must be a mapping, got {type(d).__name__}")
        known = [f for f in cls.__dataclass_fields__]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise DataError(f"{source}: unknown preprocessing key(s) {unknown}; known keys are {known}")
        try:
            prep = cls(
                orientation=check_orientation(d.get("orientation"), source),
                in_plane=str(d.get("in_plane", "spacing")),
                spacing=tuple(float(v) for v in d["spacing"]) if d.get("spacing") is not None else None,
                border=float(d.get("border", 0.0)),
                z_spacing=float(d["z_spacing"]) if d.get("z_spacing") is not None else None,
                size=int(d.get("size", 256)),
                intensity=str(d.get("intensity", "none")),
                clip_percentile=float(d.get("clip_percentile", 99.5)),
                window=tuple(float(v) for v in d.get("window", (-125.0, 275.0))),
                compat=str(d.get("compat", "reference")),
            )
        except (TypeError, ValueError) as err:
            raise DataError(f"{source}: unreadable preprocessing block {d} ({err})") from None
        problems = []
        if prep.in_plane not in cls.IN_PLANE_RULES:
            problems.append(f"in_plane must be one of {cls.IN_PLANE_RULES}, got {prep.in_plane!r}")
        if prep.in_plane == "spacing" and (prep.spacing is None or len(prep.spacing) != 2
                                           or min(prep.spacing) <= 0):
            problems.append(f"in_plane 'spacing' needs spacing: [x, y] in mm (> 0), got {d.get('spacing')}")
        if not 0 <= prep.border < 0.5:
            problems.append(f"border must be a fraction in [0, 0.5), got {prep.border}")
        if prep.z_spacing is not None and prep.z_spacing <= 0:
            problems.append(f"z_spacing must be > 0 mm or null (keep), got {prep.z_spacing}")
        if prep.size < 8:
            problems.append(f"size must be at least 8 pixels, got {prep.size}")
        if prep.intensity not in cls.INTENSITY_RULES:
            problems.append(f"intensity must be one of {cls.INTENSITY_RULES}, got {prep.intensity!r}")
        if not 0 < prep.clip_percentile <= 100:
            problems.append(f"clip_percentile must be in (0, 100], got {prep.clip_percentile}")
        if len(prep.window) != 2 or not prep.window[0] < prep.window[1]:
            problems.append(f"window must be [low, high] HU with low < high, got {list(prep.window)}")
        if prep.in_plane == "fit" and prep.z_spacing is not None:
            problems.append("in_plane 'fit' keeps the slice spacing; set z_spacing: null")
        if prep.compat not in ("reference", "clean"):
            problems.append(f"compat must be 'reference' or 'clean', got {prep.compat!r}")
        if problems:
            raise DataError(f"{source}: preprocessing: " + "; ".join(problems))
        return prep

    def to_mapping(self) -> dict:
        """The block as written in dataset.json (inverse of `from_mapping`)."""
        return {"orientation": self.orientation, "in_plane": self.in_plane,
                "spacing": list(self.spacing) if self.spacing is not None else None,
                "border": self.border, "z_spacing": self.z_spacing, "size": self.size,
                "intensity": self.intensity, "clip_percentile": self.clip_percentile,
                "window": list(self.window), "compat": self.compat}


def check_orientation(code, source: str = "orientation") -> str | None:
    """A DICOMOrient code (one letter of each of R/L, A/P, S/I, e.g. LAS), upper-cased; None or
    "keep" mean keep the scan's own axes."""
    if code is None or str(code).lower() == "keep":
        return None
    code = str(code).upper()
    if len(code) != 3 or sorted(next((i for i, pair in enumerate(_AXIS_LETTERS) if c in pair), -1)
                                for c in code) != [0, 1, 2]:
        raise DataError(f"{source}: orientation {code!r} is not a DICOMOrient code; use three letters, "
                        f"one of each pair R/L, A/P, S/I (e.g. LAS, LPS, RAS), or keep")
    return code


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: the scans held out for testing and the scans to train on.

    `test_ids` holds the fold's block of scans in id order; the evaluation protocol picks the
    support scan among them (`supp_idx`) and uses the others as queries.
    """

    index: int
    test_ids: tuple[int, ...]
    train_ids: tuple[int, ...]

    def support_and_queries(self, supp_idx: int) -> tuple[int, tuple[int, ...]]:
        n = len(self.test_ids)
        if not -n <= supp_idx < n:
            raise ValueError(f"supp_idx={supp_idx} is out of range for fold {self.index}, which holds "
                             f"{n} scans {list(self.test_ids)}; use -{n}..{n - 1}")
        support = self.test_ids[supp_idx]
        return support, tuple(i for i in self.test_ids if i != support)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modality: str                      # "MR" or "CT"
    region: str                        # "abdomen", "cardiac", ... (selects per-region method defaults)
    image_dir: str                     # folder of image_<id>/label_<id>, relative to data_dir
    labels: dict[str, int]             # class name -> id, background included
    eval_labels: tuple[int, ...]       # classes evaluated by default
    setting2_groups: tuple[tuple[int, ...], ...]
    raw_label_values: dict[int, int] | None = None   # raw file value -> id (e.g. CMR 200 -> 1)
    expected_ids: tuple[int, ...] | None = None
    folds: tuple[tuple[int, ...], ...] | None = None  # explicit test blocks; computed when absent
    n_folds: int = 5
    table_order: tuple[int, ...] | None = None        # column order of result tables (papers' order)
    description: str = ""
    defaults: dict = field(default_factory=dict)
    preprocessing: Preprocessing | None = None        # how raw scans became these arrays

    # ---------------------------------------------------------------- labels
    @property
    def label_names(self) -> dict[int, str]:
        return {v: k for k, v in self.labels.items()}

    def label_name(self, label_id: int) -> str:
        try:
            return self.label_names[int(label_id)]
        except KeyError:
            raise ValueError(f"label id {label_id} is not in the {self.name} label table "
                             f"{self.labels}") from None

    def check_label_ids(self, ids, what: str = "label") -> tuple[int, ...]:
        ids = tuple(int(i) for i in ids)
        known = set(self.labels.values()) - {0}
        bad = [i for i in ids if i not in known]
        if bad:
            raise ConfigError(f"{what} {bad} not in the {self.name} label table "
                             f"({', '.join(f'{v} {k}' for k, v in self.labels.items() if v)})")
        return ids

    def map_labels(self, raw: np.ndarray, source: str = "label") -> np.ndarray:
        """Map the raw values of a label volume to class ids (uint8), rejecting unknown values."""
        values = np.unique(raw)
        if self.raw_label_values is not None:
            table = self.raw_label_values
        else:
            table = {v: v for v in self.labels.values()}
        unknown = [v for v in values.tolist() if v not in table]
        if unknown:
            raise DataError(f"{source} contains values {unknown[:10]} that are not in the {self.name} "
                            f"label table (allowed raw values {sorted(table)}). Check that the file "
                            f"belongs to this dataset and was preprocessed with its pipeline.")
        if all(k == v for k, v in table.items()):
            return raw.astype(np.uint8)
        lut_keys = np.array(sorted(table), dtype=np.float64)
        lut_vals = np.array([table[k] for k in sorted(table)], dtype=np.uint8)
        return lut_vals[np.searchsorted(lut_keys, raw)]

    # ---------------------------------------------------------------- files
    def image_folder(self, data_dir: str | Path) -> Path:
        return Path(data_dir) / self.image_dir

    def image_path(self, data_dir, scan_id: int) -> Path:
        return self.image_folder(data_dir) / f"image_{scan_id}.nii.gz"

    def label_path(self, data_dir, scan_id: int) -> Path:
        return self.image_folder(data_dir) / f"label_{scan_id}.nii.gz"

    @staticmethod
    def supervoxel_path(data_dir, scan_id: int, n_sv: int) -> Path:
        return Path(data_dir) / f"supervoxels_{n_sv}" / f"superpix-MIDDLE_{scan_id}.nii.gz"

    @staticmethod
    def superpixel_path(data_dir, scan_id: int, min_size: int = 400) -> Path:
        return Path(data_dir) / f"superpixels_{min_size}" / f"superpix-MIDDLE_{scan_id}.nii.gz"

    def scan_ids(self, data_dir: str | Path, require_labels: bool = True) -> tuple[int, ...]:
        """Ids of the scans in `data_dir`, sorted numerically; every image must have its label."""
        folder = self.image_folder(data_dir)
        if not Path(data_dir).is_dir():
            raise DataError(f"{self.name} data directory not found: {data_dir}. Put the preprocessed "
                            f"dataset there (see data/README.md) or pass data_dir=<folder>.")
        if not folder.is_dir():
            raise DataError(f"{self.name} data directory {data_dir} has no '{self.image_dir}/' folder "
                            f"holding image_<id>.nii.gz / label_<id>.nii.gz; is data_dir pointing at "
                            f"the right dataset?")
        ids = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _IMAGE_RE.match(p.name)))
        if not ids:
            raise DataError(f"no image_<id>.nii.gz files in {folder}")
        if require_labels:
            missing = [i for i in ids if not self.label_path(data_dir, i).is_file()]
            if missing:
                raise DataError(f"{len(missing)} image(s) in {folder} have no label file: "
                                + ", ".join(f"image_{i}.nii.gz needs label_{i}.nii.gz" for i in missing[:5]))
        return tuple(ids)

    # ---------------------------------------------------------------- folds
    def fold(self, ids: tuple[int, ...], index: int, scheme: str = "alpnet") -> Fold:
        """Fold `index` over the scans `ids` (sorted numerically).

        Without explicit folds, the n scans are cut into `n_folds` consecutive blocks; the test
        block of fold k is block k plus the first scan of the next block (circularly), so
        consecutive folds share one scan. Both reference schemes hold the same scans; they differ
        in the order in which `supp_idx` indexes them, which matters for the last fold:

        - "alpnet" (SSL-ALPNet): block order, the wrapped-around scan last. With supp_idx=-1 the
          support is the scan after the test block (CHAOS fold 4: test 36-39, support 1).
        - "qnet" (ADNet / Q-Net `get_folds`): sorted by id (CHAOS fold 4: [1, 36, 37, 38, 39];
          ADNet's support is the last, 39; Q-Net's val.sh takes supp_idx=2, 37).
        """
        if scheme not in ("alpnet", "qnet"):
            raise ValueError(f"fold scheme must be 'alpnet' or 'qnet', got {scheme!r}")
        ids = tuple(sorted(ids))
        if not 0 <= index < self.n_folds:
            raise ValueError(f"eval_fold={index} is out of range: {self.name} has folds 0..{self.n_folds - 1}")
        if self.folds is not None:
            test = tuple(self.folds[index])
            missing = [i for i in test if i not in ids]
            if missing:
                raise DataError(f"fold {index} of {self.name} lists scans {missing} that are not in the data")
        else:
            n = len(ids)
            if n < self.n_folds + 1:
                raise DataError(f"{self.name} has {n} scans; {self.n_folds}-fold evaluation needs at "
                                f"least {self.n_folds + 1}")
            bounds = np.floor(np.linspace(0, n, self.n_folds + 1)).astype(int)
            start, stop = bounds[index], bounds[index + 1]
            test = tuple(ids[j % n] for j in range(start, stop + 1))
        if scheme == "qnet":
            test = tuple(sorted(test))
        train = tuple(i for i in ids if i not in test)
        return Fold(index, test, train)


def _from_mapping(d: dict, source: str) -> DatasetSpec:
    required = ("name", "modality", "image_dir", "labels")
    missing = [k for k in required if k not in d]
    if missing:
        raise DataError(f"dataset description {source} lacks {missing}")
    check_safe_name(str(d["name"]), "dataset name", source)
    labels = {str(k): int(v) for k, v in d["labels"].items()}
    for label_name in labels:
        check_safe_name(label_name, "label name", source)
    if 0 not in labels.values():
        raise DataError(f"{source}: the label table must contain background with id 0")
    eval_labels = tuple(int(i) for i in d.get("eval_labels", [v for v in labels.values() if v]))
    raw = d.get("raw_label_values")
    spec = DatasetSpec(
        name=str(d["name"]),
        modality=str(d["modality"]).upper(),
        region=str(d.get("region", "other")),
        image_dir=str(d["image_dir"]),
        labels=labels,
        eval_labels=eval_labels,
        setting2_groups=tuple(tuple(int(i) for i in g) for g in d.get("setting2_groups", [eval_labels])),
        raw_label_values={int(float(k)): int(v) for k, v in raw.items()} if raw else None,
        expected_ids=tuple(int(i) for i in d["expected_ids"]) if d.get("expected_ids") else None,
        folds=tuple(tuple(int(i) for i in f) for f in d["folds"]) if d.get("folds") else None,
        n_folds=int(len(d["folds"]) if d.get("folds") else d.get("n_folds", 5)),
        table_order=tuple(int(i) for i in d["table_order"]) if d.get("table_order") else None,
        description=str(d.get("description", "")),
        defaults=dict(d.get("defaults", {})),
        preprocessing=Preprocessing.from_mapping(d["preprocessing"], source)
        if d.get("preprocessing") is not None else None,
    )
    if spec.modality not in ("MR", "CT"):
        raise DataError(f"{source}: modality must be MR or CT, got {spec.modality!r}")
    spec.check_label_ids(spec.eval_labels, "eval_labels")
    return spec


# the keys of a dataset description (configs/datasets/*.yaml); `defaults` holds the config defaults
# a dataset supplies
DESCRIPTION_KEYS = ("name", "description", "modality", "region", "image_dir", "labels", "raw_label_values",
                    "eval_labels", "table_order", "setting2_groups", "expected_ids", "folds", "n_folds",
                    "defaults", "preprocessing")
DATASET_DEFAULT_KEYS = ("n_sv", "superpixel_threshold")


def _refuse_unknown_keys(d, path: Path) -> None:
    """A misspelt key of a built-in description would be ignored silently: name it, and the closest key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a dataset description is a mapping of keys, got {type(d).__name__}")
    found = [(k, DESCRIPTION_KEYS, "") for k in d if k not in DESCRIPTION_KEYS]
    found += [(k, DATASET_DEFAULT_KEYS, "defaults.") for k in (d.get("defaults") or {})
              if k not in DATASET_DEFAULT_KEYS]
    if found:
        problems = []
        for key, known, prefix in found:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"unknown key '{prefix}{key}'" + (f" (did you mean '{prefix}{close[0]}'?)" if close else ""))
        raise ConfigError(f"{path}: " + "; ".join(problems) + f". The keys are {', '.join(DESCRIPTION_KEYS)}")


def builtin_names() -> list[str]:
    return sorted(yaml.safe_load(p.read_text())["name"] for p in BUILTIN_SPEC_DIR.glob("*.yaml"))


def load_spec(name: str, data_dir: str | Path | None = None) -> DatasetSpec:
    """The spec of a built-in dataset (by name, any case), or of the dataset.json in `data_dir`."""
    path = BUILTIN_SPEC_DIR / f"{name.lower()}.yaml"
    if path.is_file():
        d = yaml.safe_load(path.read_text())
        _refuse_unknown_keys(d, path)
        return _from_mapping(d, str(path))
    if data_dir is not None and (Path(data_dir) / "dataset.json").is_file():
        spec = load_generic_spec(data_dir)
        if spec.name.upper() != str(name).upper():
            raise DataError(f"dataset={name} but {Path(data_dir) / 'dataset.json'} describes the dataset "
                            f"{spec.name!r}: set dataset={spec.name}, or point data_dir at the folder of {name}")
        return spec
    known = builtin_names()
    close = difflib.get_close_matches(name.upper(), known, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise DataError(f"unknown dataset {name!r}. Built-in datasets: {', '.join(known)}; a dataset of "
                    f"your own needs a dataset.json in its data_dir.{hint}")


def load_generic_spec(data_dir: str | Path) -> DatasetSpec:
    """Spec of a dataset folder described by its dataset.json (see README, "Bring your own data")."""
    path = Path(data_dir) / "dataset.json"
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{data_dir} has no dataset.json") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    return generic_spec(d, str(path))


def generic_spec(description: dict, source: str = "dataset.json") -> DatasetSpec:
    """Spec from the content of a dataset.json (`image_dir` defaults to the dataset folder itself)."""
    return _from_mapping({"image_dir": ".", **description}, source)


def pseudolabel_command(data_dir: str | Path, dataset: str, folder: str) -> str:
    """The command that (re)generates the pseudolabel folder `folder` (supervoxels_N / superpixels_N)."""
    kind, _, size = folder.partition("_")
    kind = "superpixels" if kind == "superpixels" else "supervoxels"
    return f"python -m data.pseudolabels {data_dir} --dataset {dataset} --kind {kind} --min-size {size}"
