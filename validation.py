"""Evaluate a trained model with the few-shot protocol on one fold (a Sacred experiment).

    python validation.py with adnet chaost2 setting=2 eval_fold=3       # last snapshot of that training
    python validation.py with qnet cmr evaluation.checkpoint=path/to/30000.pth protocol_qnet
    python validation.py with adnet evaluation.checkpoint=untrained      # the model before training
    python validation.py with adnet synth evaluation.n_shot=3           # 3-shot: three support scans
    python validation.py with adnet chaost2 eval_dataset=SABS           # cross-domain: trained on CHAOS-T2

Results (per-class and per-scan Dice/IoU as a table, results.csv, results.json, NIfTI predictions
in the scans' geometry, PNG overlays) go to <log_dir>/test/<exp_name>/<run id>/.
"""
from __future__ import annotations

import json
from pathlib import Path

from configs.experiment import make_experiment
from evaluation.protocol import support_scans
from models.engine.builders import check_run_inputs, fold_data
from models.engine.evaluation import evaluate, evaluated_experiment, load_evaluated_model
from models.engine.experiment import Experiment

ex = make_experiment("test", record="test")


# the model loaded by the pre-flight check, for the run it was checked for
_checked_model: dict = {}


@ex.config_hook
def _refuse_bad_inputs(config, command_name, logger):
    """The checkpoint (found, read safely, loaded into the model), every scan of the evaluated fold
    (read completely), the test classes in the evaluated dataset and the K support scans are checked
    here, before Sacred records the run, so a refused evaluation writes nothing."""
    if command_name == "main":
        exp = Experiment.from_config(json.loads(json.dumps(config)))
        evaluated = evaluated_experiment(exp)
        check_run_inputs(evaluated, "test")
        spec, _, fold = fold_data(evaluated)
        support_scans(fold, int(exp.evaluation.supp_idx), int(exp.evaluation.n_shot), spec.name)
        _checked_model["model"] = load_evaluated_model(exp)
    return {}


@ex.main
def main(_config, _run):
    exp = Experiment.from_config(json.loads(json.dumps(_config)))
    run_dir = Path(_run.observers[0].dir) if _run.observers else None
    model, checkpoint = _checked_model.pop("model", (None, "in-memory model"))
    result = evaluate(exp, run_dir, model=model, checkpoint=checkpoint)
    for c in result.class_ids():
        _run.log_scalar(f"dice.{result.class_scores(c)[0].class_name}", result.class_mean(c))
    _run.log_scalar("dice.mean", result.mean())
    return {"mean_dice": result.mean()}


if __name__ == "__main__":
    ex.run_commandline()
