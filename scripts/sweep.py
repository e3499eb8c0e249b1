"""Train and evaluate a whole results table (methods x datasets x settings x label groups x folds),
here or on a Slurm cluster, and collect it into tables.

    python -m scripts.sweep --methods adnet qnet alpnet dspnet rpt gmrd --datasets CHAOST2 SABS CMR --settings 1 2 \\
        [--folds 0 1 2 3 4] [--label-groups 2,3 1,4] [--data-dir CHAOST2=../shared/data/CHAOST2 ...] \\
        [--shots 1 3] [--eval-datasets SABS] \\
        [--log-dir runs/sweep] [--executor local|slurm|submitit-local] [--dry-run] [--published] \\
        [--partition gpu --time 1440 --gpus-per-job 1 --array-parallelism 32 --sbatch account=lab] \\
        [Sacred updates for every run, e.g. train.n_steps=1000 protocol_qnet]

Each cell is `python training.py with <method> dataset=<name> data_dir=.. setting=.. eval_fold=..
test_labels=[..] log_dir=.. <updates>` and then `python validation.py with <the same>`. The plan
(printed first) says per cell what is left: done (an evaluation of its finished training exists,
both made with the cell's configuration), to evaluate, to resume (a killed training continues from
its resume point), to train, stale (its runs were made with another configuration: a new run is
trained), running (another process trains it now) or queued (its Slurm job is waiting). Before the
first cell starts, every data folder, pretrained-weights file and GPU the cells need is checked,
all problems in one error. Re-running the same command does only what is left, and ends with the tables: one per dataset and setting, printed and written
to <log-dir>/tables/<dataset>_setting<s>/ (as scripts.collect_results; --published puts the papers'
numbers beside them). --shots K... adds K-shot evaluations of each cell's training (evaluation.n_shot)
and --eval-datasets NAME... cross-domain evaluations (eval_dataset): cells of their own that share the
training; cross-domain tables are <TRAIN>-to-<EVAL>_setting<s>, K a column. See docs/sweep.md.

Executors: `local` runs the cells here, one process per visible GPU (CUDA_VISIBLE_DEVICES), or one
after the other on the CPU; `slurm` submits one job per cell as a job array and returns (re-run the
command to collect, or pass --wait); `submitit-local` runs the same jobs as local subprocesses.
Exit status 1 when a job failed (each is listed with its log's last error line).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

from launch.runners import (
    CellJob,
    SlurmOptions,
    import_submitit,
    make_executor,
    mark_queued,
    record_jobs,
    run_local,
    run_submitit_local,
    submit_slurm_array,
    visible_gpus,
    wait,
)
from launch.sweep import (
    DONE,
    RUNNING,
    Sweep,
    SweepError,
    check_before_start,
    check_sweep_updates,
    commands,
    format_plan,
    parse_label_group,
    plan_cells,
    plan_state,
)
from data.core.cli import add_logging_arguments, run_cli
from evaluation.leaderboard import build_table, published_beside, select, table_folder, write_report

log = logging.getLogger(__name__)
EXECUTORS = ("local", "slurm", "submitit-local")


def parse_data_dirs(words, datasets) -> dict:
    """`NAME=PATH` per dataset; a bare PATH when the sweep has one dataset."""
    dirs = {}
    for word in words or []:
        name, sep, path = word.partition("=")
        if not sep:
            if len(datasets) != 1:
                raise SweepError(f"--data-dir {word!r}: with several datasets write NAME=PATH for each, e.g. "
                                 f"--data-dir CHAOST2=../shared/data/CHAOST2 CMR=../shared/data/CMR")
            name, path = datasets[0], word
        if name.upper() not in {d.upper() for d in datasets}:
            raise SweepError(f"--data-dir {word!r}: {name} is not one of --datasets ({', '.join(datasets)})")
        dirs[name.upper()] = path
    return dirs


def collect_tables(sweep: Sweep, plans, published: bool = False) -> list[Path]:
    """One table per (dataset, setting) over the sweep's evaluations (with the papers' numbers beside
    them when `published`), printed and written under <log-dir>/tables/<dataset>_setting<s>/."""
    groups = defaultdict(list)
    for p in plans:
        if p.state == DONE:
            groups[(p.cell.dataset, p.cell.eval_dataset or "", p.cell.setting)].append(p.evaluation)
    written = []
    for _, runs in sorted(groups.items()):
        table = build_table(select(runs))
        out = Path(sweep.cwd) / sweep.log_dir / "tables" / table_folder(table)
        print(write_report(table, out, published_beside(table) if published else None))
        print(f"written: {out}/folds.csv, summary.csv, table.md, dice.png\n")
        written.append(out)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.sweep", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", required=True, help="configs/methods names, e.g. adnet qnet")
    parser.add_argument("--datasets", nargs="+", required=True, help="CHAOST2 SABS CMR (any case), SYNTH, or yours")
    parser.add_argument("--settings", nargs="+", type=int, default=[1], help="1 and/or 2 (default 1)")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="default 0 1 2 3 4")
    parser.add_argument("--label-groups", nargs="+", metavar="IDS",
                        help="test label groups, e.g. 2,3 1,4 (default: setting 1 every evaluated class, "
                             "setting 2 the dataset's groups)")
    parser.add_argument("--data-dir", nargs="+", metavar="NAME=PATH",
                        help="data folder per dataset, evaluated ones included (default ./data/<NAME>)")
    parser.add_argument("--shots", nargs="+", type=int, default=[1],
                        help="support scans K of the evaluations (evaluation.n_shot), e.g. 1 3 (default 1)")
    parser.add_argument("--eval-datasets", nargs="+", metavar="NAME",
                        help="also evaluate each training on these datasets (cross-domain; organs matched by name)")
    parser.add_argument("--log-dir", default="runs/sweep", help="log_dir of every run (default runs/sweep)")
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--gpus", nargs="+", help="local executor: GPUs to use (default: all visible)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--wait", action="store_true", help="slurm: wait for the jobs, then print the tables")
    parser.add_argument("--published", action="store_true",
                        help="put the published numbers beside ours in the tables (as collect_results --published)")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", type=int, default=24 * 60, help="minutes per job (default 1440); a job that "
                       "reaches it is requeued and resumes")
    slurm.add_argument("--gpus-per-job", type=int, default=1)
    slurm.add_argument("--cpus-per-job", type=int)
    slurm.add_argument("--mem-gb", type=float)
    slurm.add_argument("--array-parallelism", type=int, default=32, help="jobs of the array running at once")
    slurm.add_argument("--sbatch", nargs="+", default=[], metavar="KEY=VALUE",
                       help="extra sbatch options, e.g. account=lab qos=normal constraint=a100")
    slurm.add_argument("--setup", nargs="+", default=[], metavar="LINE",
                       help="shell lines run first in each job, e.g. 'module load cuda'")
    parser.add_argument("updates", nargs="*", help="Sacred updates for every run (train.n_steps=1000, "
                        "protocol_qnet), anywhere but right after --data-dir, --sbatch or --setup")
    add_logging_arguments(parser)
    return parser


# options whose values are KEY=VALUE words themselves: an update right after them needs `--` first
_KEY_VALUE_OPTIONS = ("--data-dir", "--sbatch", "--setup")


def split_updates(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate the Sacred updates (key=value, protocol_<name>) from the options, so that they can
    follow a list option (`--folds 0 1 train.n_steps=1000`); after `--` every word is an update."""
    options, updates, current = [], [], None
    for i, word in enumerate(argv):
        if word == "--":
            return options, updates + argv[i + 1:]
        if word.startswith("-"):
            current = word.split("=")[0]
            options.append(word)
        elif ("=" in word or word.startswith("protocol_")) and current not in _KEY_VALUE_OPTIONS:
            updates.append(word)
        else:
            options.append(word)
    return options, updates


def execute(args, sweep: Sweep, todo) -> list | None:
    """Run the cells of `todo` with the chosen executor; their outcomes, or None when they were
    submitted to Slurm without --wait."""
    jobs = [CellJob(sweep, p.cell) for p in todo]
    gpus = args.gpus if args.gpus is not None else visible_gpus()
    print(f"running {len(jobs)} cell(s) with the {args.executor} executor; logs in {sweep.sweep_dir / 'logs'}")
    if args.executor == "local":
        return run_local(jobs, gpus)
    for name in ("time", "gpus_per_job", "array_parallelism", "cpus_per_job"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus_per_job" else 1):
            raise SweepError(f"--{name.replace('_', '-')} {value}: give a positive number")
    options = SlurmOptions(args.partition, args.time, args.gpus_per_job, args.cpus_per_job, args.mem_gb,
                           args.array_parallelism, tuple(args.sbatch), tuple(args.setup))
    executor = make_executor(args.executor, sweep.sweep_dir / "submitit", options)
    if args.executor == "submitit-local":
        return run_submitit_local(jobs, executor, gpus)
    submitted = submit_slurm_array(jobs, executor)
    record_jobs(sweep, todo, submitted)
    print("submitted: " + " ".join(str(j.job_id) for j in submitted))
    if args.wait:
        return wait(jobs, submitted)
    print("re-run the same command when the jobs have ended: it resumes what was cut short and prints the tables")
    return None


def main(argv=None) -> int:
    options, updates = split_updates(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(options)
    args.updates = [*args.updates, *updates]

    def body() -> int:
        if args.executor != "local":
            import_submitit(args.executor)          # refused before planning when it is missing
        sweep = Sweep(args.log_dir, parse_data_dirs(args.data_dir, [*args.datasets, *(args.eval_datasets or [])]),
                      tuple(args.updates))
        groups = [parse_label_group(g) for g in args.label_groups] if args.label_groups else None
        cells = plan_cells(args.methods, args.datasets, args.settings, args.folds, groups, sweep.data_dirs,
                           args.shots, args.eval_datasets)
        check_sweep_updates(sweep, cells)
        plans = [plan_state(sweep, c) for c in cells]
        if args.executor == "slurm":
            plans = mark_queued(sweep, plans)
        print(format_plan(plans))
        todo = [p for p in plans if commands(sweep, p)]
        if args.dry_run:
            for p in todo[:1]:
                print("first command: " + " ".join(commands(sweep, p)[0][1:]))
            return 0
        if todo and args.executor != "slurm":       # a Slurm job runs elsewhere: its node checks its inputs
            check_before_start(sweep, todo, args.gpus, visible_gpus())
        failed = []
        if todo:
            outcomes = execute(args, sweep, todo)
            if outcomes is None:          # submitted to Slurm, not waited for
                return 0
            failed = [o for o in outcomes if not o.ok]
            plans = [plan_state(sweep, c) for c in cells]
        left = [p for p in plans if p.state != DONE]
        if left:
            print(f"{len(left)} cell(s) not done: " + ", ".join(f"{p.exp_name} ({p.state})" for p in left))
        collect_tables(sweep, plans, args.published)
        for o in failed:
            log.error("failed: %s", o.message)
        if any(p.state == RUNNING for p in plans):
            print("some cells are being trained by other processes: re-run the sweep when they have ended")
        return 1 if failed else 0

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
