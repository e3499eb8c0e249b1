"""Train a few-shot segmentation method (a Sacred experiment).

    python training.py with adnet chaost2 setting=2 eval_fold=3
    python training.py print_config with qnet cmr          # every key, with this run's values
    python training.py with my_experiment.yaml train.n_steps=1000
    python training.py with adnet chaost2 train.resume=runs/train/<exp_name>/<run id>

Runs are recorded under <log_dir>/train/<exp_name>/<run id>/ (config, metrics, console output and
snapshots/<episodes>.pth). See README.md for every configuration key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from configs.experiment import make_experiment
from models.engine.builders import check_run_inputs, resolve_device
from models.engine.runs import lock_run, unlock_run, write_provenance
from models.engine.trainer import check_resume, train

ex = make_experiment("train", record="train")


@ex.config_hook
def _refuse_unresumable_run(config, command_name, logger):
    """A run that cannot work is refused here, before Sacred writes anything: a resume that cannot
    continue (folder or resume point missing or unreadable, configuration changed, another process
    training into the folder), and training data that cannot be read completely. So a refused
    resume leaves the run as it was, and a refused new run leaves no run folder."""
    if command_name != "main" or int(os.environ.get("RANK", "0")) != 0:
        return {}
    cfg = json.loads(json.dumps(config))
    resume = cfg["train"].get("resume")
    if resume:
        check_resume(cfg)
    check_run_inputs(cfg, "train")
    if resume:
        lock_run(resume)
    return {}


@ex.main
def main(_config, _run):
    cfg = json.loads(json.dumps(_config))
    if _run.observers:
        run_dir = Path(_run.observers[0].dir)
        lock_run(run_dir)
        write_provenance(run_dir, cfg, resolve_device(cfg["device"]))
    else:   # torchrun ranks > 0 record nothing; they only read the resume point
        run_dir = Path(cfg["train"]["resume"] or Path(cfg["log_dir"]) / "unobserved")
    try:
        final = train(cfg, run_dir, log_scalar=_run.log_scalar)
    finally:
        unlock_run(run_dir)
    if _run.observers:
        print(f"final snapshot: {final}")
    return str(final)


if __name__ == "__main__":
    ex.run_commandline()
