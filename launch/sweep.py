"""A sweep: the cells of a results table (methods x datasets x settings x label groups x folds), what
each still needs, and the jobs that train and evaluate them.

A cell is one training run and its evaluation, the same Sacred runs as

    python training.py   with <method> <dataset> data_dir=.. setting=.. eval_fold=.. test_labels=[..] log_dir=..
    python validation.py with <the same>

Its state is read from the run folders, with the rules the commands use (models.engine.checkpoints,
models.engine.trainer.check_resume, the run lock), so a sweep can be re-run at any time:

- done:        an evaluation (same protocol) of the last snapshot of a COMPLETED training exists;
- to evaluate: a COMPLETED training exists, no such evaluation;
- to resume:   the newest unfinished training (RUNNING, FAILED or INTERRUPTED in run.json) has a
               resume point (snapshots/last.pth) written with the same configuration, and no
               process holds its lock: it continues with train.resume=<run folder>;
- running:     that run's lock is held: another process trains it now (skipped);
- to train:    anything else.

A job (CellJob) re-reads its cell's state when it starts, so a job that Slurm requeues after a
pre-emption or a time limit resumes its training instead of starting it again. The executors run
the jobs here (one process at a time per GPU, or one after the other on the CPU) or through
submitit (Slurm job arrays, or its LocalExecutor).
"""
from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from sacred.arg_parser import get_config_updates

from configs.experiment import PROTOCOL_DIR, build_config, default_data_dir, experiment_name, load_yaml, method_names
from data.core.errors import CheckpointError, ConfigError, UserError
from data.core.io import write_json
from data.core.specs import load_spec
from evaluation.leaderboard import PROTOCOL_KEYS, EvalRun, read_run
from models.engine.checkpoints import find_checkpoint, run_folders, run_status
from models.engine.runs import PROJECT_ROOT, RunBusyError, lock_run, unlock_run
from models.engine.trainer import RESUME_FILE, check_resume, flatten_config

log = logging.getLogger(__name__)

DONE, TO_EVALUATE, TO_RESUME, TO_TRAIN, RUNNING, QUEUED = (
    "done", "to evaluate", "to resume", "to train", "running", "queued")
# keys the sweep sets for every cell (an update may not override them) -> the option that sets them
SWEEP_OPTION = {"method": "--methods", "dataset": "--datasets", "data_dir": "--data-dir", "setting": "--settings",
                "eval_fold": "--folds", "test_labels": "--label-groups", "log_dir": "--log-dir",
                "exp_name": "nothing (exp_name follows from the cell)",
                "train.resume": "nothing (the sweep resumes killed runs by itself)"}


class SweepError(UserError):
    """A sweep that cannot be planned (unknown method or dataset, a fold out of range, ...)."""


class CellFailed(RuntimeError):
    """A command of a cell exited with an error; the message names the cell's log."""


@dataclass(frozen=True)
class Cell:
    method: str
    dataset: str                      # the dataset's name, as in its spec (CHAOST2, SABS, CMR, SYNTH, ...)
    setting: int
    test_labels: tuple[int, ...]
    fold: int

    def describe(self) -> str:
        return (f"{self.method} {self.dataset} setting {self.setting} labels "
                f"{','.join(map(str, self.test_labels))} fold {self.fold}")

    @property
    def exp_name(self) -> str:
        """The exp_name of the cell's runs (as training.py derives it from the same keys)."""
        return experiment_name(self.method, self.dataset, self.setting, self.test_labels, self.fold)


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

    def log_path(self, exp_name: str) -> Path:
        return self.sweep_dir / "logs" / f"{exp_name}.log"


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


def plan_cells(methods, datasets, settings, folds, label_groups=None, data_dirs=None) -> list[Cell]:
    """Every cell, in table order: method, dataset, setting, label group, fold. Setting 1 has one
    group (all the dataset's evaluated classes), setting 2 one per group of the dataset's
    `setting2_groups` (one model each, as scripts/train_*.sh); `label_groups` replaces both."""
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
                    cells += [Cell(method, spec.name, setting, tuple(group), fold) for fold in folds]
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


def cell_config(sweep: Sweep, cell: Cell) -> dict:
    """The cell's complete config, as training.py assembles it from the cell's command line."""
    updates = {**parse_updates(sweep.updates), "eval_fold": cell.fold, "test_labels": list(cell.test_labels)}
    cwd_data_dir = Path(sweep.cwd) / data_dir_of(sweep, cell.dataset)
    cfg = build_config(cell.method, cell.dataset, cwd_data_dir, sweep.log_dir, cell.setting, updates)
    cfg["data_dir"] = data_dir_of(sweep, cell.dataset)
    return cfg


def _sacred_words(sweep: Sweep, cell: Cell) -> list[str]:
    labels = ",".join(map(str, cell.test_labels))
    return ["with", cell.method, f"dataset={cell.dataset}", f"data_dir={data_dir_of(sweep, cell.dataset)}",
            f"setting={cell.setting}", f"eval_fold={cell.fold}", f"test_labels=[{labels}]",
            f"log_dir={sweep.log_dir}", *sweep.updates]


def train_command(sweep: Sweep, cell: Cell, resume: str | None = None) -> list[str]:
    extra = [f"train.resume={resume}"] if resume else []
    return [sys.executable, str(PROJECT_ROOT / "training.py"), *_sacred_words(sweep, cell), *extra]


def eval_command(sweep: Sweep, cell: Cell) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "validation.py"), *_sacred_words(sweep, cell)]


def commands(sweep: Sweep, plan: Plan) -> list[list[str]]:
    """What a cell still has to run, in order."""
    if plan.state in (TO_TRAIN, TO_RESUME):             # plan.resume is None for a new training
        return [train_command(sweep, plan.cell, plan.resume), eval_command(sweep, plan.cell)]
    if plan.state == TO_EVALUATE:
        return [eval_command(sweep, plan.cell)]
    return []


# ----------------------------------------------------------------------------- states
def is_locked(run_dir: Path) -> bool:
    """Whether a process trains into run_dir now (holds its lock); probes the lock and lets it go."""
    try:
        lock_run(run_dir)
    except RunBusyError:
        return True
    unlock_run(run_dir)
    return False


def _same_file(a, b, cwd: str) -> bool:
    return (Path(cwd) / a).resolve() == (Path(cwd) / b).resolve()


def find_evaluation(sweep: Sweep, cfg: dict, checkpoint: Path) -> EvalRun | None:
    """The newest evaluation run of the cell's exp_name that evaluated `checkpoint` with the cell's
    protocol (the evaluation keys that make a protocol, PROTOCOL_KEYS), or None."""
    protocol = tuple((k, cfg["evaluation"][k]) for k in PROTOCOL_KEYS)
    for folder in reversed(run_folders(Path(sweep.cwd) / cfg["log_dir"] / "test" / cfg["exp_name"])):
        try:
            run = read_run(folder)
        except UserError:
            continue                   # unreadable evaluation: not a result (evaluated again)
        if run is not None and run.protocol == protocol and _same_file(run.checkpoint, checkpoint, sweep.cwd):
            return run
    return None


def plan_state(sweep: Sweep, cell: Cell) -> Plan:
    """What the cell needs (module docstring), from its run folders."""
    cfg = cell_config(sweep, cell)
    exp_name = cell.exp_name
    log_dir = Path(sweep.cwd) / sweep.log_dir
    try:
        checkpoint = find_checkpoint(log_dir, exp_name)
    except CheckpointError:
        checkpoint = None
    if checkpoint is not None:
        evaluation = find_evaluation(sweep, cfg, checkpoint)
        if evaluation is not None:
            return Plan(cell, DONE, evaluation=evaluation)
        return Plan(cell, TO_EVALUATE)
    for run in reversed(run_folders(log_dir / "train" / exp_name)):
        if run_status(run) == "COMPLETED" or not (run / "snapshots" / RESUME_FILE).is_file():
            continue
        if is_locked(run):
            return Plan(cell, RUNNING, note=f"{run} is being trained by another process")
        try:
            check_resume({**cfg, "train": {**cfg["train"], "resume": str(run)}})
        except UserError as err:
            return Plan(cell, TO_TRAIN, note=f"a new run: {run} cannot be resumed ({err})")
        # the run folder as the commands name it (relative to the sweep's working directory, as log_dir)
        return Plan(cell, TO_RESUME, resume=str(Path(sweep.log_dir) / "train" / exp_name / run.name))
    return Plan(cell, TO_TRAIN)


def format_plan(plans: list[Plan]) -> str:
    """The plan as a plain table: cell, exp_name, state (and why, where it matters)."""
    rows = [("cell", "exp_name", "state")] + [
        (p.cell.describe(), p.exp_name, p.state + (f" ({p.note})" if p.note else ""))
        for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    counts = {s: sum(p.state == s for p in plans) for s in (DONE, TO_TRAIN, TO_RESUME, TO_EVALUATE, RUNNING, QUEUED)}
    lines.append(f"{len(plans)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- jobs
def _die_with_parent() -> None:
    """In a command's process (Linux): be killed when the job's process dies, however it dies (a
    SIGKILL, a pre-emption), so that no training outlives its job and holds the run's lock."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_command(command: list[str], log_path: Path, cwd: str, env: dict | None = None) -> int:
    """Run one command of a cell, its output appended to the cell's log; returns the exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        out.write(f"[sweep] {time.strftime('%Y-%m-%d %H:%M:%S')} job process {os.getpid()} runs (cwd {cwd}):\n"
                  f"[sweep] {shlex.join(command)}\n")
        out.flush()
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=preexec)
        out.write(f"[sweep] command process {proc.pid}\n")
        out.flush()
        status = proc.wait()
        out.write(f"[sweep] exit status {status}\n")
    return status


@dataclass(frozen=True)
class CellJob:
    """One cell as a job: its state is read again when the job starts (a requeued job resumes), then
    its training and evaluation run as subprocesses, their output in the cell's log. Raises
    CellFailed (naming the log) when a command fails. `gpu`: the CUDA device the commands see."""
    sweep: Sweep
    cell: Cell
    gpu: str | None = None

    def __call__(self) -> str:
        plan = plan_state(self.sweep, self.cell)
        todo = commands(self.sweep, plan)
        if not todo:
            return f"{plan.exp_name}: {plan.state}"
        env = dict(os.environ)
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        log_path = self.sweep.log_path(plan.exp_name)
        for command in todo:
            status = run_command(command, log_path, self.sweep.cwd, env)
            if status != 0:
                raise CellFailed(f"{self.cell.describe()} ({plan.exp_name}): `{Path(command[1]).name}` exited "
                                 f"with status {status}; its output is in {log_path}")
        return f"{plan.exp_name}: {plan.state} -> done"

    def checkpoint(self):
        """submitit calls this on a pre-emption or before the time limit: the job is requeued as it
        is, and on restart reads the cell's state again (so it resumes from the last resume point)."""
        submitit = importlib.import_module("submitit")
        return submitit.helpers.DelayedSubmission(self)


@dataclass
class Outcome:
    job: CellJob                      # as it ran (with the GPU it was given)
    ok: bool
    message: str


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]


def _outcome(job: CellJob) -> Outcome:
    log.info("starting %s%s", job.cell.describe(), f" on GPU {job.gpu}" if job.gpu is not None else "")
    try:
        outcome = Outcome(job, True, job())
    except CellFailed as err:
        outcome = Outcome(job, False, str(err))
    log.log(logging.INFO if outcome.ok else logging.ERROR, "%s", outcome.message)
    return outcome


def run_local(jobs: list[CellJob], gpus: list[str]) -> list[Outcome]:
    """Run the jobs here: one worker per GPU (each job sees only its worker's GPU), or one job after
    the other when there is no GPU."""
    if not gpus:
        return [_outcome(job) for job in jobs]
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    outcomes: list[Outcome] = []

    def worker(gpu: str) -> None:
        while True:
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            outcomes.append(_outcome(replace(job, gpu=gpu)))

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


# ----------------------------------------------------------------------------- submitit
def import_submitit(executor: str):
    try:
        return importlib.import_module("submitit")
    except ImportError:
        raise SweepError(f"--executor {executor} needs submitit, which is not installed in this environment: "
                         f"`pip install submitit==1.5.2` (it is in requirements.txt), or use --executor local") from None


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    time_min: int = 24 * 60
    gpus_per_job: int = 1
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 32
    sbatch: tuple[str, ...] = ()      # extra sbatch options as key=value (account=lab, qos=high, constraint=a100)
    setup: tuple[str, ...] = ()       # shell lines run before each job (module load ..., source .venv/bin/activate)


def parse_sbatch(words) -> dict:
    extra = {}
    for word in words:
        key, sep, value = str(word).lstrip("-").partition("=")
        if not sep or not key:
            raise SweepError(f"--sbatch {word!r}: write each extra sbatch option as key=value, e.g. "
                             f"--sbatch account=mylab qos=normal")
        extra[key.replace("-", "_")] = value
    return extra


def make_executor(kind: str, folder: Path, slurm: SlurmOptions):
    """A submitit executor: 'slurm' (job arrays through sbatch) or 'submitit-local' (the same jobs as
    local subprocesses, all at once)."""
    submitit = import_submitit(kind)
    if kind == "slurm":
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise SweepError(f"--executor slurm: {' and '.join(missing)} not found on this machine's PATH; run the "
                             f"sweep on the cluster's login node, or use --executor local")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = {"timeout_min": slurm.time_min, "gpus_per_node": slurm.gpus_per_job, "nodes": 1,
                  "tasks_per_node": 1, "slurm_array_parallelism": slurm.array_parallelism,
                  "name": "fewshot-sweep"}
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if slurm.cpus_per_job:
            params["cpus_per_task"] = slurm.cpus_per_job
        if slurm.mem_gb:
            params["mem_gb"] = slurm.mem_gb
        if slurm.sbatch:
            params["slurm_additional_parameters"] = parse_sbatch(slurm.sbatch)
        if slurm.setup:
            params["slurm_setup"] = list(slurm.setup)
        executor.update_parameters(**params)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="local")
    executor.update_parameters(timeout_min=slurm.time_min, gpus_per_node=0)
    return executor


def _export_project_path() -> None:
    """Jobs unpickle CellJob, so they must import this project whatever their working directory."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(PROJECT_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def submit(jobs: list[CellJob], executor) -> list:
    """One submitit job per cell, as one Slurm job array; returns the submitit jobs in the order of `jobs`."""
    _export_project_path()
    return executor.submit_array(jobs)


def submit_local(jobs: list[CellJob], executor, gpus: list[str], poll_s: float = 0.5) -> list:
    """submitit's LocalExecutor starts every job at once; here at most one job per GPU (one on the
    CPU) runs at a time, each job seeing only its GPU. Returns the finished submitit jobs."""
    _export_project_path()
    slots = list(gpus) or [None]
    pending, running, finished = list(enumerate(jobs)), {}, {}
    while pending or running:
        for slot in [s for s in slots if s not in running]:
            if not pending:
                break
            i, job = pending.pop(0)
            if slot is not None:
                if not str(slot).isdigit():
                    raise SweepError(f"--gpus {slot}: the submitit-local executor takes GPU indices (0 1 ...)")
                executor.update_parameters(gpus_per_node=1, visible_gpus=[int(slot)])
            running[slot] = (i, executor.submit(job))
            log.info("job %s: %s", running[slot][1].job_id, job.cell.describe())
        for slot, (i, sj) in list(running.items()):
            if sj.done():
                finished[i] = running.pop(slot)[1]
        time.sleep(poll_s)
    return [finished[i] for i in range(len(jobs))]


def wait(jobs: list[CellJob], submitted: list) -> list[Outcome]:
    """Wait for submitted jobs; a failed job's message names the cell's log and submitit's own."""
    outcomes = []
    for job, sj in zip(jobs, submitted):
        try:
            outcomes.append(Outcome(job, True, str(sj.result())))
        except Exception as err:  # noqa: BLE001 - submitit re-raises the job's error, or its own
            last = str(err).strip().splitlines()[-1:] or [type(err).__name__]
            outcomes.append(Outcome(job, False, f"{job.cell.describe()}: job {sj.job_id} failed ({last[0]}); "
                                                f"cell log {job.sweep.log_path(job.cell.exp_name)}, job log "
                                                f"{sj.paths.stderr}"))
    return outcomes


# ----------------------------------------------------------------------------- Slurm bookkeeping
def _jobs_file(sweep: Sweep) -> Path:
    return sweep.sweep_dir / "slurm_jobs.json"


def recorded_jobs(sweep: Sweep) -> dict[str, str]:
    """exp_name -> the Slurm job id of its last submission by this sweep."""
    path = _jobs_file(sweep)
    return json.loads(path.read_text()) if path.is_file() else {}


def record_jobs(sweep: Sweep, plans: list[Plan], submitted: list) -> None:
    known = recorded_jobs(sweep)
    known.update({p.exp_name: str(sj.job_id) for p, sj in zip(plans, submitted)})
    write_json(_jobs_file(sweep), dict(sorted(known.items())))


def mark_queued(sweep: Sweep, plans: list[Plan]) -> list[Plan]:
    """Cells whose Slurm job (recorded by an earlier submission of this sweep) is still in the queue
    or running become 'queued', so that re-running the sweep does not submit them twice."""
    recorded = recorded_jobs(sweep)
    if not recorded or shutil.which("squeue") is None:
        return plans
    ids = sorted({recorded[p.exp_name] for p in plans if p.exp_name in recorded and p.state != DONE})
    if not ids:
        return plans
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
    active = set(out.stdout.split()) if out.returncode == 0 else set()
    return [replace(p, state=QUEUED, note=f"Slurm job {recorded[p.exp_name]}")
            if p.state != DONE and recorded.get(p.exp_name) in active else p for p in plans]


def check_sweep_updates(sweep: Sweep, cells: list[Cell]) -> None:
    """Every update must be a key of every cell's config (a typo is refused before anything runs)."""
    seen = set()
    for cell in cells:
        key = (cell.method, cell.dataset, cell.setting)
        if key not in seen:
            seen.add(key)
            try:
                cell_config(sweep, cell)
            except ConfigError as err:
                raise SweepError(f"{cell.method} on {cell.dataset}, setting {cell.setting}: {err}") from None
