"""A sweep: the cells of a results table (methods x datasets x settings x label groups x folds, and
evaluation axes: K shots x evaluated datasets), and what each still needs (launch/runners.py runs them).

A cell is one training run and its evaluation, the same Sacred runs as

    python training.py   with <method> <dataset> data_dir=.. setting=.. eval_fold=.. test_labels=[..] log_dir=..
    python validation.py with <the same>

Cells that differ only in K (`--shots`, evaluation.n_shot) or in the evaluated dataset
(`--eval-datasets`: cross-domain, eval_dataset=<name>) share one training (same exp_name) and have an
evaluation each (`validation.py with ... evaluation.n_shot=K eval_dataset=<name>`).

Its state is read from the run folders (data.core.run_folder), with the rules the commands use, so a
sweep can be re-run at any time. A run counts for a cell only when the fingerprint of the
configuration that produced it matches the cell's (config_fingerprint: the keys that decide numbers):

- done:        an evaluation (same fingerprint) of the last snapshot of a COMPLETED training of the
               cell's configuration exists;
- to evaluate: such a COMPLETED training exists, no such evaluation;
- to resume:   the newest unfinished training (RUNNING, FAILED or INTERRUPTED) of the cell's
               configuration has a resume point and no process holds its lock: it continues with
               train.resume=<run folder>;
- running:     that run's lock is held: another process trains it now (skipped);
- stale:       the newest training was made with another configuration (e.g. train.n_steps changed):
               a new run is trained, and the old one is never mixed into the tables;
- to train:    anything else.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from sacred.arg_parser import get_config_updates

from configs.experiment import PROTOCOL_DIR, build_config, default_data_dir, experiment_name, load_yaml, method_names
from data.core.errors import CheckpointError, ConfigError, UserError
from data.core.io import check_output_folder
from data.core.run_folder import (
    TEST,
    TRAIN,
    config_fingerprint,
    experiment_folder,
    flatten_config,
    run_folders,
    try_flock,
)
from data.core.specs import load_spec
from evaluation.leaderboard import EvalRun, read_run
from models.engine.builders import check_data_dir, check_encoder_weights, pseudolabel_folder
from models.engine.checkpoints import find_checkpoint
from models.engine.experiment import Experiment, upgrade_config
from models.engine.runs import PROJECT_ROOT

log = logging.getLogger(__name__)

DONE, TO_EVALUATE, TO_RESUME, TO_TRAIN, STALE, RUNNING, QUEUED = (
    "done", "to evaluate", "to resume", "to train", "stale", "running", "queued")
# keys the sweep sets for every cell (an update may not override them) -> the option that sets them
SWEEP_OPTION = {"method": "--methods", "dataset": "--datasets", "data_dir": "--data-dir", "setting": "--settings",
                "eval_fold": "--folds", "test_labels": "--label-groups", "log_dir": "--log-dir",
                "exp_name": "nothing (exp_name follows from the cell)",
                "evaluation.n_shot": "--shots", "eval_dataset": "--eval-datasets", "eval_data_dir": "--data-dir",
                "train.resume": "nothing (the sweep resumes killed runs by itself)"}


class SweepError(UserError):
    """A sweep that cannot be planned (unknown method or dataset, a fold out of range, ...)."""


@dataclass(frozen=True)
class Cell:
    method: str
    dataset: str                      # the dataset's name, as in its spec (CHAOST2, SABS, CMR, SYNTH, ...)
    setting: int
    test_labels: tuple[int, ...]
    fold: int
    n_shot: int = 1                   # support scans K of the evaluation
    eval_dataset: str | None = None   # the dataset evaluated (None: `dataset`, in-domain)

    def describe(self) -> str:
        shots = "" if self.n_shot == 1 else f" {self.n_shot}-shot"
        domain = "" if self.eval_dataset is None else f" -> {self.eval_dataset}"
        return (f"{self.method} {self.dataset}{domain} setting {self.setting} labels "
                f"{','.join(map(str, self.test_labels))} fold {self.fold}{shots}")

    @property
    def exp_name(self) -> str:
        """The exp_name of the cell's runs (as training.py derives it from the same keys)."""
        return experiment_name(self.method, self.dataset, self.setting, self.test_labels, self.fold)

    @property
    def key(self) -> str:
        """The cell's own name among the sweep's cells (its log file, its Slurm job record): the exp_name,
        which the K-shot and cross-domain cells of one training share, plus their K and evaluated dataset."""
        shots = "" if self.n_shot == 1 else f"_{self.n_shot}shot"
        domain = "" if self.eval_dataset is None else f"_to_{self.eval_dataset}"
        return self.exp_name + shots + domain


@dataclass(frozen=True)
class Sweep:
    """What every cell of one sweep shares. Paths are kept as the user typed them, relative to `cwd`,
    where every command of the sweep runs (so the recorded configs read like commands typed there)."""
    log_dir: str
    data_dirs: dict                   # dataset name -> data folder
    updates: tuple[str, ...] = ()     # Sacred updates (key=value) and protocol_<name> named configs, as typed
    cwd: str = field(default_factory=os.getcwd)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.cwd) / self.log_dir / "sweep"

    def log_path(self, cell: Cell) -> Path:
        return self.sweep_dir / "logs" / f"{cell.key}.log"


@dataclass(frozen=True)
class Plan:
    cell: Cell
    state: str
    resume: str | None = None         # the run folder to continue (state to resume)
    evaluation: EvalRun | None = None    # the evaluation run (state done)
    note: str = ""

    @property
    def exp_name(self) -> str:
        return self.cell.exp_name


# ----------------------------------------------------------------------------- cells
def parse_label_group(text: str) -> tuple[int, ...]:
    """'2,3' -> (2, 3)."""
    try:
        labels = tuple(int(v) for v in str(text).replace(" ", "").strip("[]").split(",") if v)
    except ValueError:
        labels = ()
    if not labels or len(set(labels)) != len(labels):
        raise SweepError(f"--label-groups: {text!r} is not a group of distinct class ids; write each group as "
                         f"comma-separated ids, e.g. --label-groups 2,3 1,4")
    return labels


def dataset_spec(name: str, data_dir: str | None = None):
    try:
        return load_spec(name, data_dir)
    except UserError as err:
        raise SweepError(f"--datasets: {err}") from None


def plan_cells(methods, datasets, settings, folds, label_groups=None, data_dirs=None, shots=(1,),
               eval_datasets=None) -> list[Cell]:
    """Every cell, in table order: method, dataset, setting, label group, fold, then the evaluation axes:
    K in `shots`, the evaluated dataset in `eval_datasets` (None: in-domain only; a name equal to the
    training dataset is its in-domain cell). Setting 1 has one group (all the dataset's evaluated
    classes), setting 2 one per group of the dataset's `setting2_groups` (one model each, as
    scripts/train_*.sh); `label_groups` replaces both."""
    for k in shots:
        if not isinstance(k, int) or k < 1:
            raise SweepError(f"--shots: {k!r} is not a number of support scans; use whole numbers >= 1, e.g. 1 3")
    evaluated = [None] + [dataset_spec(n, (data_dirs or {}).get(n.upper())).name for n in eval_datasets or ()]
    known = method_names()
    for method in methods:
        if method not in known:
            raise SweepError(f"--methods: unknown method {method!r}; available: {', '.join(known)}")
    for setting in settings:
        if setting not in (1, 2):
            raise SweepError(f"--settings: {setting!r} is not a setting; use 1 and/or 2")
    cells = []
    for method in methods:
        for name in datasets:
            spec = dataset_spec(name, (data_dirs or {}).get(name.upper()))
            for fold in folds:
                if not 0 <= fold < spec.n_folds:
                    raise SweepError(f"--folds: fold {fold} is out of range for {spec.name}, which has "
                                     f"{spec.n_folds} folds (0-{spec.n_folds - 1})")
            for setting in settings:
                groups = [tuple(spec.eval_labels)] if setting == 1 else [tuple(g) for g in spec.setting2_groups]
                for group in (label_groups or groups):
                    try:
                        spec.check_label_ids(list(group), "--label-groups")
                    except UserError as err:
                        raise SweepError(str(err)) from None
                    cells += [Cell(method, spec.name, setting, tuple(group), fold, k,
                                   None if e is None or e.upper() == spec.name.upper() else e)
                              for fold in folds for e in evaluated for k in shots]
    return list(dict.fromkeys(cells))          # a cell named twice (--folds 0 0) runs once


# ----------------------------------------------------------------------------- configs and commands
def parse_updates(updates) -> dict:
    """The dotted keys and values that `updates` (Sacred's `key=value` words and `protocol_<name>`
    named configs) set, decoded as Sacred decodes them; keys the sweep sets are refused."""
    nested, named = get_config_updates(list(updates))
    dotted = {}
    for name in named:
        path = PROTOCOL_DIR / f"{name[len('protocol_'):]}.yaml" if name.startswith("protocol_") else None
        if path is None or not path.is_file():
            choices = ", ".join(f"protocol_{p.stem}" for p in sorted(PROTOCOL_DIR.glob("*.yaml")))
            raise SweepError(f"{name!r}: a sweep passes key=value updates and protocol named configs ({choices}) "
                             f"to every run; methods and datasets are chosen with --methods and --datasets")
        dotted.update(flatten_config(load_yaml(path)))
    dotted.update(flatten_config(nested))
    for key in dotted:
        if key in SWEEP_OPTION:
            raise SweepError(f"the update {key}=... would be the same for every cell; the sweep sets {key} "
                             f"itself: use {SWEEP_OPTION[key]}")
    return dotted


def data_dir_of(sweep: Sweep, dataset: str) -> str:
    return sweep.data_dirs.get(dataset.upper(), default_data_dir(dataset))


def cell_experiment(sweep: Sweep, cell: Cell) -> Experiment:
    """The cell's experiment, as training.py assembles it from the cell's command line (data_dir as
    the commands name it, relative to the sweep's working directory)."""
    updates = {**parse_updates(sweep.updates), "eval_fold": cell.fold, "test_labels": list(cell.test_labels),
               "evaluation.n_shot": cell.n_shot}
    if cell.eval_dataset is not None:
        updates.update({"eval_dataset": cell.eval_dataset,
                        "eval_data_dir": str(Path(sweep.cwd) / data_dir_of(sweep, cell.eval_dataset))})
    cwd_data_dir = Path(sweep.cwd) / data_dir_of(sweep, cell.dataset)
    exp = Experiment.from_config(build_config(cell.method, cell.dataset, cwd_data_dir, sweep.log_dir, cell.setting,
                                              updates))
    evaluated = data_dir_of(sweep, cell.eval_dataset or cell.dataset)
    return replace(exp, data_dir=data_dir_of(sweep, cell.dataset), eval_data_dir=evaluated)


def _sacred_words(sweep: Sweep, cell: Cell) -> list[str]:
    labels = ",".join(map(str, cell.test_labels))
    return ["with", cell.method, f"dataset={cell.dataset}", f"data_dir={data_dir_of(sweep, cell.dataset)}",
            f"setting={cell.setting}", f"eval_fold={cell.fold}", f"test_labels=[{labels}]",
            f"log_dir={sweep.log_dir}", *sweep.updates]


def train_command(sweep: Sweep, cell: Cell, resume: str | None = None) -> list[str]:
    extra = [f"train.resume={resume}"] if resume else []
    return [sys.executable, str(PROJECT_ROOT / "training.py"), *_sacred_words(sweep, cell), *extra]


def eval_command(sweep: Sweep, cell: Cell) -> list[str]:
    extra = [] if cell.n_shot == 1 else [f"evaluation.n_shot={cell.n_shot}"]
    if cell.eval_dataset is not None:
        extra += [f"eval_dataset={cell.eval_dataset}", f"eval_data_dir={data_dir_of(sweep, cell.eval_dataset)}"]
    return [sys.executable, str(PROJECT_ROOT / "validation.py"), *_sacred_words(sweep, cell), *extra]


def commands(sweep: Sweep, plan: Plan) -> list[list[str]]:
    """What a cell still has to run, in order."""
    if plan.state in (TO_TRAIN, TO_RESUME, STALE):      # plan.resume is None for a new training
        return [train_command(sweep, plan.cell, plan.resume), eval_command(sweep, plan.cell)]
    if plan.state == TO_EVALUATE:
        return [eval_command(sweep, plan.cell)]
    return []


# ----------------------------------------------------------------------------- states
def _same_file(a, b, cwd: str) -> bool:
    return (Path(cwd) / a).resolve() == (Path(cwd) / b).resolve()


def find_evaluation(sweep: Sweep, exp: Experiment, checkpoint: Path) -> EvalRun | None:
    """The newest evaluation run of the cell's exp_name that evaluated `checkpoint` with the cell's
    configuration (its evaluation fingerprint), or None."""
    fingerprint = config_fingerprint(exp.to_config(), TEST)
    for folder in reversed(run_folders(experiment_folder(Path(sweep.cwd) / exp.log_dir, TEST, exp.exp_name))):
        try:
            run = read_run(folder.path)
        except UserError:
            continue                   # unreadable evaluation: not a result (evaluated again)
        if (run is not None and run.fingerprint == fingerprint and folder.status() == "COMPLETED"
                and _same_file(run.checkpoint, checkpoint, sweep.cwd)):
            return run
    return None


@contextlib.contextmanager
def claim(sweep: Sweep, cell: Cell):
    """Claim the cell for this process while it trains and evaluates it: yields True when claimed,
    False when another process (another sweep) holds it. An advisory flock, dropped however the
    process ends, on <log-dir>/sweep/claims/<exp_name>.lock."""
    path = sweep.sweep_dir / "claims" / f"{cell.exp_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mine = try_flock(fd, fcntl.LOCK_EX, path=path)      # retries: a re-planning sweep's probe is brief
    except BaseException:
        os.close(fd)
        raise
    if not mine:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_claimed(sweep: Sweep, cell: Cell) -> bool:
    """Whether another process holds the cell's claim now (writes nothing)."""
    try:
        fd = os.open(sweep.sweep_dir / "claims" / f"{cell.exp_name}.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        return not try_flock(fd, fcntl.LOCK_SH, folder=True)  # no locks on this file system: not held either
    finally:
        os.close(fd)


def plan_state(sweep: Sweep, cell: Cell, mine: bool = False) -> Plan:
    """What the cell needs (module docstring), from its run folders; reads no snapshot. A cell another
    process has claimed is `running` (`mine`: this process holds the claim)."""
    if not mine and is_claimed(sweep, cell):
        return Plan(cell, RUNNING, note="claimed by another sweep process")
    exp = cell_experiment(sweep, cell)
    fingerprint = config_fingerprint(exp.to_config(), TRAIN)
    exp_name = cell.exp_name
    log_dir = Path(sweep.cwd) / sweep.log_dir
    try:
        checkpoint = find_checkpoint(log_dir, exp_name, exp.to_config())
    except CheckpointError:
        checkpoint = None
    if checkpoint is not None:
        evaluation = find_evaluation(sweep, exp, checkpoint)
        if evaluation is not None:
            return Plan(cell, DONE, evaluation=evaluation)
        return Plan(cell, TO_EVALUATE)
    runs = run_folders(experiment_folder(log_dir, TRAIN, exp_name))
    for run in reversed(runs):
        if run.status() == "COMPLETED" or run.fingerprint(TRAIN, upgrade_config) != fingerprint:
            continue
        if run.is_locked():              # also before its first resume point
            return Plan(cell, RUNNING, note=f"{run} is being trained by another process")
        if not run.has_resume_point():
            continue
        # the run folder as the commands name it (relative to the sweep's working directory, as log_dir)
        return Plan(cell, TO_RESUME, resume=str(experiment_folder(sweep.log_dir, TRAIN, exp_name) / run.path.name))
    older = [run for run in runs if (run.last_snapshot() is not None or run.has_resume_point())
             and run.fingerprint(TRAIN, upgrade_config) != fingerprint]
    if older:
        return Plan(cell, STALE, note=f"{older[-1]} was trained with another configuration; a new run is trained")
    return Plan(cell, TO_TRAIN)


def format_plan(plans: list[Plan]) -> str:
    """The plan as a plain table: cell, exp_name, state (and why, where it matters)."""
    rows = [("cell", "exp_name", "state")] + [
        (p.cell.describe(), p.exp_name, p.state + (f" ({p.note})" if p.note else ""))
        for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    counts = {s: sum(p.state == s for p in plans)
              for s in (DONE, TO_TRAIN, TO_RESUME, TO_EVALUATE, STALE, RUNNING, QUEUED)}
    lines.append(f"{len(plans)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks before anything runs
def check_sweep_updates(sweep: Sweep, cells: list[Cell]) -> None:
    """Every update must be a key of every cell's config (a typo is refused before anything runs)."""
    seen = set()
    for cell in cells:
        key = (cell.method, cell.dataset, cell.setting)
        if key not in seen:
            seen.add(key)
            try:
                cell_experiment(sweep, cell)
            except ConfigError as err:
                raise SweepError(f"{cell.method} on {cell.dataset}, setting {cell.setting}: {err}") from None


def check_before_start(sweep: Sweep, plans: list[Plan], gpus: list[str] | None, available: list[str]) -> None:
    """What every cell that still runs needs, checked before the first cell starts, all problems in one
    error: its data folder (and the training pseudolabels), its pretrained-weights file, and the GPUs
    asked for (`gpus`, from --gpus) among those available."""
    problems: list[str] = []
    checked: set = set()

    def note(err: Exception) -> None:
        if str(err) not in problems:
            problems.append(str(err))

    for plan in plans:
        if not commands(sweep, plan):
            continue
        exp = cell_experiment(sweep, plan.cell)
        exp = replace(exp, data_dir=str(Path(sweep.cwd) / exp.data_dir))
        training = plan.state != TO_EVALUATE
        key = (exp.dataset, exp.data_dir, pseudolabel_folder(exp.data, exp.sampler), training)
        if key not in checked:
            checked.add(key)
            try:
                data_dir = check_data_dir(exp)
                images = load_spec(exp.dataset, exp.data_dir).image_folder(data_dir)
                if not Path(images).is_dir():
                    problems.append(f"{exp.dataset}: image folder {images} not found (see data/README.md)")
                labels = data_dir / pseudolabel_folder(exp.data, exp.sampler)
                if training and not exp.sampler.use_gt and not labels.is_dir():
                    problems.append(f"{exp.dataset}: training pseudolabels {labels} not found; make them with "
                                    f"`python -m data.pseudolabels {exp.data_dir} --dataset {exp.dataset}` "
                                    f"(see data/README.md)")
            except UserError as err:
                note(err)
        evaluated = replace(exp, dataset=exp.eval_dataset, data_dir=str(Path(sweep.cwd) / exp.eval_data_dir))
        if plan.cell.eval_dataset is not None and ("evaluated", evaluated.data_dir) not in checked:
            checked.add(("evaluated", evaluated.data_dir))
            try:
                check_data_dir(evaluated)
            except UserError as err:
                note(err)
        if training and exp.encoder not in checked:
            checked.add(exp.encoder)
            try:
                check_encoder_weights(exp.encoder)
            except UserError as err:
                note(err)
    for gpu in gpus or []:
        if gpu not in available:
            problems.append(f"--gpus {gpu}: no such GPU here (visible: {', '.join(available) or 'none'})")
    if any(commands(sweep, plan) for plan in plans):
        try:
            check_output_folder(Path(sweep.cwd) / sweep.log_dir, "the sweep's log folder (--log-dir)")
        except UserError as err:
            note(err)
    if problems:
        raise SweepError("the sweep cannot start; nothing was run:\n  - " + "\n  - ".join(problems))
