"""Collect the five-fold evaluation runs of one dataset and setting into tables like the papers'.

    python -m scripts.collect_results runs/test [--method adnet qnet] [--dataset CHAOST2] [--setting 1]
                                      [--eval-dataset SABS]
                                      [--out results/CHAOST2_setting1] [--published] [--surface]

Every evaluation run folder (results.json + config.json, written by validation.py) under the given
paths is considered. For each method, label group (setting 2 trains one model per group) and fold,
the newest run (highest run id) is used; the table says which checkpoint each fold evaluated. Runs of
one cell made with different configurations (another fingerprint: a key that decides the numbers
differs) are never mixed: the newest is used, and a warning names the runs passed over.
Per organ and fold, the Dice is the fold's mean over its query scans; the table gives the mean and
standard deviation over folds, and the overall mean is the mean over organs (as the papers do).

The command refuses to mix runs of different datasets, settings or evaluation protocols (folds,
support choice, chunking, scored slices), and says which folds are missing. Cross-domain runs
(trained on one dataset, evaluated on another: `eval_dataset`) make their own table, "CHAOST2 -> SABS"
(folder CHAOST2-to-SABS_setting1), selected with --eval-dataset. Runs with K support scans
(evaluation.n_shot) are rows of their own ("adnet, 3-shot") with a K column; a method and fold evaluated
with label groups that give the same organ (test_labels [1, 2, 3, 4] and [1]) give one row per group,
never merged.

Outputs in --out: folds.csv (method, organ, fold, dice, checkpoint), summary.csv, table.md (organs
as columns, one row per method) and dice.png (a bar chart with the fold std as error bars).

--published puts the papers' numbers beside ours: after each organ (and the mean) a "pub." column with
the primary published entry of that method, dataset and setting, a row for every method that has
published numbers but no run here, the source and status of each, and below the table every published
entry for this dataset and setting (other papers' listings, DSPNet's re-runs, users' reproductions).
The numbers come from evaluation/published_results.csv, which names each one's source.

--surface adds the HD95 and ASSD tables (mm, mean ± std over folds of each fold's mean over its query scans,
evaluation/surface.py) to table.md and the printout, and writes surface.csv (per method, organ and fold).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data.core.cli import add_logging_arguments, run_cli
from evaluation.leaderboard import build_table, find_runs, published_beside, select, table_folder, write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="evaluation run folders, or folders to search (e.g. runs/test)")
    parser.add_argument("--method", nargs="*", help="only these methods")
    parser.add_argument("--dataset", help="only this dataset")
    parser.add_argument("--setting", type=int, choices=(1, 2), help="only this setting")
    parser.add_argument("--eval-dataset", help="only runs evaluated on this dataset (cross-domain: eval_dataset)")
    parser.add_argument("--out", type=Path, help="output folder (default: results/<dataset>_setting<s>)")
    parser.add_argument("--published", action="store_true",
                        help="add the published numbers of every method beside ours (with their sources)")
    parser.add_argument("--surface", action="store_true",
                        help="also table HD95 and ASSD (mm) and write surface.csv")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        table = build_table(select(find_runs(args.paths), args.method, args.dataset, args.setting,
                                   args.eval_dataset))
        out = args.out or Path("results") / table_folder(table)
        print(write_report(table, out, published_beside(table) if args.published else None, args.surface))
        print(f"written: {out}/folds.csv, summary.csv, table.md, dice.png" + (", surface.csv" if args.surface else ""))
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
