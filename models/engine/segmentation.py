"""One-shot segmentation of new scans: one annotated support scan, any number of query scans
(the library behind scripts/segment.py).

What it does, per query:

1. **Model and training data.** The snapshot (written by training.py) holds the model weights and
   the full experiment config: method, encoder, head, evaluation protocol and the training
   dataset. The dataset's spec gives the label table and its `preprocessing` block (orientation,
   grid, intensity; configs/datasets/*.yaml or the dataset.json of a dataset of your own). A
   dataset of your own is read from the config's `data_dir`/dataset.json; when that folder is
   gone, pass a copy of its dataset.json with `--dataset-json`.
2. **Preparation.** Support and queries (3-D, any orientation and spacing) are prepared exactly as
   the training scans were (`prepare_scan` of the data pipeline: orientation, intensity rule,
   resampling in world coordinates, centre crop/pad), then z-scored as the loaders do (per
   volume, or with the training scans' mean and std for a model trained with
   data.normalize=dataset). Labels follow the per-class linear > 0.5 rule of the pipelines. For a
   dataset whose pipeline keeps each scan's axes (orientation null: CMR, SABS), the queries are
   reoriented to the support's orientation code (a permutation/flip only), so support and query
   slices are cut the same way.
3. **Protocol** (evaluation/protocol.py, the evaluation's own functions): the support slices are
   those at the 1/6, 1/2, 5/6 points of the support organ's slices (`--n-part`, default the
   config's evaluation.n_part); the query's organ extent is cut into as many chunks
   (evaluation.chunking, `plan_query`), chunk i segmented with support slice i. The extent is:
   - with `--query-label`: the slices holding the class (evaluation.scored), as in evaluation;
   - without: **estimated**. A first pass segments every query slice with the middle support
     slice; the extent is the run of consecutive slices, around the slice with the largest
     predicted area, whose predicted area is at least `--extent-fraction` (default 0.1) of that
     largest area. Limits: it relies on the first pass finding the organ at all (nothing predicted
     -> an empty mask and a warning); a false positive larger than the organ moves the extent to
     it; a slice where the first pass misses the organ in its middle cuts the extent there.
   Slices outside the extent are background.
4. **Back to the query's own grid.** The foreground probability on the prepared grid is resampled
   onto the query's original grid (same shape, spacing, origin, direction) by linear interpolation
   in world coordinates and thresholded at 0.5. For a 0/1 prediction this is the per-class
   linear > 0.5 rule the pipelines use for labels; nearest neighbour would move boundaries by up
   to half a prepared voxel.
5. **Outputs** in OUT_DIR: `<query>_<CLASS>.nii.gz` (uint8: the class id inside the organ, 0
   elsewhere, as validation.py's predictions; uint16 for ids above 255) in the query's geometry,
   `<query>_<CLASS>.png` (slices cut as the training scans were, shown anterior up with the
   patient's right on the left; the prediction a translucent red fill with its outline and, when
   given, the label a green outline; titled with class, query, slice, volume and, with a query
   label, the Dice), and `volumes_<CLASS>.csv`; the table printed at the end lists
   each query's organ volume in ml (voxels x voxel volume of the original grid / 1000) and, with a
   query label, its Dice, HD95 and ASSD (mm; evaluation/surface.py) on the original grid (whole
   volume). Every output path is checked before anything is written, so a refused name leaves OUT_DIR
   as it was.

Label values: `--class-id` is an id of the training dataset's label table. The support (and
query) label files mark the class with `--label-value` (default: the class id; for a dataset whose
files keep raw codes, e.g. CMR 200/500/600, the raw code of the class).

The model call is one function (a `ChunkPredictor`; the model's is `ModelChunkPredictor`, on the
engine's `Predictor`), so that tests can replace it while the real preparation and mapping back run.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from data.core.io import (
    DataError,
    Geometry,
    atomic_path,
    check_output_folder,
    read_volume,
    safe_child_path,
    write_volume,
)
from data.core.specs import PROJECT_ROOT, DatasetSpec, Preprocessing, builtin_names, generic_spec, load_spec
from data.pipeline import image_from_array, orientation_of, prepare_scan, reorient
from data.prepare import read_nifti_pair
from data.verify import MIN_SLICES
from dataloaders.volumes import zscore
from evaluation.protocol import (
    count_overlap,
    dice_score,
    plan_query,
    scored_slices,
    support_slices,
)
from evaluation.reporting import pick_slices, render_prediction
from evaluation.surface import SURFACE_METRICS, SurfaceDistances, array_spacing, surface_distances
from models.engine.builders import autocast_dtype, eval_batch_size, fold_data, resolve_device
from models.engine.checkpoints import read_checkpoint, stored_experiment, trained_model
from models.engine.experiment import Experiment
from models.engine.predictor import Predictor, ScanImage, foreground_probability

log = logging.getLogger(__name__)

DEFAULT_EXTENT_FRACTION = 0.1
_SUFFIXES = re.compile(r"(\.nii\.gz|\.nii|\.mha|\.mhd|\.nrrd|\.nhdr)$", re.IGNORECASE)


# ----------------------------------------------------------------------------- scans
@dataclass
class PreparedScan:
    """A scan on the training data's grid, with the original kept for the way back."""

    name: str                       # file name without extension
    original: sitk.Image            # the scan as stored: outputs go onto its grid
    image: np.ndarray               # z-scored (z, y, x) float32 on the prepared grid
    geometry: Geometry              # the prepared grid
    mask: np.ndarray | None         # the class on the prepared grid (bool), when a label was given
    original_mask: np.ndarray | None = None   # the class on the original grid (bool)


# A ChunkPredictor segments chunks of query slices, each chunk from one support slice:
# (support, [support z of each chunk], query, [query zs of each chunk]) -> [foreground probabilities,
# len(zs) x H x W on the prepared grid, of each chunk]. One call per pass lets the model encode the
# slices of all chunks in full batches.
ChunkPredictor = Callable[[PreparedScan, Sequence[int], PreparedScan, Sequence[np.ndarray]], list]


def scan_name(path: Path) -> str:
    return _SUFFIXES.sub("", Path(path).name) or Path(path).stem


def read_scan(image_path: Path, label_path: Path | None, what: str) -> tuple[sitk.Image, np.ndarray | None]:
    """A 3-D scan and its optional label (same grid), with errors naming the file."""
    if label_path is None:
        array, geometry = read_volume(image_path, what=what)
        label = None
    else:
        array, label, geometry, _ = read_nifti_pair(Path(image_path), Path(label_path), what)
    if array.shape[0] < MIN_SLICES:
        raise DataError(f"{what} {image_path} has {array.shape[0]} slice(s) (shape z, y, x {array.shape}): a 2-D "
                        f"image; one-shot segmentation needs a 3-D volume of at least {MIN_SLICES} slices")
    return image_from_array(array, geometry), label


def prepare(name: str, image: sitk.Image, class_mask: np.ndarray | None, prep: Preprocessing,
            stats: tuple[float, float] | None, source: str) -> PreparedScan:
    """Prepare a scan as the training scans were and z-score it as the loaders do."""
    case = prepare_scan(image, None if class_mask is None else class_mask.astype(np.uint8), prep, source)
    mean, std = stats if stats is not None else (None, None)
    z = zscore(case.image, mean, std, source=source, fix="segment a scan that holds an image (check the file)")
    return PreparedScan(name, image, z, case.geometry, None if case.label is None else case.label > 0,
                        class_mask)


def labelled_slices(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.any(axis=(1, 2)))


# ----------------------------------------------------------------------------- protocol
def estimate_extent(areas: np.ndarray, fraction: float = DEFAULT_EXTENT_FRACTION) -> tuple[int, int] | None:
    """First and last slice of the organ from per-slice predicted areas (see the module docstring):
    the run of consecutive slices around the largest area whose area is >= fraction x that area."""
    areas = np.asarray(areas)
    if areas.size == 0 or areas.max() <= 0:
        return None
    keep = areas >= max(fraction * areas.max(), np.finfo(float).tiny)
    lo = hi = int(np.argmax(areas))
    while lo > 0 and keep[lo - 1]:
        lo -= 1
    while hi < len(areas) - 1 and keep[hi + 1]:
        hi += 1
    return lo, hi


@dataclass
class QueryExtent:
    """Where the protocol looked: the scored slices of the prepared query and how they were found."""

    scored: np.ndarray
    extent_from: str                # "label" or "estimated" (or "none": nothing found)
    support_zs: list[int]


def segment_query(support: PreparedScan, query: PreparedScan, predict: ChunkPredictor, n_part: int,
                  chunking: str, scored_mode: str, extent_fraction: float) -> tuple[np.ndarray, QueryExtent]:
    """Foreground probability of the query on its prepared grid (Z x H x W float32), by the
    evaluation protocol."""
    support_labelled = labelled_slices(support.mask)
    support_zs = support_slices(support_labelled, n_part)
    prob = np.zeros(query.image.shape, np.float32)
    if query.mask is not None and query.mask.any():
        scored, how = scored_slices(labelled_slices(query.mask), scored_mode), "label"
    else:
        middle = support_slices(support_labelled, 1)
        first_pass = predict(support, middle, query, [np.arange(query.image.shape[0])])[0]
        extent = estimate_extent((first_pass > 0.5).sum(axis=(1, 2)), extent_fraction)
        if extent is None:
            return prob, QueryExtent(np.zeros(0, int), "none", support_zs)
        scored, how = np.arange(extent[0], extent[1] + 1), "estimated"
    plan = plan_query(scored, n_part, chunking)
    chunks = list(plan.chunks)
    for zs, chunk_prob in zip(chunks, predict(support, [support_zs[p] for p in plan.parts], query, chunks)):
        prob[zs] = chunk_prob
    return prob, QueryExtent(scored, how, support_zs)


def to_original_grid(prob: np.ndarray, geometry: Geometry, original: sitk.Image) -> np.ndarray:
    """Probability on the prepared grid -> boolean mask on the original grid (linear, > 0.5)."""
    prob_image = geometry.apply_to(sitk.GetImageFromArray(prob.astype(np.float32)))
    back = sitk.Resample(prob_image, original, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(back) > 0.5


# ----------------------------------------------------------------------------- the model
class ModelChunkPredictor:
    """The model as a `ChunkPredictor`, on the engine's `Predictor`: the support's slices stay cached
    for every query, a query's slices until the next query (the first pass and the chunks share them)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self._current: dict[str, PreparedScan] = {}       # "support" / "query" -> the scan cached in that role

    def _cached_as(self, role: str, scan: PreparedScan) -> ScanImage:
        """The scan under its cache key; another scan in the same role drops the previous one's features.
        The scans are held here, so no other scan can take over their ids meanwhile."""
        previous = self._current.get(role)
        if previous is not None and previous is not scan:
            self.predictor.forget((role, id(previous)))
        self._current[role] = scan
        return ScanImage((role, id(scan)), scan.image)

    def __call__(self, support: PreparedScan, support_zs: Sequence[int], query: PreparedScan,
                 chunks: Sequence[np.ndarray]) -> list[np.ndarray]:
        masks = support.mask[np.asarray(support_zs, dtype=int)]                  # P x H x W bool
        log_probs = self.predictor.predict_chunks(self._cached_as("support", support), support_zs, masks,
                                                  self._cached_as("query", query), chunks)
        return [foreground_probability(lp).cpu().numpy() for lp in log_probs]


def read_snapshot(path: Path) -> tuple[Experiment, dict]:
    """Our snapshot as its experiment (the stored config with the keys added since it was written) and
    the model's state dict; a file without a stored experiment is refused (the model would be unknown)."""
    state, stored = read_checkpoint(path)
    return stored_experiment(stored, path), state


def model_predictor(exp: Experiment, state: dict, source: Path, device_name: str,
                    amp: str | None = None) -> ModelChunkPredictor:
    """The snapshot's model (`state`, loaded strictly into the model `exp` describes) on the device, with
    the experiment's evaluation batch size and precision (`amp` overrides evaluation.amp)."""
    try:
        device = resolve_device(device_name)
    except RuntimeError as err:
        raise DataError(str(err).replace("device=", "--device ")) from None
    model = trained_model(exp, state, source)
    return ModelChunkPredictor(Predictor(
        model.to(device).eval(), device, eval_batch_size(exp.evaluation, device),
        autocast_dtype(amp or exp.evaluation.amp, device, "--amp")))


# ----------------------------------------------------------------------------- training data
def resolve_data_dir(data_dir: str) -> Path | None:
    """The training run's data_dir: absolute, or relative to the current folder or the project."""
    path = Path(data_dir)
    for candidate in ([path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]):
        if candidate.is_dir():
            return candidate
    return None


def training_spec(exp: Experiment, dataset_json: Path | None) -> DatasetSpec:
    """The spec of the dataset the checkpoint was trained on."""
    if dataset_json is not None:
        if not Path(dataset_json).is_file():
            raise DataError(f"--dataset-json {dataset_json} not found")
        try:
            return generic_spec(json.loads(Path(dataset_json).read_text()), str(dataset_json))
        except json.JSONDecodeError as err:
            raise DataError(f"{dataset_json} is not valid JSON: {err}") from None
    name = str(exp.dataset)
    if name.upper() in (n.upper() for n in builtin_names()):
        return load_spec(name)
    data_dir = resolve_data_dir(str(exp.data_dir))
    if data_dir is None or not (data_dir / "dataset.json").is_file():
        raise DataError(f"the checkpoint was trained on {name}, described by {exp.data_dir}/dataset.json, which "
                        f"is not there (the dataset folder was moved or deleted). Pass --dataset-json with a copy "
                        f"of that file, or restore the folder")
    return load_spec(name, data_dir)


def training_preprocessing(spec: DatasetSpec) -> Preprocessing:
    """The spec's preprocessing block, which new scans need."""
    if spec.preprocessing is None:
        raise DataError(f"the {spec.name} dataset description has no 'preprocessing' block, so new scans cannot be "
                        f"prepared as its training scans were; add one to its dataset.json (README.md, 'Bring your own data')")
    return spec.preprocessing


def with_support_axes(prep: Preprocessing, support_image: sitk.Image) -> Preprocessing:
    """A pipeline that keeps each scan's axes (orientation null) takes the support's, so that the
    queries are brought to them."""
    if prep.orientation is None:
        return dataclasses.replace(prep, orientation=orientation_of(support_image.GetDirection()))
    return prep


def normalisation_stats(exp: Experiment, mode: str) -> tuple[float, float] | None:
    """None for a per-volume z-score; the training scans' (mean, std) for data.normalize=dataset."""
    if mode == "volume" or exp.data.normalize != "dataset":
        return None
    data_dir = resolve_data_dir(str(exp.data_dir))
    if data_dir is None:
        raise DataError(f"the checkpoint was trained with data.normalize=dataset: its z-score uses the mean and "
                        f"std of the training scans in {exp.data_dir}, which is not there. Restore that folder, "
                        f"or pass --normalize volume (a per-scan z-score; results may differ)")
    _, store, _ = fold_data(dataclasses.replace(exp, data_dir=str(data_dir)))
    return store.dataset_stats()


def class_of(spec: DatasetSpec, class_id: int, label_value: float | None) -> tuple[str, float]:
    """(class name, value marking it in the label files)."""
    if class_id == 0 or class_id not in spec.labels.values():
        raise DataError(f"--class-id {class_id} is not a class of {spec.name}, the checkpoint's training dataset; "
                        f"its classes are " + ", ".join(f"{v} {k}" for k, v in spec.labels.items() if v))
    if label_value is not None:
        return spec.label_name(class_id), float(label_value)
    raw = {v: k for k, v in (spec.raw_label_values or {}).items()}
    return spec.label_name(class_id), float(raw.get(class_id, class_id))


def check_class_present(label: np.ndarray, value: float, path: Path, class_name: str) -> np.ndarray:
    mask = label == value
    if not mask.any():
        values = np.unique(label)
        raise DataError(f"support label {path} has no voxel of class {class_name} (value {value:g}); its values are "
                        f"{[float(v) for v in values[:20]]}. Pass the label of this class, or --label-value")
    return mask


# ----------------------------------------------------------------------------- outputs
@dataclass
class QueryResult:
    name: str
    mask_path: Path
    overlay_path: Path
    voxels: int
    volume_ml: float
    dice: float | None
    extent: QueryExtent
    distances: SurfaceDistances | None = None     # HD95 and ASSD (mm), with a query label


def output_paths(out: Path, name: str, class_name: str) -> tuple[Path, Path]:
    """The mask and overlay paths of one query, kept inside OUT_DIR whatever the file names hold."""
    return (safe_child_path(out, f"{name}_{class_name}.nii.gz"), safe_child_path(out, f"{name}_{class_name}.png"))


def write_mask(path: Path, mask: np.ndarray, class_id: int, original: sitk.Image) -> Path:
    dtype = np.uint8 if class_id < 256 else np.uint16
    return write_volume(path, mask.astype(dtype) * dtype(class_id), Geometry.of(original))


def write_overlay(path: Path, query: PreparedScan, mask: np.ndarray, orientation: str | None, class_name: str,
                  volume_ml: float, dice: float | None) -> Path:
    """PNG of the original query cut as the training scans were (reoriented to `orientation`) and
    shown in the radiological convention: prediction red (fill and outline), label green (outline).

    Title: query, class, volume in ml and, with a query label, the whole-volume Dice; each panel
    names class, query, slice (the slice index in the query file when the cut keeps its slices) and,
    with a query label, that slice's Dice."""

    geometry = Geometry.of(query.original)

    def oriented(array):
        return sitk.GetArrayFromImage(reorient(image_from_array(array, geometry), orientation))

    reoriented = reorient(query.original, orientation)
    image = sitk.GetArrayFromImage(reoriented)
    pred = oriented(mask.astype(np.uint8))
    truth = None if query.original_mask is None else oriented(query.original_mask.astype(np.uint8))
    n_slices = query.original.GetSize()[2]
    file_z = oriented(np.broadcast_to(np.arange(n_slices, dtype=np.uint16)[:, None, None],
                                      sitk.GetArrayViewFromImage(query.original).shape).copy())

    def slice_label(z: int) -> str:
        values = np.unique(file_z[z])
        return f"slice {int(values[0])}" if len(values) == 1 else f"slice {z} (cut as {orientation})"

    title = f"{query.name}: {class_name}, {volume_ml:.1f} ml"
    if dice is not None:
        title += f", Dice {dice:.3f}" if np.isfinite(dice) else ", Dice n/a"
    return render_prediction(image, pred, truth, pick_slices(pred, truth, 4), title, path, class_name=class_name,
                             scan=query.name, direction=reoriented.GetDirection(), slice_label=slice_label,
                             spacing=reoriented.GetSpacing())


def format_table(results: Sequence[QueryResult], class_name: str) -> str:
    """One row per query; HD95 and ASSD columns (mm; nan/inf for an empty mask) when a query label was given."""
    surface = any(r.distances is not None for r in results)
    header = (f"{'query':<28}{'class':<12}{'volume (ml)':>12}{'dice':>8}"
              + (f"{'hd95 mm':>10}{'assd mm':>10}" if surface else "") + "  extent (prepared slices)")
    lines = [header, "-" * len(header)]
    for r in results:
        dice = "-" if r.dice is None or not np.isfinite(r.dice) else f"{r.dice:.4f}"
        distances = "" if not surface else (f"{'-':>10}{'-':>10}" if r.distances is None else
                                            f"{r.distances.hd95_mm:>10.2f}{r.distances.assd_mm:>10.2f}")
        extent = (f"{r.extent.scored.min()}-{r.extent.scored.max()} ({r.extent.extent_from})"
                  if len(r.extent.scored) else "none found")
        lines.append(f"{r.name:<28}{class_name:<12}{r.volume_ml:>12.2f}{dice:>8}{distances}  {extent}")
    return "\n".join(lines)


def write_csv(path: Path, results: Sequence[QueryResult], class_name: str, class_id: int) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "class", "class_id", "voxels", "volume_ml", "dice", *SURFACE_METRICS, "extent_from",
                         "extent_first", "extent_last", "support_slices", "mask"])
        for r in results:
            scored = r.extent.scored
            first, last = (int(scored.min()), int(scored.max())) if len(scored) else ("", "")
            writer.writerow([r.name, class_name, class_id, r.voxels, f"{r.volume_ml:.4f}",
                             "" if r.dice is None else f"{r.dice:.6f}",
                             *(("", "") if r.distances is None else (f"{r.distances.hd95_mm:.4f}",
                                                                     f"{r.distances.assd_mm:.4f}")),
                             r.extent.extent_from, first, last,
                             " ".join(map(str, r.extent.support_zs)), r.mask_path.name])
    return path


# ----------------------------------------------------------------------------- the whole run
@dataclass(frozen=True)
class SegmentationJob:
    """What to segment: the arguments of scripts/segment.py, under the same names."""

    checkpoint: Path
    support_image: Path
    support_label: Path
    class_id: int
    query: Sequence[Path]
    out: Path
    query_label: Sequence[Path] | None = None
    device: str = "auto"
    amp: str | None = None                  # None: the checkpoint config's evaluation.amp
    n_part: int | None = None               # None: the checkpoint config's evaluation.n_part
    label_value: float | None = None
    extent_fraction: float = DEFAULT_EXTENT_FRACTION
    dataset_json: Path | None = None
    normalize: str = "config"


@dataclass
class Segmentation:
    """What a job produced: one row per query, and the CSV that lists them."""

    class_name: str
    results: list[QueryResult]
    csv_path: Path


def read_queries(job: SegmentationJob, value: float) -> list[tuple[Path, sitk.Image, np.ndarray | None]]:
    """(path, image, class mask on the original grid or None) of every query."""
    queries = []
    for i, path in enumerate(job.query):
        label_path = job.query_label[i] if job.query_label else None
        image, label = read_scan(path, label_path, "query")
        queries.append((path, image, None if label is None else label == value))
    return queries


def prepare_support(job: SegmentationJob, image: sitk.Image, class_mask: np.ndarray, class_name: str,
                    prep: Preprocessing, stats: tuple[float, float] | None) -> PreparedScan:
    support = prepare(scan_name(job.support_image), image, class_mask, prep, stats, str(job.support_image))
    if not support.mask.any():
        raise DataError(f"class {class_name} of {job.support_label} ({int(class_mask.sum())} voxels) vanishes on the "
                        f"training grid ({prep.spacing} mm in-plane): too small to serve as support")
    return support


def segment_scans(job: SegmentationJob, predictor: ChunkPredictor | None = None) -> Segmentation:
    """Segment the queries and write their outputs; `predictor` replaces the checkpoint's model (tests)."""
    exp, state = read_snapshot(job.checkpoint)
    spec = training_spec(exp, job.dataset_json)
    prep = training_preprocessing(spec)
    class_name, value = class_of(spec, job.class_id, job.label_value)
    evaluation = exp.evaluation
    n_part = int(job.n_part or evaluation.n_part)

    support_image, support_label = read_scan(job.support_image, job.support_label, "support")
    support_mask = check_class_present(support_label, value, job.support_label, class_name)
    queries = read_queries(job, value)
    prep = with_support_axes(prep, support_image)
    stats = normalisation_stats(exp, job.normalize)
    support = prepare_support(job, support_image, support_mask, class_name, prep, stats)
    # every query is prepared and every output name checked before the model runs or anything is written,
    # so a refused query or name (a constant scan, a wrong spacing) leaves OUT_DIR as it was
    prepared = [prepare(scan_name(path), image, query_mask, prep, stats, str(path))
                for path, image, query_mask in queries]
    outputs = {str(path): output_paths(job.out, scan_name(path), class_name) for path, _, _ in queries}
    csv_path = safe_child_path(job.out, f"volumes_{class_name}.csv")
    check_output_folder(job.out, "the output folder")
    predict = predictor or model_predictor(exp, state, job.checkpoint, job.device, job.amp)
    Path(job.out).mkdir(parents=True, exist_ok=True)
    results = []
    for (path, image, query_mask), query in zip(queries, prepared):
        name = scan_name(path)
        mask_path, overlay_path = outputs[str(path)]
        if query_mask is not None and not query.mask.any():
            log.warning(f"the label of {path} has no {class_name} on the training grid; the organ extent is estimated")
        prob, extent = segment_query(support, query, predict, n_part, evaluation.chunking, evaluation.scored,
                                     job.extent_fraction)
        if extent.extent_from == "none":
            log.warning(f"{path}: the first pass found no {class_name} in any slice; the mask is empty")
        mask = to_original_grid(prob, query.geometry, image)
        voxels = int(mask.sum())
        dice = None if query_mask is None else dice_score(*count_overlap(mask, query_mask))
        distances = (None if query_mask is None
                     else surface_distances(mask, query_mask, array_spacing(image.GetSpacing())))
        mask_path = write_mask(mask_path, mask, job.class_id, image)
        volume_ml = voxels * float(np.prod(image.GetSpacing())) / 1000.0
        overlay = write_overlay(overlay_path, query, mask, prep.orientation, class_name, volume_ml, dice)
        results.append(QueryResult(name, mask_path, overlay, voxels, volume_ml, dice, extent, distances))
    write_csv(csv_path, results, class_name, job.class_id)
    return Segmentation(class_name, results, csv_path)
