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
import math
import numbers
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from data.core.io import ConfigError, DataError, check_safe_name

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_SPEC_DIR = PROJECT_ROOT / "configs" / "datasets"

_IMAGE_RE = re.compile(r"^image_(\d+)\.nii(\.gz)?$")


# ----------------------------------------------------------------------------- YAML files
class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (`*name`): no configuration needs them, and a few nested
    ones (an "alias bomb") expand a small file into gigabytes once the values are copied or walked."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.anchor, event.start_mark)
        return super().compose_node(parent, index)


class _AliasRefused(yaml.YAMLError):
    def __init__(self, anchor, mark):
        super().__init__(f"alias *{anchor}")
        self.anchor, self.mark = anchor, mark


def read_yaml(stream, source: str):
    """The plain data of a YAML text or open file that a user gives (configs/*.yaml, `with my.yaml`,
    configs/datasets/*.yaml), read as yaml.safe_load reads it but refusing aliases; a refused alias,
    invalid YAML or nesting too deep for the parser is a ConfigError naming `source`."""
    try:
        return yaml.load(stream, Loader=_NoAliasLoader)
    except _AliasRefused as err:
        raise ConfigError(f"{source}: YAML aliases are not accepted (found *{err.anchor} at line "
                          f"{err.mark.line + 1}); write the values out instead") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to be a configuration") from None


def read_yaml_file(path: str | Path):
    """`read_yaml` of the file at `path` (the ConfigError names it)."""
    return read_yaml(Path(path).read_text(), str(path))
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
        _preprocessing_numbers(d, source)
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


def _preprocessing_numbers(d: dict, source: str) -> None:
    """Numbers of a preprocessing block are numbers (not "1.25"), `size` a whole one (not 256.5)."""
    for key in ("border", "z_spacing", "clip_percentile", "size"):
        if d.get(key) is not None:
            _real(d[key], source, f"preprocessing.{key}", key)
    if d.get("size") is not None:
        _whole(d["size"], source, "preprocessing.size", "size")
    for key in ("spacing", "window"):
        if d.get(key) is not None:
            if not isinstance(d[key], (list, tuple)):
                raise _refusal(source, f"preprocessing.{key}", f"must be a list of two numbers, got {_show(d[key])}")
            for value in d[key]:
                _real(value, source, f"preprocessing.{key}", f"a value of {key}")


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
        if not all(0 <= v <= MAX_LABEL_ID for v in table.values()):      # _from_mapping refuses such a table
            raise DataError(f"the {self.name} label table holds ids outside 0-{MAX_LABEL_ID} "
                            f"({sorted(v for v in table.values() if not 0 <= v <= MAX_LABEL_ID)[:10]}); class ids "
                            f"are held as 8-bit values and would wrap onto other classes")
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


# ----------------------------------------------------------------------------- checking a description
# A description decides which voxels count as which organ, which scans are scored, and where commands
# write: everything it says is checked here, once, for every command that reads one (training,
# validation, data.verify, data.classmap, data.pseudolabels, segment, the converter). Each refusal is a
# `DataError` "<file>: <field>: <what is wrong and how to fix it>", its lists cut to a few items.
MAX_LABEL_ID = 255               # labels are held as 8-bit class ids (DatasetSpec.map_labels -> uint8)
MAX_LABELS = MAX_LABEL_ID + 1    # classes in `labels`, background included
MAX_NAME_CHARS = 64              # a dataset or class name (data.core.io.SAFE_NAME_RULE)
MAX_GROUP_CHARS = 120            # an evaluated group's ids joined by '-' in run folder names (255 bytes at most)
ALLOW_OUTSIDE = "allow_outside"  # true: image_dir may be absolute or leave the dataset folder with '..'
_SHOWN = 10                      # items quoted in one message


def _refusal(source: str, key: str, text: str) -> DataError:
    return DataError(f"{source}: {key}: {text}")


def _show(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _few(items) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:_SHOWN]) + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _whole(value, source: str, key: str, what: str) -> int:
    """`value` as an int: a number without a fraction (3, or 3.0), never a string ("3"), a bool or 2.5."""
    if not (_is_number(value) and math.isfinite(value) and float(value).is_integer()):
        raise _refusal(source, key, f"{what} is {_show(value)}, not a whole number; write it as a number "
                                    f"without quotes or decimals (e.g. 3)")
    return int(value)


def _real(value, source: str, key: str, what: str) -> float:
    """`value` as a float: a finite number, never a string ("1.25") or a bool."""
    if not (_is_number(value) and math.isfinite(value)):
        raise _refusal(source, key, f"{what} is {_show(value)}, not a number; write it without quotes (e.g. 1.25)")
    return float(value)


def _text(value, source: str, key: str, example: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _refusal(source, key, f"must be a non-empty text, e.g. {example}; got {_show(value)}")
    return value


def _id_list(value, source: str, key: str, what: str, low: int = 0) -> tuple[int, ...]:
    """A non-empty list of distinct whole numbers >= `low`."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _refusal(source, key, f"must be a non-empty list of {what}s, e.g. [1, 4]; got {_show(value)}")
    ids = tuple(_whole(v, source, key, f"a {what}") for v in value)
    below = [i for i in ids if i < low]
    if below:
        raise _refusal(source, key, f"{what}s must be >= {low}, got {_few(below)}")
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    if twice:
        raise _refusal(source, key, f"{what} {_few(twice)} listed twice; list each once")
    return ids


def _label_table(value, source: str) -> dict[str, int]:
    """`labels`: class name -> id; ids 0-255 (8-bit label volumes), one name per id, background 0."""
    key = "labels"
    if not isinstance(value, dict) or not value:
        raise _refusal(source, key, 'must map each class name to its id, background 0 included, e.g. '
                                    '{"background": 0, "liver": 1}; got ' + _show(value))
    if len(value) > MAX_LABELS:
        raise _refusal(source, key, f"{len(value)} classes; at most {MAX_LABELS} (ids 0-{MAX_LABEL_ID}: label "
                                    f"volumes are held as 8-bit class ids)")
    labels: dict[str, int] = {}
    name_of: dict[int, str] = {}
    folded: dict[str, str] = {}
    for name, label_id in value.items():
        name = str(name)
        if len(name) > MAX_NAME_CHARS:
            raise _refusal(source, key, f"a class name of {len(name)} characters ({_show(name)}); at most "
                                        f"{MAX_NAME_CHARS}, as class names become file names")
        check_safe_name(name, f"{key}: label name", source)
        label_id = _whole(label_id, source, key, f"the id of {name!r}")
        if not 0 <= label_id <= MAX_LABEL_ID:
            raise _refusal(source, key, f"the id of {name!r} is {label_id}; ids must be 0-{MAX_LABEL_ID}, as label "
                                        f"volumes are held as 8-bit class ids (id {label_id} would be read as "
                                        f"{label_id % (MAX_LABEL_ID + 1)}, another class). Number the classes "
                                        f"0-{MAX_LABEL_ID}; label files that store other values map them to the "
                                        f"ids with raw_label_values")
        if label_id in name_of:
            raise _refusal(source, key, f"{name_of[label_id]!r} and {name!r} both have id {label_id}; give each "
                                        f"id one name")
        if name.casefold() in folded:
            raise _refusal(source, key, f"{folded[name.casefold()]!r} and {name!r} differ only in case; their files "
                                        f"would collide on a case-insensitive file system: rename one")
        labels[name], name_of[label_id], folded[name.casefold()] = label_id, name, name
    if 0 not in name_of:
        raise _refusal(source, key, "the label table must contain background with id 0")
    return labels


def _class_ids(value, source: str, key: str, labels: dict[str, int]) -> tuple[int, ...]:
    """A list of class ids of `labels` (never background)."""
    ids = _id_list(value, source, key, "class id")
    known = {v: k for k, v in labels.items() if v}
    unknown = [i for i in ids if i not in known]
    if unknown:
        verb = "is not a class id" if len(unknown) == 1 else "are not class ids"
        raise _refusal(source, key, f"{_few(unknown)} {verb} of labels ("
                                    + _few(f"{i} {n}" for i, n in sorted(known.items()))
                                    + "; background 0 is never evaluated)")
    return ids


def _fits_run_name(ids: tuple[int, ...], source: str, key: str, hint: str) -> None:
    """Run folder names hold an evaluated group's ids joined by '-' (configs.experiment.experiment_name)."""
    text = "-".join(str(i) for i in ids)
    if len(text) > MAX_GROUP_CHARS:
        raise _refusal(source, key, f"{len(ids)} classes evaluated together: run folder names hold their ids "
                                    f"joined by '-', {len(text)} characters here where at most {MAX_GROUP_CHARS} "
                                    f"fit a file name; {hint}")


def _raw_values(value, source: str, labels: dict[str, int]) -> dict[int, int]:
    """`raw_label_values`: value stored in the label files (a whole number) -> class id of `labels`."""
    key = "raw_label_values"
    if not isinstance(value, dict) or not value:
        raise _refusal(source, key, 'must map each value stored in the label files to a class id, e.g. '
                                    '{"0": 0, "200": 1}; got ' + _show(value))
    table: dict[int, int] = {}
    for raw, label_id in value.items():
        try:
            number = float(raw) if not isinstance(raw, (bool, np.bool_)) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number.is_integer()):
            raise _refusal(source, key, f"the file value {_show(raw)} is not a whole number (label files store "
                                        f"whole numbers, written as \"200\")")
        if int(number) in table:
            raise _refusal(source, key, f"the file value {int(number)} is listed twice")
        label_id = _whole(label_id, source, key, f"the class id of file value {raw}")
        if label_id not in labels.values():
            raise _refusal(source, key, f"file value {raw} maps to {label_id}, which is not an id of labels ("
                                        + _few(f"{v} {k}" for k, v in sorted(labels.items(), key=lambda kv: kv[1]))
                                        + ")")
        table[int(number)] = label_id
    return table


def _folds(value, source: str, expected: tuple[int, ...] | None) -> tuple[tuple[int, ...], ...]:
    """`folds`: test blocks of scan ids; no scan twice in a block nor in two blocks, two scans at least."""
    key = "folds"
    if not isinstance(value, (list, tuple)) or not value:
        raise _refusal(source, key, "must be a list of test blocks, each a list of scan ids, e.g. "
                                    f"[[1, 2, 3], [4, 5, 6]]; got {_show(value)}")
    folds, fold_of = [], {}
    for k, block in enumerate(value):
        if not isinstance(block, (list, tuple)):
            raise _refusal(source, key, f"fold {k} is {_show(block)}, not a list of scan ids")
        ids = tuple(_whole(i, source, key, f"a scan id of fold {k}") for i in block)
        negative = [i for i in ids if i < 0]
        twice = sorted(i for i, n in Counter(ids).items() if n > 1)
        if negative:
            raise _refusal(source, key, f"fold {k} lists scan ids {_few(negative)}; scan ids are >= 0")
        if twice:
            raise _refusal(source, key, f"fold {k} lists scan {_few(twice)} twice; it would be scored twice")
        if len(ids) < 2:
            raise _refusal(source, key, f"fold {k} holds {len(ids)} scan(s); a fold needs a support scan and at "
                                        f"least one query")
        for i in ids:
            if i in fold_of:
                raise _refusal(source, key, f"scan {i} is in the test blocks of fold {fold_of[i]} and fold {k}; "
                                            f"each scan belongs to one fold's test block")
            fold_of[i] = k
        if expected is not None:
            unknown = [i for i in ids if i not in expected]
            if unknown:
                raise _refusal(source, key, f"fold {k} lists scan(s) {_few(unknown)} that are not in expected_ids")
        folds.append(ids)
    return tuple(folds)


def _image_dir(value, source: str, allow_outside) -> str:
    """`image_dir`: a folder inside the dataset folder (commands write classmaps there), unless
    `allow_outside` is true."""
    key = "image_dir"
    if not isinstance(allow_outside, bool):
        raise _refusal(source, ALLOW_OUTSIDE, f"must be true or false, got {_show(allow_outside)}")
    value = _text(value, source, key, '"images" (a folder of the dataset folder)')
    if "\0" in value:
        raise _refusal(source, key, f"{_show(value)} holds a NUL character")
    path = Path(value)
    leaves = "is an absolute path" if path.is_absolute() else "leaves the dataset folder ('..')" \
        if ".." in path.parts else None
    if leaves and not allow_outside:
        raise _refusal(source, key, f"{value!r} {leaves}: image_dir must be a folder inside the dataset folder "
                                    f"(e.g. \"images\"), because commands write into it (data.classmap writes "
                                    f"classmap_<MIN>.json there). If the scans really are elsewhere, set "
                                    f"\"{ALLOW_OUTSIDE}\": true in the description")
    return value


def _dataset_defaults(value, source: str) -> dict:
    """`defaults`: n_sv a whole number >= 1 (the folder supervoxels_<n_sv> inside the dataset folder),
    superpixel_threshold a number."""
    if not isinstance(value, dict):
        raise _refusal(source, "defaults", f"must be a mapping, e.g. {{\"n_sv\": 5000}}; got {_show(value)}")
    if value.get("n_sv") is not None and _whole(value["n_sv"], source, "defaults.n_sv", "the supervoxel size") < 1:
        raise _refusal(source, "defaults.n_sv", f"must be >= 1, got {value['n_sv']}")
    if value.get("superpixel_threshold") is not None:
        _real(value["superpixel_threshold"], source, "defaults.superpixel_threshold", "the superpixel threshold")
    return dict(value)      # as written: the values reach run configurations and their fingerprints


def _from_mapping(d: dict, source: str) -> DatasetSpec:
    """The spec a description says, every field checked (see "checking a description" above)."""
    if not isinstance(d, dict):
        raise DataError(f"{source}: a dataset description is a mapping of keys (a JSON object), got "
                        f"{type(d).__name__}")
    required = ("name", "modality", "image_dir", "labels")
    missing = [k for k in required if k not in d]
    if missing:
        raise DataError(f"dataset description {source} lacks {missing}")
    _refuse_unknown_keys(d, source)
    name = _text(d["name"], source, "name", '"MYDATA"')
    if len(name) > MAX_NAME_CHARS:
        raise _refusal(source, "name", f"{len(name)} characters ({_show(name)}); at most {MAX_NAME_CHARS}")
    check_safe_name(name, "dataset name", source)
    modality = _text(d["modality"], source, "modality", '"MR" or "CT"').upper()
    if modality not in ("MR", "CT"):
        raise DataError(f"{source}: modality must be MR or CT, got {modality!r}")
    region = _text(d.get("region", "other"), source, "region", '"abdomen", "cardiac" or "other"')
    description = d.get("description", "")
    if not isinstance(description, str):
        raise _refusal(source, "description", f"must be a text, got {_show(description)}")
    image_dir = _image_dir(d["image_dir"], source, d.get(ALLOW_OUTSIDE, False))
    labels = _label_table(d["labels"], source)
    if d.get("eval_labels") is not None:
        eval_labels = _class_ids(d["eval_labels"], source, "eval_labels", labels)
        where = "eval_labels"
    else:
        eval_labels = tuple(v for v in labels.values() if v)
        where = "eval_labels (absent: every class of labels)"
    _fits_run_name(eval_labels, source, where, "list the classes to evaluate by default in eval_labels (others "
                                               "can be evaluated with test_labels=[...])")
    if d.get("setting2_groups") is not None:
        raw_groups = d["setting2_groups"]
        if not isinstance(raw_groups, (list, tuple)) or not raw_groups:
            raise _refusal(source, "setting2_groups", f"must be a non-empty list of groups of class ids, e.g. "
                                                      f"[[2, 3], [1, 4]]; got {_show(raw_groups)}")
        groups = tuple(_class_ids(g, source, "setting2_groups", labels) for g in raw_groups)
        group_of: dict[int, int] = {}
        for k, group in enumerate(groups):
            _fits_run_name(group, source, "setting2_groups", "use smaller groups")
            for i in group:
                if i in group_of:
                    raise _refusal(source, "setting2_groups", f"class {i} is in group {group_of[i]} and group "
                                                              f"{k}; an organ in two groups gets two Dice for one "
                                                              f"table cell")
                group_of[i] = k
    else:
        groups = (eval_labels,)
    table_order = (_class_ids(d["table_order"], source, "table_order", labels)
                   if d.get("table_order") is not None else None)
    raw = _raw_values(d["raw_label_values"], source, labels) if d.get("raw_label_values") is not None else None
    expected = (_id_list(d["expected_ids"], source, "expected_ids", "scan id")
                if d.get("expected_ids") is not None else None)
    folds = _folds(d["folds"], source, expected) if d.get("folds") is not None else None
    if d.get("n_folds") is not None:
        n_folds = _whole(d["n_folds"], source, "n_folds", "the number of folds")
        if n_folds < 1:
            raise _refusal(source, "n_folds", f"must be >= 1, got {n_folds}")
        if folds is not None and n_folds != len(folds):
            raise _refusal(source, "n_folds", f"is {n_folds} but folds lists {len(folds)} test blocks; drop n_folds")
    else:
        n_folds = len(folds) if folds is not None else 5
    spec = DatasetSpec(
        name=name,
        modality=modality,
        region=region,
        image_dir=image_dir,
        labels=labels,
        eval_labels=eval_labels,
        setting2_groups=groups,
        raw_label_values=raw,
        expected_ids=expected,
        folds=folds,
        n_folds=n_folds,
        table_order=table_order,
        description=description,
        defaults=_dataset_defaults(d.get("defaults") or {}, source),
        preprocessing=Preprocessing.from_mapping(d["preprocessing"], source)
        if d.get("preprocessing") is not None else None,
    )
    return spec


# the keys of a dataset description (configs/datasets/*.yaml); `defaults` holds the config defaults
# a dataset supplies
DESCRIPTION_KEYS = ("name", "description", "modality", "region", "image_dir", "labels", "raw_label_values",
                    "eval_labels", "table_order", "setting2_groups", "expected_ids", "folds", "n_folds",
                    "defaults", "preprocessing", ALLOW_OUTSIDE)
DATASET_DEFAULT_KEYS = ("n_sv", "superpixel_threshold")


def _refuse_unknown_keys(d, path: Path | str) -> None:
    """A misspelt key of a description (built-in or dataset.json) would be ignored silently: name it, and
    the closest key."""
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
    return sorted(read_yaml_file(p)["name"] for p in BUILTIN_SPEC_DIR.glob("*.yaml"))


def load_spec(name: str, data_dir: str | Path | None = None) -> DatasetSpec:
    """The spec of a built-in dataset (by name, any case), or of the dataset.json in `data_dir`."""
    path = BUILTIN_SPEC_DIR / f"{name.lower()}.yaml"
    if path.is_file():
        return _from_mapping(read_yaml_file(path), str(path))     # which refuses unknown keys
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
        d = json.loads(path.read_text(), object_pairs_hook=_JSONObject.of_pairs)
    except FileNotFoundError:
        raise DataError(f"{data_dir} has no dataset.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise DataError(f"{path}: the JSON is nested too deeply to be a dataset description") from None
    twice = _JSONObject.first_duplicate(d)
    if twice is not None:
        where, key = twice
        raise DataError(f"{path}: {where}: the key {key!r} appears twice; JSON keeps only the last, so the other "
                        f"would be ignored silently. Keep one" + (" (one id per name)" if where == "labels" else ""))
    return generic_spec(d, str(path))


class _JSONObject(dict):
    """A JSON object that remembers the keys it held twice (json.loads keeps the last silently)."""

    duplicates: list

    @classmethod
    def of_pairs(cls, pairs) -> "_JSONObject":
        obj = cls()
        obj.duplicates = []
        for key, value in pairs:
            if key in obj:
                obj.duplicates.append(key)
            obj[key] = value
        return obj

    @classmethod
    def first_duplicate(cls, value, where: str = "") -> tuple[str, str] | None:
        """(the field holding it, the key) of the first key written twice in `value`, or None."""
        if isinstance(value, cls) and value.duplicates:
            return where or "(the top level)", value.duplicates[0]
        children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in children:
            found = cls.first_duplicate(child, f"{where}[{key}]" if isinstance(key, int) else
                                        f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None


def generic_spec(description: dict, source: str = "dataset.json") -> DatasetSpec:
    """Spec from the content of a dataset.json (`image_dir` defaults to the dataset folder itself)."""
    if not isinstance(description, dict):
        raise DataError(f"{source}: a dataset description is a JSON object of keys, got "
                        f"{type(description).__name__}")
    return _from_mapping({"image_dir": ".", **description}, source)


def pseudolabel_command(data_dir: str | Path, dataset: str, folder: str) -> str:
    """The command that (re)generates the pseudolabel folder `folder` (supervoxels_N / superpixels_N)."""
    kind, _, size = folder.partition("_")
    kind = "superpixels" if kind == "superpixels" else "supervoxels"
    return f"python -m data.pseudolabels {data_dir} --dataset {dataset} --kind {kind} --min-size {size}"
