"""Draw a training run's curves (losses and learning rate against episodes) as PNG.

    python -m scripts.plot_curves runs/train/<exp>/<id> [--out curves.png]

Training writes <run>/curves.png itself at the end; this redraws it from the run's recorded metrics at any time,
for example while the run is still going.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data.core.cli import add_logging_arguments, run_cli
from data.core.errors import DataError
from data.core.run_folder import RunFolder
from evaluation.reporting import curves_from_metrics, write_training_curves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: <run_dir>/curves.png)")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        run = RunFolder(args.run_dir)
        if not run.metrics_file.is_file():
            raise DataError(f"{run.metrics_file} not found: not a training run folder, or no metrics "
                            f"logged yet (they are written every train.print_every episodes)")
        path = write_training_curves(curves_from_metrics(run.path), args.out or run.curves_file,
                                     title=run.path.parent.name)
        if path is None:
            raise DataError(f"{run.metrics_file} holds no loss metrics yet")
        print(path)
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
