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
from models.engine.experiment import Experiment
from data.core.run_folder import TRAIN, RunFolder
from models.engine.runs import write_provenance
from models.engine.trainer import check_resume, train

ex = make_experiment("train", record=TRAIN)

# the resume point read by the pre-flight check, for the run it was checked for (read once)
_checked_resume: dict = {}


@ex.config_hook
def _refuse_unresumable_run(config, command_name, logger):
    """A run that cannot work is refused here, before Sacred writes anything: a resume that cannot
    continue (folder or resume point missing or unreadable, configuration changed, another process
    training into the folder), and training data that cannot be read completely. So a refused
    resume leaves the run as it was, and a refused new run leaves no run folder."""
    if command_name != "main" or int(os.environ.get("RANK", "0")) != 0:
        return {}
    exp = Experiment.from_config(json.loads(json.dumps(config)))
    resume = exp.train.resume
    if resume:
        if not Path(resume).is_dir():
            check_resume(exp)                   # names the missing folder
        RunFolder(resume).lock(create_file=False)   # first: the resume point read next is the one continued
        _checked_resume["state"] = check_resume(exp)
    check_run_inputs(exp, "train")
    return {}


@ex.main
def main(_config, _run):
    exp = Experiment.from_config(json.loads(json.dumps(_config)))
    if _run.observers:
        run = RunFolder(_run.observers[0].dir)
        run.lock()
        write_provenance(run.path, exp.to_config(), resolve_device(exp.device), TRAIN)
    else:   # torchrun ranks > 0 record nothing; they only read the resume point
        run = RunFolder(exp.train.resume or Path(exp.log_dir) / "unobserved")
    try:
        final = train(exp, run.path, log_scalar=_run.log_scalar, resume_state=_checked_resume.pop("state", None))
    finally:
        run.unlock()
    if _run.observers:
        print(f"final snapshot: {final}")
    return str(final)


if __name__ == "__main__":
    ex.run_commandline()
