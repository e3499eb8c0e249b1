"""Train a few-shot segmentation method (a Sacred experiment).

    python training.py with adnet chaost2 setting=2 eval_fold=3
    python training.py print_config with qnet cmr          # every key, with this run's values
    python training.py with my_experiment.yaml train.n_steps=1000

Runs are recorded under <log_dir>/train/<exp_name>/<run id>/ (config, metrics, console output and
snapshots/<episodes>.pth). See README.md for every configuration key.
"""
from __future__ import annotations

import json
from pathlib import Path

from configs.experiment import make_experiment

ex = make_experiment("train", record="train")


@ex.main
def main(_config, _run):
    from configs.runs import write_provenance
    from models.builders import resolve_device
    from models.trainer import train
    cfg = json.loads(json.dumps(_config))
    if _run.observers:
        run_dir = Path(_run.observers[0].dir)
        write_provenance(run_dir, cfg, resolve_device(cfg["device"]))
    else:   # torchrun ranks > 0 record nothing; they only read the resume point
        run_dir = Path(cfg["train"]["resume"] or Path(cfg["log_dir"]) / "unobserved")
    final = train(cfg, run_dir, log_scalar=_run.log_scalar)
    if _run.observers:
        print(f"final snapshot: {final}")
    return str(final)


if __name__ == "__main__":
    ex.run_commandline()
