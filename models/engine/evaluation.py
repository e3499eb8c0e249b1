"""Evaluate a trained (or untrained) model on one fold with the protocol, and write the reports.

`Evaluator` runs a model through the protocol's rules (evaluation/protocol.py) on the
predictor (models/engine/predictor.py): the support scans' slices are encoded once for all
classes, each query scan's slices once for all its classes, and each query's chunks are segmented
with their support slices (one per support scan: K shots). `evaluate` is the experiment: model,
fold of the evaluated dataset (`eval_dataset`: the training dataset, or another one, cross-domain),
reports.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.core.io import DataError
from data.core.specs import DatasetSpec, Fold, load_spec
from data.core.run_folder import TEST, RunFolder
from evaluation.protocol import (
    EvaluationResult,
    ProtocolOptions,
    QueryPlan,
    ScanScore,
    count_overlap,
    match_classes,
    plan_query,
    scored_slices,
    support_scans,
    support_slices,
)
from evaluation.surface import scored_surface_distances
from evaluation.reporting import (
    format_patient_table,
    format_surface_table,
    format_table,
    write_overlays,
    write_predictions,
    write_results,
)
from dataloaders.volumes import Scan, VolumeStore
from models.engine.builders import (
    autocast_dtype,
    build_model,
    dataset_spec,
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


def _support_images(scans: list[Scan]) -> list[ScanImage]:
    return [_support_image(scan) for scan in scans]


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
        self.support_ids = support_scans(fold, options.supp_idx, options.n_shot, spec.name)

    def _support_labelled(self, scan_id: int, class_id: int) -> np.ndarray:
        labelled = self.store.scan(scan_id).slices_with(class_id)
        if len(labelled) == 0:
            which = ("support scan" if scan_id == self.support_id
                     else f"support scan {self.support_ids.index(scan_id) + 1} of evaluation.n_shot={len(self.support_ids)},")
            raise DataError(f"{which} {scan_id} of fold {self.fold.index} contains no "
                            f"{self.spec.label_name(class_id)} (class {class_id}); choose another "
                            f"support with evaluation.supp_idx{' or fewer shots' if len(self.support_ids) > 1 else ''} "
                            f"or drop the class from test_labels")
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

    @staticmethod
    def _chunk_supports(supports: list[Scan], class_id: int, shot_zs: list[list[int]],
                        plan: QueryPlan) -> tuple[list[list[int]], np.ndarray]:
        """The support slices and masks of the plan's chunks: (zs P x S, masks P x S x H x W bool).
        shot_zs[s][part]: the support slice of each part in support scan s."""
        zs = [[shot_zs[s][part] for s in range(len(supports))] for part in plan.parts]          # P x S
        masks = np.stack([np.stack([scan.label[z] == class_id for scan, z in zip(supports, part_zs)])
                          for part_zs in zs])                                                   # P x S x H x W
        return zs, masks

    def _predict_volume(self, supports: list[Scan], chunk_supports: tuple[list[list[int]], np.ndarray],
                        query: Scan, plan: QueryPlan) -> np.ndarray:
        """The query's prediction of one class: Z x H x W uint8, 1 where a scored slice is predicted
        foreground, 0 elsewhere (slices outside the plan are never predicted). chunk_supports: the
        plan's support slices and masks (`_chunk_supports`)."""
        zs, masks = chunk_supports
        log_probs = self.predictor.predict_chunks_shots(_support_images(supports), zs, masks,
                                                        _query_image(query), plan.chunks)
        volume = np.zeros(query.image.shape, dtype=np.uint8)
        for chunk, chunk_log_probs in zip(plan.chunks, log_probs):
            volume[chunk] = foreground_mask(chunk_log_probs).cpu().numpy()
        return volume

    def run(self, class_ids) -> EvaluationResult:
        start = time.perf_counter()
        self.model.eval()
        result = EvaluationResult(self.spec.name, self.fold.index, self.support_id, self.query_ids,
                                  support_ids=self.support_ids)
        supports = [self.store.scan(i) for i in self.support_ids]
        for c in class_ids:
            result.shot_slices[c] = [support_slices(self._support_labelled(i, c), self.options.n_part)
                                     for i in self.support_ids]
            result.support_slices[c] = result.shot_slices[c][0]
        # the classes share the support scans: each one's slices of every class in one pass
        for s, scan in enumerate(supports):
            self.predictor.warm(_support_image(scan), [z for shots in result.shot_slices.values() for z in shots[s]])
        bar = tqdm(self.query_ids, desc=f"fold {self.fold.index} queries", disable=not self.progress,
                   unit="scan")
        scored = {}                                     # (scan, class) -> its scored slices
        for scan_id in bar:
            scan = self.store.scan(scan_id)
            plans = self._query_plans(scan, class_ids)
            if not plans:
                continue
            # every slice scored for any class, encoded once for all of them, with the maps the head
            # reads for any class's support masks (GMRD: layer3 alone unless a support mask is empty)
            chunk_supports = {c: self._chunk_supports(supports, c, result.shot_slices[c], plan)
                              for c, plan in plans.items()}
            maps = self.predictor.query_maps(*[masks for _, masks in chunk_supports.values()])
            self.predictor.warm(_query_image(scan), np.concatenate([p.scored for p in plans.values()]), maps)
            for c, plan in plans.items():
                pred_volume = self._predict_volume(supports, chunk_supports[c], scan, plan)
                tp, fp, fn = count_overlap(pred_volume[plan.scored], scan.label[plan.scored] == c)
                result.scores.append(ScanScore(c, self.spec.label_name(c), scan_id, tp, fp, fn, len(plan.scored)))
                result.predictions[(scan_id, c)] = pred_volume
                scored[(scan_id, c)] = plan.scored
                result.n_query_slices += len(plan.scored)
            self.predictor.forget(_query_image(scan).key)
        result.seconds = time.perf_counter() - start
        self._add_surface_distances(result, scored)
        return result

    def _add_surface_distances(self, result: EvaluationResult, scored: dict) -> None:
        """HD95 and ASSD of every scored (query scan, class) on its scored slices, in mm of the scan's grid;
        after the timed prediction, so that result.seconds stays the model's throughput."""
        start = time.perf_counter()
        for s in result.scores:
            scan = self.store.scan(s.scan_id)
            distances = scored_surface_distances(result.predictions[(s.scan_id, s.class_id)], scan.label == s.class_id,
                                                 scored[(s.scan_id, s.class_id)], scan.geometry.spacing)
            s.hd95_mm, s.assd_mm = distances.hd95_mm, distances.assd_mm
        log.info("HD95 and ASSD of %d query scans and classes in %.1f s", len(result.scores),
                 time.perf_counter() - start)


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


def is_cross_domain(exp: Experiment) -> bool:
    """Whether the experiment evaluates another dataset than the one it trains on."""
    return str(exp.eval_dataset).upper() != str(exp.dataset).upper()


def evaluated_experiment(exp: Experiment) -> Experiment:
    """The experiment as its evaluation reads data: the evaluated dataset (`eval_dataset`, read from
    `eval_data_dir`, normalised by data.normalize with its own statistics) and the test classes as its
    label ids, matched by organ name. In-domain: `exp` itself. A class the evaluated dataset lacks is
    a ConfigError naming it."""
    if not is_cross_domain(exp):
        return exp
    train_spec = dataset_spec(exp)
    eval_spec = load_spec(exp.eval_dataset, exp.eval_data_dir)
    matched = match_classes(train_spec, eval_spec, exp.test_labels)
    return dataclasses.replace(exp, dataset=eval_spec.name, data_dir=exp.eval_data_dir,
                               test_labels=[matched[int(c)] for c in exp.test_labels])


def evaluation_options(exp: Experiment, device: torch.device) -> ProtocolOptions:
    """The protocol's options of the experiment's evaluation section, K shots included."""
    return dataclasses.replace(protocol_options(exp.evaluation, device), n_shot=int(exp.evaluation.n_shot))


def evaluate(cfg: Experiment | dict, run_dir: Path | None, progress: bool = True, model=None,
             checkpoint: str = "in-memory model") -> EvaluationResult:
    """Run the protocol on fold `eval_fold` of the evaluated dataset (`eval_dataset`: the training
    dataset, or another one); write results, predictions and overlays into run_dir.

    `cfg`: an Experiment, or a config dict (converted here); `model`: the model to evaluate (its
    source named by `checkpoint`); None loads it from the config."""
    exp = as_experiment(cfg)
    device = resolve_device(exp.device)
    evaluated = evaluated_experiment(exp)
    spec, store, fold = fold_data(evaluated)
    options = evaluation_options(exp, device)
    classes = spec.check_label_ids(evaluated.test_labels, "test_labels")
    if model is None:
        model, checkpoint = load_evaluated_model(exp)
    model = model.to(device)
    model.set_channels_last(use_channels_last(exp.train.channels_last, device))
    evaluator = Evaluator(model, store, spec, fold, options, device=device,
                          autocast_dtype=autocast_dtype(exp.evaluation.amp, device, "evaluation.amp"), progress=progress)
    log.info("evaluating %s on %s fold %d: support scan(s) %s, queries %s, classes %s", checkpoint, spec.name,
             fold.index, list(evaluator.support_ids), list(evaluator.query_ids), list(classes))
    seed_everything(int(exp.seed))
    result = evaluator.run(classes)
    shots = "" if options.n_shot == 1 else f", {options.n_shot}-shot"
    domain = f"{exp.dataset} -> {spec.name}" if is_cross_domain(exp) else spec.name
    supports = ", ".join(map(str, result.support_ids))
    title = (f"{exp.method} on {domain}, setting {exp.setting}, fold {fold.index}{shots} "
             f"(support scan{'s' if len(result.support_ids) > 1 else ''} {supports}; checkpoint: {checkpoint})")
    print(format_table(result, title))
    print(format_patient_table(result))
    print(format_surface_table(result))
    print(f"{result.n_query_slices} query slices in {result.seconds:.1f} s "
          f"({result.n_query_slices / max(result.seconds, 1e-9):.2f} slices/s)")
    if run_dir is not None:
        run_dir = Path(run_dir)
        write_provenance(run_dir, exp.to_config(), device, TEST, checkpoint=checkpoint)
        write_results(result, run_dir, extra={"checkpoint": checkpoint, "method": exp.method,
                                              "setting": exp.setting, "exp_name": exp.exp_name,
                                              "train_dataset": exp.dataset, "eval_dataset": spec.name,
                                              "n_shot": options.n_shot, "support_scans": list(result.support_ids),
                                              "support_slices_per_scan": {
                                                  spec.label_name(c): {str(i): zs for i, zs in zip(result.support_ids, shots)}
                                                  for c, shots in result.shot_slices.items()},
                                              "protocol": exp.evaluation.to_config()})
        if exp.evaluation.save_predictions:
            write_predictions(result, store, RunFolder(run_dir).predictions_dir)
        if int(exp.evaluation.n_overlays) > 0:
            write_overlays(result, store, RunFolder(run_dir).overlays_dir, int(exp.evaluation.n_overlays))
    return result
