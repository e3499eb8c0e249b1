"""Evaluate a trained (or untrained) model on one fold with the protocol, and write the reports."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from dataloaders.protocol import EvaluationResult, Evaluator
from dataloaders.reporting import format_patient_table, format_table, write_overlays, write_predictions, \
    write_results
from models.builders import (
    autocast_dtype, build_model, fold_data, protocol_options, resolve_device, use_channels_last,
)
from configs.runs import write_provenance
from models.checkpoints import find_checkpoint, load_checkpoint

log = logging.getLogger(__name__)
UNTRAINED = "untrained"


def resolve_checkpoint(cfg: dict) -> str:
    """The checkpoint to evaluate: the configured path, 'untrained', or the last snapshot of the
    newest training run of the same experiment (models/checkpoints.find_checkpoint)."""
    ckpt = cfg["evaluation"]["checkpoint"]
    if ckpt in (None, "", "null"):
        return str(find_checkpoint(cfg["log_dir"], cfg["exp_name"]))
    return str(ckpt)


def load_evaluated_model(cfg: dict) -> tuple[torch.nn.Module, str]:
    """The model to evaluate and where it came from: the checkpoint found by `resolve_checkpoint`,
    read safely and loaded strictly, or the untrained model with its pretrained encoder weights.
    validation.py calls this before Sacred records the run, so a missing, unfinished, truncated,
    unsafe or misfitting checkpoint is refused with nothing written."""
    checkpoint = resolve_checkpoint(cfg)
    model = build_model(cfg, load_weights=checkpoint == UNTRAINED)
    if checkpoint != UNTRAINED:
        load_checkpoint(model, checkpoint)
    return model, checkpoint


def evaluate(cfg: dict, run_dir: Path | None, progress: bool = True, model=None,
             checkpoint: str = "in-memory model") -> EvaluationResult:
    """Run the protocol on fold `eval_fold`; write results, predictions and overlays into run_dir.

    `model`: the model to evaluate (its source named by `checkpoint`); None loads it from the config."""
    device = resolve_device(cfg["device"])
    spec, store, fold = fold_data(cfg)
    options = protocol_options(cfg, device)
    classes = spec.check_label_ids(cfg["test_labels"], "test_labels")
    if model is None:
        model, checkpoint = load_evaluated_model(cfg)
    model = model.to(device)
    model.set_channels_last(use_channels_last(cfg["train"]["channels_last"], device))
    evaluator = Evaluator(model, store, spec, fold, options, device=device,
                          autocast_dtype=autocast_dtype(cfg["evaluation"]["amp"], device, "evaluation.amp"), progress=progress)
    log.info("evaluating %s on %s fold %d: support scan %d, queries %s, classes %s", checkpoint, spec.name,
             fold.index, evaluator.support_id, list(evaluator.query_ids), list(classes))
    result = evaluator.run(classes)
    title = (f"{cfg['method']} on {spec.name}, setting {cfg['setting']}, fold {fold.index} "
             f"(support scan {result.support_id}; checkpoint: {checkpoint})")
    print(format_table(result, title))
    print(format_patient_table(result))
    print(f"{result.n_query_slices} query slices in {result.seconds:.1f} s "
          f"({result.n_query_slices / max(result.seconds, 1e-9):.2f} slices/s)")
    if run_dir is not None:
        run_dir = Path(run_dir)
        write_provenance(run_dir, cfg, device, checkpoint=checkpoint)
        write_results(result, run_dir, extra={"checkpoint": checkpoint, "method": cfg["method"],
                                              "setting": cfg["setting"], "exp_name": cfg["exp_name"],
                                              "protocol": dict(cfg["evaluation"])})
        if cfg["evaluation"]["save_predictions"]:
            write_predictions(result, store, run_dir / "predictions")
        if int(cfg["evaluation"]["n_overlays"]) > 0:
            write_overlays(result, store, run_dir / "overlays", int(cfg["evaluation"]["n_overlays"]))
    return result
