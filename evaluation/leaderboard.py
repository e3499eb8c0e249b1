"""The results table: evaluation runs (validation.py's results and recorded configuration) collected into the
papers' table of one dataset and setting, with folds, means over folds, and the published numbers beside.

`scripts.collect_results` (a folder of runs) and `scripts.sweep` (the runs of a sweep's cells) share it.
Per organ and fold, the Dice is the fold's mean over its query scans; the table gives the mean and
standard deviation over folds, and the overall mean is the mean over organs (as the papers do).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.core.io import UserError, atomic_path
from data.core.run_folder import TEST, RunFolder, evaluation_folders
from data.core.specs import DatasetSpec, builtin_names, load_spec
from evaluation.published import PublishedEntry, published_for
from evaluation.reporting import save_figure
from evaluation.surface import SURFACE_METRICS

log = logging.getLogger(__name__)

PROTOCOL_KEYS = ("fold_scheme", "supp_idx", "n_part", "chunking", "scored")


class CollectError(UserError):
    pass


@dataclass(frozen=True)
class EvalRun:
    """One evaluation run folder as the table reads it."""
    path: Path
    run_id: int
    method: str
    dataset: str
    setting: int
    fold: int
    test_labels: tuple[int, ...]
    protocol: tuple
    checkpoint: str
    class_dice: dict[str, float]      # class name -> mean Dice over the fold's query scans
    fingerprint: str | None = None    # of the configuration that produced the numbers (data.core.run_folder)
    data_dir: str | None = None       # the data folder and log folder as the run recorded them (config.json),
    log_dir: str | None = None        # relative to where its command ran
    class_ids: dict[str, int] = field(default_factory=dict)    # class name -> label id (results.json per_scan)
    finished: float = 0.0             # when its results were written (results.json's modification time)
    eval_dataset: str = ""            # the dataset evaluated (cross-domain: not `dataset`; "" read as `dataset`)
    eval_data_dir: str | None = None  # its folder as the run recorded it
    n_shot: int = 1                   # support scans K (evaluation.n_shot; 1 in runs written before it)
    row: str = ""                     # the table row it fills (`select`: the method, with K and label group where
                                      # those tell rows apart); "" reads as the method
    # class name -> its results.json hd95_mm, assd_mm, surface_excluded (none in runs written before they were)
    class_surface: dict[str, dict[str, float]] = field(default_factory=dict)


def read_run(folder: Path) -> EvalRun | None:
    run = RunFolder(folder)
    if not (run.results_json.is_file() and run.config_file.is_file()):
        return None
    r, c = _read_json(run.results_json), _read_json(run.config_file)
    try:
        e = c["evaluation"]
        class_ids = {str(s["class"]): int(s["class_id"]) for s in r.get("per_scan") or ()
                     if isinstance(s, dict) and "class" in s and "class_id" in s}
        return EvalRun(run.path, int(run.path.name) if run.path.name.isdigit() else 0, c["method"], c["dataset"],
                       int(c["setting"]), int(c["eval_fold"]), tuple(c["test_labels"]),
                       tuple((k, e[k]) for k in PROTOCOL_KEYS), str(r.get("checkpoint")),
                       {name: float(v["dice"]) for name, v in r["classes"].items()}, run.fingerprint(TEST),
                       _recorded_path(c.get("data_dir")), _recorded_path(c.get("log_dir")), class_ids,
                       run.results_json.stat().st_mtime, class_surface=_surface_of(r["classes"]),
                       eval_dataset=str(c.get("eval_dataset") or c["dataset"]),
                       eval_data_dir=_recorded_path(c.get("eval_data_dir", c.get("data_dir"))),
                       n_shot=int(e.get("n_shot", 1)))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CollectError(f"{folder}: {run.results_json.name} or {run.config_file.name} lacks an entry "
                           f"({type(err).__name__}: {err}); "
                           f"it was not written by this version of validation.py. Re-run the evaluation of "
                           f"this run, or move its folder out of the collected paths") from None


def _surface_of(classes: dict) -> dict[str, dict[str, float]]:
    """class name -> its HD95/ASSD entry in results.json's `classes`, for the classes that have one."""
    return {str(name): {**{k: float(v[k]) for k in SURFACE_METRICS}, "surface_excluded": int(v.get("surface_excluded", 0))}
            for name, v in classes.items() if isinstance(v, dict) and all(k in v for k in SURFACE_METRICS)}


def _recorded_path(value) -> str | None:
    return str(value) if isinstance(value, (str, os.PathLike)) and str(value) else None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CollectError(f"cannot read {path}: it is truncated or not valid JSON ({err}). Re-run the "
                           f"evaluation that wrote it, or move its run folder out of the collected paths") from None


def find_runs(paths) -> list[EvalRun]:
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise CollectError(f"{p} does not exist")
        runs += [r for f in evaluation_folders(p) if (r := read_run(f.path)) is not None]
    return runs


def _single(runs, attr, what, flag):
    values = sorted({getattr(r, attr) for r in runs}, key=str)
    if len(values) > 1:
        raise CollectError(f"the runs mix {what}: {values}; select one with {flag}")
    return values[0]


def select(runs: list[EvalRun], methods=None, dataset=None, setting=None, eval_dataset=None) -> list[EvalRun]:
    """Filter, refuse mixtures, keep the newest run per (method, K, label group, fold), and give each run its
    table row (`_rows`: K shots and label groups that give the same organ are rows of their own, never merged)."""
    runs = [r for r in runs if (not methods or r.method in methods)
            and (dataset is None or r.dataset.upper() == dataset.upper())
            and (eval_dataset is None or (r.eval_dataset or r.dataset).upper() == eval_dataset.upper())
            and (setting is None or r.setting == setting)]
    if not runs:
        raise CollectError("no evaluation run matches (look for evaluation run folders, with their results, "
                           "under the given paths)")
    _single(runs, "dataset", "datasets", "--dataset")
    _single([dataclasses.replace(r, eval_dataset=(r.eval_dataset or r.dataset).upper()) for r in runs],
            "eval_dataset", "evaluated datasets (eval_dataset)", "--eval-dataset")
    _single(runs, "setting", "settings", "--setting")
    protocols = {r.protocol for r in runs}
    if len(protocols) > 1:
        detail = "; ".join(", ".join(f"{k}={v}" for k, v in p) for p in sorted(protocols, key=str))
        raise CollectError(f"the runs were evaluated with different protocols ({detail}); collect them "
                           f"separately (move or select the run folders)")
    newest: dict[tuple, EvalRun] = {}
    for r in sorted(runs, key=lambda r: r.run_id):
        cell = (r.method, r.n_shot, r.test_labels, r.fold)
        older = newest.get(cell)
        if older is not None and older.fingerprint != r.fingerprint:
            log.warning("%s fold %d: %s and %s were produced by different configurations (fingerprints %s, %s); "
                        "the table uses the newest, %s", r.method, r.fold, older.path, r.path, older.fingerprint,
                        r.fingerprint, r.path)
        newest[cell] = r
    return _rows(list(newest.values()))


def _rows(runs: list[EvalRun]) -> list[EvalRun]:
    """Each run's table row. A method's runs of one K fill one row when their label groups give disjoint
    organs (setting 2's groups); when two of its label groups give the same organ (e.g. test_labels
    [1, 2, 3, 4] and [1] in one fold), each group is a row of its own ("adnet [labels 1]"): one fold
    evaluated with different test_labels is two cells, never merged. K > 1 rows are "adnet, 3-shot"."""
    by_key: dict[tuple, list[EvalRun]] = {}
    for r in runs:
        by_key.setdefault((r.method, r.n_shot), []).append(r)
    out = []
    for (method, n_shot), group in by_key.items():
        organs_of: dict[tuple, set] = {}
        for r in group:
            organs_of.setdefault(r.test_labels, set()).update(r.class_dice)
        labels = list(organs_of)
        overlap = any(organs_of[a] & organs_of[b] for i, a in enumerate(labels) for b in labels[i + 1:])
        if overlap:
            log.info("%s: label groups %s give the same organs: one row per label group", method,
                     ", ".join(str(list(g)) for g in labels))
        for r in group:
            row = method + ("" if n_shot == 1 else f", {n_shot}-shot")
            if overlap:
                row += f" [labels {','.join(map(str, r.test_labels))}]"
            out.append(dataclasses.replace(r, row=row))
    return out


@dataclass
class Table:
    dataset: str
    setting: int
    organs: list[str]                                   # column order
    dice: dict[str, dict[str, dict[int, float]]]        # method -> organ -> fold -> dice
    checkpoints: dict[str, dict[int, list[str]]]        # method -> fold -> checkpoints
    n_folds: int
    label_ids: dict[str, int] = field(default_factory=dict)     # organ (column) -> the dataset's label id
    shots: dict[str, int] = field(default_factory=dict)         # row -> support scans K (the K column)
    # method -> organ -> fold -> {hd95_mm, assd_mm, surface_excluded}, for the runs that recorded them
    surface: dict[str, dict[str, dict[int, dict]]] = field(default_factory=dict)

    def missing_folds(self, method: str) -> dict[str, list[int]]:
        return {o: [k for k in range(self.n_folds) if k not in self.dice[method].get(o, {})]
                for o in self.organs if len(self.dice[method].get(o, {})) < self.n_folds}

    def organ_stats(self, method: str, organ: str) -> tuple[float, float, int]:
        values = list(self.dice[method].get(organ, {}).values())
        if not values:
            return float("nan"), float("nan"), 0
        return float(np.mean(values)), float(np.std(values)), len(values)

    def overall(self, method: str) -> float:
        """The mean over organs of each organ's mean over folds, over the organs that have a fold (nan
        when none has); `complete` says whether every organ has every fold."""
        means = [m for m in (self.organ_stats(method, o)[0] for o in self.organs) if not np.isnan(m)]
        return float(np.mean(means)) if means else float("nan")

    def complete(self, method: str) -> bool:
        return method in self.dice and not self.missing_folds(method)

    def missing_note(self) -> str | None:
        """One sentence naming every missing fold of the table (None when nothing is missing)."""
        parts = []
        for method in sorted(self.dice):
            missing = self.missing_folds(method)
            if not missing:
                continue
            if len(missing) == len(self.organs) and len({tuple(f) for f in missing.values()}) == 1:
                parts.append(f"{method} folds {next(iter(missing.values()))}")
            else:
                parts.append(", ".join(f"{method} {organ} folds {folds}" for organ, folds in missing.items()))
        if not parts:
            return None
        return (f"{self.dataset} setting {self.setting}: missing " + "; ".join(parts)
                + f" (of {self.n_folds}); cells with fewer folds show (k/{self.n_folds}), means over fewer than "
                  f"every organ and fold are marked *")


def build_table(runs: list[EvalRun]) -> Table:
    """The table of `runs` (one dataset and setting, as `select` returns them). The dataset's spec gives
    the column order, the label ids and the number of folds: a built-in dataset's, or the dataset.json of
    the runs' recorded data folder. When that folder is gone, the table uses the class names, their
    order and ids as the runs' results.json record them (`classes`, `per_scan`), assumes the default 5
    folds (more when a run has a higher fold), and says so. Cross-domain runs (trained on A, evaluated on
    B) give the table "A -> B" with B's columns."""
    evaluated = [dataclasses.replace(r, dataset=r.eval_dataset or r.dataset, data_dir=r.eval_data_dir or r.data_dir)
                 for r in runs]
    spec = _dataset_spec(evaluated)
    found = {o for r in runs for o in r.class_dice}
    if spec is not None:
        order = spec.table_order or spec.eval_labels
        names = [spec.label_name(i) for i in order]
        label_ids = {spec.label_name(i): i for i in spec.eval_labels}
        name, n_folds = spec.name, spec.n_folds
    else:
        label_ids = {o: i for r in runs for o, i in r.class_ids.items()}
        names = list(dict.fromkeys(o for r in sorted(runs, key=lambda r: (r.fold, str(r.path))) for o in r.class_dice))
        name, n_folds = evaluated[0].dataset, max([DEFAULT_N_FOLDS] + [r.fold + 1 for r in runs])
    if name.upper() != runs[0].dataset.upper():
        name = f"{runs[0].dataset} -> {name}"
    organs = [o for o in names if o in found] + sorted(found - set(names))
    dice, ckpts, surface = {}, {}, {}
    for r in runs:
        row = r.row or r.method
        for organ, value in r.class_dice.items():
            dice.setdefault(row, {}).setdefault(organ, {})[r.fold] = value
            if organ in r.class_surface:
                surface.setdefault(row, {}).setdefault(organ, {})[r.fold] = r.class_surface[organ]
        ckpts.setdefault(row, {}).setdefault(r.fold, []).append(r.checkpoint)
    return Table(name, runs[0].setting, organs, dice, ckpts, n_folds,
                 {o: label_ids[o] for o in organs if o in label_ids}, surface=surface,
                 shots={r.row or r.method: r.n_shot for r in runs})


DEFAULT_N_FOLDS = 5     # data.core.specs.DatasetSpec.n_folds when a description names none


def table_folder(table: Table) -> str:
    """The folder name of a table's files: <DATASET>_setting<s>, <TRAIN>-to-<EVAL>_setting<s> cross-domain."""
    return f"{table.dataset.replace(' -> ', '-to-')}_setting{table.setting}"


def _log_dir_of(run: EvalRun) -> Path:
    """The log folder a run folder lies in: <log_dir>/test/<exp_name>/<run id> (or <log_dir>/<exp_name>/<run id>)."""
    parents = run.path.parents
    return parents[2] if len(parents) > 2 and parents[1].name == TEST else parents[1]


def _data_dirs(run: EvalRun) -> list[Path]:
    """Where the run's data folder may be: its recorded data_dir as given (absolute, or relative to this
    command's folder), relative to the folder its command ran in (found by taking the recorded log_dir
    off the log folder the run lies in), and relative to that log folder's parent."""
    if not run.data_dir:
        return []
    recorded = Path(run.data_dir).expanduser()
    if recorded.is_absolute():
        return [recorded]
    log_dir = _log_dir_of(run)
    found = [recorded]
    if run.log_dir and not Path(run.log_dir).is_absolute():
        cwd = log_dir.absolute()
        for part in reversed(Path(os.path.normpath(run.log_dir)).parts):
            if part != cwd.name:
                cwd = None
                break
            cwd = cwd.parent
        if cwd is not None:
            found.append(cwd / recorded)
    found.append(log_dir.absolute().parent / recorded)
    return list(dict.fromkeys(found))


def _dataset_spec(runs: list[EvalRun]) -> DatasetSpec | None:
    """The spec of the runs' dataset (built-in, or the dataset.json of a data folder the runs recorded),
    or None, with a warning saying what the table uses instead, when no data folder is left."""
    name = runs[0].dataset
    if name.upper() in (n.upper() for n in builtin_names()):
        return load_spec(name)
    tried = []
    for r in sorted(runs, key=lambda r: -r.finished):
        for folder in _data_dirs(r):
            if folder in tried:
                continue
            tried.append(folder)
            if not (folder / "dataset.json").is_file():
                continue
            try:
                spec = load_spec(name, folder)
            except UserError as err:            # a missing folder, or a description that is refused
                log.warning("%s: not used for the table of %s: %s", folder / "dataset.json", name, err)
                continue
            log.info("%s: classes, column order and folds from %s", name, folder / "dataset.json")
            return spec
    recorded = sorted({r.data_dir for r in runs if r.data_dir})
    log.warning("%s is not a built-in dataset and no dataset.json was found for it (the runs record data_dir %s; "
                "looked in %s): the table uses the class names and ids recorded in the runs' results.json, in the "
                "order it lists them, and assumes %d folds", name, ", ".join(recorded) or "none",
                ", ".join(str(f) for f in tried) or "no folder", max([DEFAULT_N_FOLDS] + [r.fold + 1 for r in runs]))
    return None


def _ours(table: Table, method: str, organ: str) -> str:
    """mean ± std over folds; with fewer folds than the dataset has, (k/n) (and no std for one fold)."""
    if method not in table.dice:
        return "–"
    mean, std, n = table.organ_stats(method, organ)
    if n == 0:
        return "–"
    if n == table.n_folds:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    spread = "" if n == 1 else f" ± {100 * std:.2f}"
    return f"{100 * mean:.2f}{spread} ({n}/{table.n_folds})"


def _overall(table: Table, method: str) -> str:
    """The mean over organs; marked * when it is not over every organ and fold."""
    if method not in table.dice or np.isnan(table.overall(method)):
        return "–"
    return f"{100 * table.overall(method):.2f}" + ("" if table.complete(method) else "*")


def _footnote(table: Table) -> list[str]:
    partial = [m for m in sorted(table.dice) if not table.complete(m)]
    if not partial:
        return []
    return ["", f"* the mean over the organs and folds present, not over all {table.n_folds} folds of every organ"]


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _k_column(table: Table, row: str | None = None) -> str:
    """The K column (support scans) of a table that holds a K other than 1: its header (row None) or the
    row's cell; '' for a 1-shot table, whose layout stays the papers'. Published numbers are 1-shot."""
    if all(k == 1 for k in table.shots.values()):
        return ""
    return "K | " if row is None else f"{table.shots.get(row, 1)} | "


def markdown(table: Table, published: list[PublishedEntry] | None = None) -> str:
    """The table in Markdown; with `published` (published_for(...)), the papers' numbers beside ours."""
    k_head, k_extra = _k_column(table), int(bool(_k_column(table)))
    if published is None:
        head = "| Method | " + k_head + " | ".join(table.organs) + " | Mean |"
        lines = [f"Dice (%) on {table.dataset}, setting {table.setting}: mean ± std over folds",
                 "", head, "|" + "---|" * (len(table.organs) + 2 + k_extra)]
        for method in sorted(table.dice):
            cells = [_ours(table, method, organ) for organ in table.organs]
            lines.append(f"| {method} | " + _k_column(table, method) + " | ".join(cells)
                         + f" | {_overall(table, method)} |")
        return "\n".join(lines + _footnote(table)) + "\n"
    primary = {e.method: e for e in published if e.primary}
    columns = [c for organ in table.organs for c in (organ, f"{organ} pub.")] + ["Mean", "Mean pub.", "Published"]
    lines = [f"Dice (%) on {table.dataset}, setting {table.setting}: ours mean ± std over folds; "
             f"pub.: the published number (source and status in the last column)",
             "", "| Method | " + k_head + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1 + k_extra)]
    for method in sorted(set(table.dice) | set(primary)):
        e = primary.get(method)
        cells = []
        for organ in table.organs:
            cells += [_ours(table, method, organ),
                      _number(e.dice.get(table.label_ids.get(organ, -1)) if e else None)]
        cells += [_overall(table, method), _number(e.mean if e else None),
                  f"{e.entry}: {e.source} [{e.status}]" if e else "none found"]
        lines.append(f"| {method} | " + _k_column(table, method) + " | ".join(cells) + " |")
    lines += _footnote(table)
    others = [e for e in published if not e.primary]
    if others:
        lines += ["", f"Other published numbers for {table.dataset}, setting {table.setting}:", "",
                  "| Method | Entry | " + " | ".join(table.organs) + " | Mean | Source | Status |",
                  "|" + "---|" * (len(table.organs) + 5)]
        for e in others:
            cells = [_number(e.dice.get(table.label_ids.get(o, -1))) for o in table.organs]
            lines.append(f"| {e.method} | {e.entry} | " + " | ".join(cells)
                         + f" | {_number(e.mean)} | {e.source} | {e.status} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- HD95 and ASSD
SURFACE_NAMES = {"hd95_mm": "HD95", "assd_mm": "ASSD"}


def surface_stats(table: Table, method: str, organ: str, metric: str) -> tuple[float, float, int]:
    """(mean, std, folds) over the folds whose mean `metric` (hd95_mm or assd_mm) is defined; a fold where
    every query scan had an empty prediction has none."""
    values = [e[metric] for e in table.surface.get(method, {}).get(organ, {}).values() if math.isfinite(e[metric])]
    if not values:
        return float("nan"), float("nan"), 0
    return float(np.mean(values)), float(np.std(values)), len(values)


def _mm_cell(mean: float, std: float, n: int, n_folds: int) -> str:
    if n == 0:
        return "–"
    spread = "" if n == 1 else f" ± {std:.2f}"
    return f"{mean:.2f}{spread}" + ("" if n == n_folds else f" ({n}/{n_folds})")


def _surface_row(table: Table, method: str, metric: str) -> str:
    stats = [surface_stats(table, method, organ, metric) for organ in table.organs]
    means = [m for m, _, n in stats if n]
    complete = all(n == table.n_folds for _, _, n in stats)
    overall = "–" if not means else f"{np.mean(means):.2f}" + ("" if complete else "*")
    return f"| {method} | " + " | ".join(_mm_cell(*s, table.n_folds) for s in stats) + f" | {overall} |"


def _excluded_note(table: Table) -> list[str]:
    """Where query scans were left out of a fold's mean (an empty prediction has no surface distance)."""
    parts = [f"{method} {organ} fold {fold}: {e['surface_excluded']}"
             for method in sorted(table.surface) for organ in table.organs
             for fold, e in sorted(table.surface[method].get(organ, {}).items()) if e["surface_excluded"]]
    if not parts:
        return []
    return ["", "Query scans with an empty prediction (no surface distance) left out of their fold's mean: "
            + "; ".join(parts)]


def surface_markdown(table: Table) -> str:
    """The HD95 and ASSD tables in Markdown: per organ, mean ± std over folds of each fold's mean over its query
    scans, in mm; the mean over organs (* when not over every organ and fold). Runs written before the distances
    were recorded give no number ("–")."""
    lines = []
    for metric, name in SURFACE_NAMES.items():
        lines += ["", f"{name} (mm) on {table.dataset}, setting {table.setting}: mean ± std over folds", "",
                  "| Method | " + " | ".join(table.organs) + " | Mean |", "|" + "---|" * (len(table.organs) + 2)]
        lines += [_surface_row(table, method, metric) for method in sorted(table.dice)]
    if any(method not in table.surface for method in table.dice):
        lines += ["", "– : runs without HD95/ASSD in their results.json (evaluated before they were recorded)"]
    return "\n".join(lines + _excluded_note(table)) + "\n"


def write_surface_csv(table: Table, path: Path) -> Path:
    """surface.csv: method, organ, fold, hd95_mm, assd_mm, surface_excluded (the fold's means, mm)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "organ", "fold", *SURFACE_METRICS, "surface_excluded"])
        for method in sorted(table.surface):
            for organ in table.organs:
                for fold, e in sorted(table.surface[method].get(organ, {}).items()):
                    w.writerow([method, organ, fold, *(f"{e[m]:.4f}" for m in SURFACE_METRICS), e["surface_excluded"]])
    return path


def write_outputs(table: Table, out: Path, published: list[PublishedEntry] | None = None,
                  surface: bool = False) -> str:
    """Write folds.csv, summary.csv, table.md and dice.png into `out`; returns table.md's text. `surface`:
    table.md also holds the HD95 and ASSD tables, and surface.csv their numbers per fold."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / n for k, n in (("folds", "folds.csv"), ("summary", "summary.csv"), ("md", "table.md"),
                                     ("png", "dice.png"))}
    with atomic_path(paths["folds"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "organ", "fold", "dice", "checkpoint", "n_shot"])
        for method in sorted(table.dice):
            for organ in table.organs:
                for fold, value in sorted(table.dice[method].get(organ, {}).items()):
                    w.writerow([method, organ, fold, f"{value:.6f}", ";".join(table.checkpoints[method][fold]),
                                table.shots.get(method, 1)])
    with atomic_path(paths["summary"]) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "organ", "mean_dice", "std_dice", "folds", "n_shot"])
        for method in sorted(table.dice):
            k = table.shots.get(method, 1)
            for organ in table.organs:
                mean, std, n = table.organ_stats(method, organ)
                w.writerow([method, organ, f"{mean:.6f}", f"{std:.6f}", n, k])
            w.writerow([method, "Mean", f"{table.overall(method):.6f}", "",
                        "all" if table.complete(method) else "partial", k])
    text = markdown(table, published) + (surface_markdown(table) if surface else "")
    if surface:
        write_surface_csv(table, out / "surface.csv")
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(text)
    _bar_chart(table, paths["png"])
    return text


def _bar_chart(table: Table, path: Path) -> None:
    """dice.png: mean Dice per organ and method (bars: spread over folds); the title names the folds
    present ("all 5 folds", "fold 0 of 5", per method when the methods differ)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def fold_text(folds: list[int]) -> str:
        if folds == list(range(table.n_folds)):
            return f"all {table.n_folds} folds"
        runs, start = [], None
        for k, fold in enumerate(folds):
            start = fold if start is None else start
            if k + 1 == len(folds) or folds[k + 1] != fold + 1:
                runs.append(str(start) if fold == start else f"{start}-{fold}")
                start = None
        return f"fold{'s' if len(folds) > 1 else ''} {', '.join(runs)} of {table.n_folds}"

    methods = sorted(table.dice)
    present = {m: sorted({f for organ in table.dice[m].values() for f in organ}) for m in methods}
    if len({tuple(f) for f in present.values()}) == 1:
        folds = fold_text(present[methods[0]])
    else:
        folds = "; ".join(f"{m}: {fold_text(f)}" for m, f in present.items())
    x = np.arange(len(table.organs) + 1)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.6 * len(x) + 1, 3.4))
    for i, method in enumerate(methods):
        stats = [table.organ_stats(method, o) for o in table.organs]
        means = [100 * s[0] for s in stats] + [100 * table.overall(method)]
        stds = [100 * s[1] for s in stats] + [np.nan]   # the papers give no spread for the overall mean
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=method)
    ax.set_xticks(x, table.organs + ["Mean"])
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{table.dataset}, setting {table.setting} ({folds})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, 1)


def published_beside(table: Table) -> list[PublishedEntry]:
    """The published entries for the table's dataset and setting (a warning when there are none)."""
    published = published_for(table.dataset, table.setting)
    if not published:
        log.warning("no published numbers for %s setting %s in %s", table.dataset, table.setting,
                    "evaluation/published_results.csv")
    return published


def write_report(table: Table, out: Path, published: list[PublishedEntry] | None = None,
                 surface: bool = False) -> str:
    """Write folds.csv, summary.csv, table.md and dice.png into `out`, name the missing folds (once per
    table), and return the table in Markdown; `surface` adds the HD95 and ASSD tables (and surface.csv)."""
    text = write_outputs(table, out, published, surface)
    note = table.missing_note()
    if note:
        log.warning("%s", note)
    return text
