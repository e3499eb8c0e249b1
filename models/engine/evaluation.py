"""Evaluate a trained (or untrained) model on one fold with the protocol, and write the reports.

`Evaluator` runs a model through the protocol's rules (evaluation/protocol.py) on the
predictor (models/engine/predictor.py): the support scan's slices are encoded once for all
classes, each query scan's slices once for all its classes, and each query's chunks are segmented
with their support slices. `evaluate` is the experiment: model, fold, reports.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.core.io import DataError
from data.core.specs import DatasetSpec, Fold
from data.core.run_folder import TEST, RunFolder
from evaluation.protocol import (
    EvaluationResult,
    ProtocolOptions,
    QueryPlan,
    ScanScore,
    count_overlap,
    plan_query,
    scored_slices,
    support_slices,
)
from evaluation.reporting import (
    format_patient_table,
    format_table,
    write_overlays,
    write_predictions,
    write_results,
)
from dataloaders.volumes import Scan, VolumeStore
from models.engine.builders import (
    autocast_dtype,
    build_model,
    fold_data,
    protocol_options,
    resolve_device,
    seed_everything,
    use_channels_last,
)
from models.engine.checkpoints import find_checkpoint, open_trained_model
from models.engine.experiment import Experiment, as_experiment
from models.engine.predictor import Predictor, ScanImage, foreground_mask
from models.engine.runs import write_provenance

log = logging.getLogger(__name__)
UNTRAINED = "untrained"


def _support_image(scan: Scan) -> ScanImage:
    return ScanImage(("support", scan.scan_id), scan.image)


def _query_image(scan: Scan) -> ScanImage:
    return ScanImage(("query", scan.scan_id), scan.image)


class Evaluator:
    """Runs a few-shot model through the protocol on one fold.

    The model needs `encode` and `segment` as models/engine/predictor.py describes (models/fewshot.py);
    `options.batch_size` and `options.cache_features` configure the predictor, `autocast_dtype` its
    encoder precision (None: float32, as the references)."""

    def __init__(self, model, store: VolumeStore, spec: DatasetSpec, fold: Fold, options: ProtocolOptions,
                 device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                 progress: bool = True):
        self.model = model
        self.store = store
        self.spec = spec
        self.fold = fold
        self.options = options
        self.progress = progress
        self.predictor = Predictor(model, device, options.batch_size, autocast_dtype, options.cache_features)
        self.support_id, self.query_ids = fold.support_and_queries(options.supp_idx)

    def _support_labelled(self, class_id: int) -> np.ndarray:
        labelled = self.store.scan(self.support_id).slices_with(class_id)
        if len(labelled) == 0:
            raise DataError(f"support scan {self.support_id} of fold {self.fold.index} contains no "
                            f"{self.spec.label_name(class_id)} (class {class_id}); choose another "
                            f"support with evaluation.supp_idx or drop the class from test_labels")
        return labelled

    def _query_plans(self, scan: Scan, class_ids) -> dict[int, QueryPlan]:
        """class -> the protocol's plan for this query scan; a class absent from the scan is not scored."""
        plans = {}
        for c in class_ids:
            labelled = scan.slices_with(c)
            if len(labelled) == 0:
                log.warning("query scan %d has no %s; it is not scored for this class",
                            scan.scan_id, self.spec.label_name(c))
                continue
            plans[c] = plan_query(scored_slices(labelled, self.options.scored), self.options.n_part,
                                  self.options.chunking)
        return plans

    def _predict_volume(self, support: Scan, class_id: int, support_zs: list[int], query: Scan,
                        plan: QueryPlan) -> np.ndarray:
        """The query's prediction of one class: Z x H x W uint8, 1 where a scored slice is predicted
        foreground, 0 elsewhere (slices outside the plan are never predicted)."""
        zs = [support_zs[part] for part in plan.parts]
        log_probs = self.predictor.predict_chunks(_support_image(support), zs, support.label[zs] == class_id,
                                                  _query_image(query), plan.chunks)
        volume = np.zeros(query.image.shape, dtype=np.uint8)
        for chunk, chunk_log_probs in zip(plan.chunks, log_probs):
            volume[chunk] = foreground_mask(chunk_log_probs).cpu().numpy()
        return volume

    def run(self, class_ids) -> EvaluationResult:
        start = time.perf_counter()
        self.model.eval()
        result = EvaluationResult(self.spec.name, self.fold.index, self.support_id, self.query_ids)
        support = self.store.scan(self.support_id)
        for c in class_ids:
            result.support_slices[c] = support_slices(self._support_labelled(c), self.options.n_part)
        # the classes share the one support scan: its slices of every class in one pass
        self.predictor.warm(_support_image(support), [z for zs in result.support_slices.values() for z in zs])
        bar = tqdm(self.query_ids, desc=f"fold {self.fold.index} queries", disable=not self.progress,
                   unit="scan")
        for scan_id in bar:
            scan = self.store.scan(scan_id)
            plans = self._query_plans(scan, class_ids)
            if not plans:
                continue
            # every slice scored for any class, encoded once for all of them
            self.predictor.warm(_query_image(scan), np.concatenate([p.scored for p in plans.values()]))
            for c, plan in plans.items():
                pred_volume = self._predict_volume(support, c, result.support_slices[c], scan, plan)
                tp, fp, fn = count_overlap(pred_volume[plan.scored], scan.label[plan.scored] == c)
                result.scores.append(ScanScore(c, self.spec.label_name(c), scan_id, tp, fp, fn, len(plan.scored)))
                result.predictions[(scan_id, c)] = pred_volume
                result.n_query_slices += len(plan.scored)
            self.predictor.forget(_query_image(scan).key)
        result.seconds = time.perf_counter() - start
        return result


def resolve_checkpoint(exp: Experiment) -> str:
    """The checkpoint to evaluate: the configured path, 'untrained', or the last snapshot of the
    newest training run of the same experiment (models/engine/checkpoints.find_checkpoint)."""
    ckpt = exp.evaluation.checkpoint
    if ckpt in (None, "", "null"):
        return str(find_checkpoint(exp.log_dir, exp.exp_name, exp.to_config()))
    return str(ckpt)


def load_evaluated_model(exp: Experiment) -> tuple[torch.nn.Module, str]:
    """The model to evaluate and where it came from: the checkpoint found by `resolve_checkpoint`,
    read safely and loaded strictly, or the untrained model with its pretrained encoder weights.
    validation.py calls this before Sacred records the run, so a missing, unfinished, truncated,
    unsafe or misfitting checkpoint is refused with nothing written."""
    checkpoint = resolve_checkpoint(exp)
    if checkpoint == UNTRAINED:
        return build_model(exp.encoder, exp.head, load_weights=True), checkpoint
    return open_trained_model(checkpoint, exp)[0], checkpoint


def evaluate(cfg: Experiment | dict, run_dir: Path | None, progress: bool = True, model=None,
             checkpoint: str = "in-memory model") -> EvaluationResult:
    """Run the protocol on fold `eval_fold`; write results, predictions and overlays into run_dir.

    `cfg`: an Experiment, or a config dict (converted here); `model`: the model to evaluate (its
    source named by `checkpoint`); None loads it from the config."""
    exp = as_experiment(cfg)
    device = resolve_device(exp.device)
    spec, store, fold = fold_data(exp)
    options = protocol_options(exp.evaluation, device)
    classes = spec.check_label_ids(exp.test_labels, "test_labels")
    if model is None:
        model, checkpoint = load_evaluated_model(exp)
    model = model.to(device)
    model.set_channels_last(use_channels_last(exp.train.channels_last, device))
    evaluator = Evaluator(model, store, spec, fold, options, device=device,
                          autocast_dtype=autocast_dtype(exp.evaluation.amp, device, "evaluation.amp"), progress=progress)
    log.info("evaluating %s on %s fold %d: support scan %d, queries %s, classes %s", checkpoint, spec.name,
             fold.index, evaluator.support_id, list(evaluator.query_ids), list(classes))
    seed_everything(int(exp.seed))
    result = evaluator.run(classes)
    title = (f"{exp.method} on {spec.name}, setting {exp.setting}, fold {fold.index} "
             f"(support scan {result.support_id}; checkpoint: {checkpoint})")
    print(format_table(result, title))
    print(format_patient_table(result))
    print(f"{result.n_query_slices} query slices in {result.seconds:.1f} s "
          f"({result.n_query_slices / max(result.seconds, 1e-9):.2f} slices/s)")
    if run_dir is not None:
        run_dir = Path(run_dir)
        write_provenance(run_dir, exp.to_config(), device, TEST, checkpoint=checkpoint)
        write_results(result, run_dir, extra={"checkpoint": checkpoint, "method": exp.method,
                                              "setting": exp.setting, "exp_name": exp.exp_name,
                                              "protocol": exp.evaluation.to_config()})
        if exp.evaluation.save_predictions:
            write_predictions(result, store, RunFolder(run_dir).predictions_dir)
        if int(exp.evaluation.n_overlays) > 0:
            write_overlays(result, store, RunFolder(run_dir).overlays_dir, int(exp.evaluation.n_overlays))
    return result
