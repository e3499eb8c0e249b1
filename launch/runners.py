"""Running a sweep's cells: the job of one cell, and one scheduler that hands jobs to a runner.

A `CellJob` re-reads its cell's state when it starts (so a job that Slurm requeues after a
pre-emption or a time limit resumes its training instead of starting it again), then runs the cell's
training and evaluation as subprocesses, their output appended to the cell's log.

`schedule` runs jobs on slots (one per GPU, or one on the CPU) through a runner:
- `LocalRunner`: each job in a thread of this process (its commands are subprocesses);
- `SubmititLocalRunner`: each job as a submitit LocalExecutor process;
Slurm schedules its own job array (`submit_slurm_array`, at most --array-parallelism at once) and
`wait` collects any submitted jobs' outcomes.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import importlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from data.core.io import write_json
from launch.sweep import DONE, QUEUED, Cell, Plan, Sweep, SweepError, claim, commands, plan_state
from models.engine.runs import PROJECT_ROOT

log = logging.getLogger(__name__)


class CellFailed(RuntimeError):
    """A command of a cell exited with an error; the message names the cell's log and its last error."""


# ----------------------------------------------------------------------------- one cell's job
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


def last_error_line(log_path: Path) -> str:
    """The line of a cell's log that says why its command failed: the last `error:` line or exception,
    else the last line the command printed."""
    try:
        lines = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    printed = [ln for ln in lines if ln and not ln.startswith("[sweep]")]
    for line in reversed(printed):
        head = line.split(":", 1)[0]
        if line.startswith("error:") or (head.endswith(("Error", "Exception")) and " " not in head):
            return line
    return printed[-1] if printed else ""


@dataclass(frozen=True)
class CellJob:
    """One cell as a job. Raises CellFailed (naming the log and its last error line) when a command
    fails. `gpu`: the CUDA device the commands see."""
    sweep: Sweep
    cell: Cell
    gpu: str | None = None

    def __call__(self) -> str:
        with claim(self.sweep, self.cell) as mine:
            if not mine:
                return f"{self.cell.exp_name}: running (claimed by another sweep process; left to it)"
            return self._run()

    def _run(self) -> str:
        plan = plan_state(self.sweep, self.cell, mine=True)
        todo = commands(self.sweep, plan)
        if not todo:
            return f"{plan.exp_name}: {plan.state}"
        env = dict(os.environ)
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        log_path = self.sweep.log_path(plan.cell)
        for command in todo:
            status = run_command(command, log_path, self.sweep.cwd, env)
            if status != 0:
                reason = last_error_line(log_path)
                raise CellFailed(f"{self.cell.describe()} ({plan.exp_name}): `{Path(command[1]).name}` exited "
                                 f"with status {status}" + (f": {reason}" if reason else "")
                                 + f"; its output is in {log_path}")
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


# ----------------------------------------------------------------------------- the scheduler
class LocalRunner:
    """Runs each job in a thread of this process (its commands are subprocesses)."""

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="sweep-job")

    def start(self, job: CellJob, slot: str | None):
        return self.pool.submit(replace(job, gpu=slot))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class SubmititLocalRunner:
    """Runs each job as a process of submitit's LocalExecutor, seeing only its slot's GPU."""

    def __init__(self, executor):
        self.executor = executor
        _export_project_path()

    def start(self, job: CellJob, slot: str | None):
        if slot is not None:
            if not str(slot).isdigit():
                raise SweepError(f"--gpus {slot}: the submitit-local executor takes GPU indices (0 1 ...)")
            self.executor.update_parameters(gpus_per_node=1, visible_gpus=[int(slot)])
        submitted = self.executor.submit(replace(job, gpu=None))
        log.info("job %s: %s", submitted.job_id, job.cell.describe())
        return submitted

    def close(self) -> None:
        pass


def outcome_of(job: CellJob, handle) -> Outcome:
    """The outcome of a finished job from its handle (a future or a submitit job): a failed job's
    message names the cell, its log and its last error line."""
    try:
        outcome = Outcome(job, True, str(handle.result()))
    except CellFailed as err:
        outcome = Outcome(job, False, str(err))
    except Exception as err:  # noqa: BLE001 - submitit re-raises the job's error, or its own
        text = str(err).strip()
        cell_failed = [ln for ln in text.splitlines() if "CellFailed:" in ln]
        if cell_failed:
            message = cell_failed[-1].split("CellFailed:", 1)[1].strip()
        else:
            last = text.splitlines()[-1:] or [type(err).__name__]
            stderr = getattr(getattr(handle, "paths", None), "stderr", None)
            cell_log = job.sweep.log_path(job.cell)
            reason = last_error_line(cell_log)
            message = (f"{job.cell.describe()}: job {getattr(handle, 'job_id', '?')} failed ({last[0]})"
                       + (f"; its log ends with: {reason}" if reason else "")
                       + f"; cell log {cell_log}" + (f", job log {stderr}" if stderr else ""))
        outcome = Outcome(job, False, message)
    log.log(logging.INFO if outcome.ok else logging.ERROR, "%s", outcome.message)
    return outcome


def schedule(jobs: list, runner, slots: list[str | None], poll_s: float = 0.2) -> list[Outcome]:
    """Run `jobs` through `runner`, at most one per slot at a time (a slot is a GPU; [None]: one job
    after the other on the CPU); each job is given its slot's GPU. Outcomes in the order jobs end."""
    slots = list(slots) or [None]
    pending, running, outcomes = list(jobs), {}, []
    try:
        while pending or running:
            for slot in [s for s in slots if s not in running]:
                if not pending:
                    break
                job = pending.pop(0)
                log.info("starting %s%s", job.cell.describe(), f" on GPU {slot}" if slot is not None else "")
                running[slot] = (replace(job, gpu=slot), runner.start(job, slot))
            for slot, (job, handle) in list(running.items()):
                if handle.done():
                    del running[slot]
                    outcomes.append(outcome_of(job, handle))
            if running:
                time.sleep(poll_s)
    finally:
        runner.close()
    return outcomes


def run_local(jobs: list, gpus: list[str]) -> list[Outcome]:
    """The local executor: one job per GPU at a time (each sees only its GPU), or one after the other
    when there is no GPU."""
    return schedule(jobs, LocalRunner(), gpus or [None])


def run_submitit_local(jobs: list, executor, gpus: list[str]) -> list[Outcome]:
    return schedule(jobs, SubmititLocalRunner(executor), gpus or [None])


def wait(jobs: list[CellJob], submitted: list) -> list[Outcome]:
    """Wait for submitted jobs (Slurm); a failed job's message names the cell's log and submitit's own."""
    return [outcome_of(job, sj) for job, sj in zip(jobs, submitted)]


# ----------------------------------------------------------------------------- submitit and Slurm
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
    local subprocesses)."""
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


def submit_slurm_array(jobs: list[CellJob], executor) -> list:
    """One submitit job per cell, as one Slurm job array; returns the submitit jobs in the order of `jobs`."""
    _export_project_path()
    return executor.submit_array(jobs)


def _jobs_file(sweep: Sweep) -> Path:
    return sweep.sweep_dir / "slurm_jobs.json"


def recorded_jobs(sweep: Sweep) -> dict[str, str]:
    """cell key (Cell.key) -> the Slurm job id of its last submission by this sweep."""
    path = _jobs_file(sweep)
    return json.loads(path.read_text()) if path.is_file() else {}


def record_jobs(sweep: Sweep, plans: list[Plan], submitted: list) -> None:
    known = recorded_jobs(sweep)
    known.update({p.cell.key: str(sj.job_id) for p, sj in zip(plans, submitted)})
    write_json(_jobs_file(sweep), dict(sorted(known.items())))


def mark_queued(sweep: Sweep, plans: list[Plan]) -> list[Plan]:
    """Cells whose Slurm job (recorded by an earlier submission of this sweep) is still in the queue
    or running become 'queued', so that re-running the sweep does not submit them twice."""
    recorded = recorded_jobs(sweep)
    if not recorded or shutil.which("squeue") is None:
        return plans
    ids = sorted({recorded[p.cell.key] for p in plans if p.cell.key in recorded and p.state != DONE})
    if not ids:
        return plans
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
    active = set(out.stdout.split()) if out.returncode == 0 else set()
    return [replace(p, state=QUEUED, note=f"Slurm job {recorded[p.cell.key]}")
            if p.state != DONE and recorded.get(p.cell.key) in active else p for p in plans]
