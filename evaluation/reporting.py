"""Evaluation outputs: plain tables, CSV/JSON, NIfTI predictions and PNG overlays."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.core.io import atomic_path, safe_child_path, write_volume
from data.core.run_folder import RunFolder
from evaluation.protocol import EvaluationResult, count_overlap, dice_score
from evaluation.surface import SurfaceDistances, mean_distances
from dataloaders.volumes import VolumeStore


def format_table(result: EvaluationResult, title: str = "") -> str:
    """Per-class Dice (mean and std over query scans), IoU, and the mean over classes."""
    header = f"{'class':<12}{'dice':>8}{'std':>8}{'iou':>8}{'scans':>7}"
    lines = [title, header, "-" * len(header)] if title else [header, "-" * len(header)]
    for c in result.class_ids():
        name = result.class_scores(c)[0].class_name
        lines.append(f"{name:<12}{result.class_mean(c):>8.4f}{result.class_std(c):>8.4f}"
                     f"{result.class_mean(c, 'iou'):>8.4f}{len(result.class_scores(c)):>7d}")
    lines.append("-" * len(header))
    lines.append(f"{'mean':<12}{result.mean():>8.4f}{'':>8}{result.mean('iou'):>8.4f}")
    return "\n".join(lines)


def format_patient_table(result: EvaluationResult) -> str:
    """Dice per query scan (rows) and class (columns)."""
    classes = result.class_ids()
    names = {c: result.class_scores(c)[0].class_name for c in classes}
    header = f"{'scan':<8}" + "".join(f"{names[c]:>12}" for c in classes)
    lines = [header]
    for scan_id in result.query_ids:
        row = {s.class_id: s.dice for s in result.scores if s.scan_id == scan_id}
        lines.append(f"{scan_id:<8}" + "".join(f"{row[c]:>12.4f}" if c in row else f"{'-':>12}" for c in classes))
    return "\n".join(lines)


def class_distances(result: EvaluationResult, class_id: int) -> tuple[SurfaceDistances, int]:
    """A class's mean HD95 and ASSD (mm) over its query scans with a non-empty prediction, and how many
    scans were left out (evaluation/surface.py: `mean_distances`)."""
    return mean_distances(SurfaceDistances(s.hd95_mm, s.assd_mm) for s in result.class_scores(class_id))


def mean_class_distances(result: EvaluationResult) -> SurfaceDistances:
    """The mean over classes of the class means, over the classes that have one."""
    means = [class_distances(result, c)[0] for c in result.class_ids()]
    return mean_distances(means)[0]


def format_surface_table(result: EvaluationResult) -> str:
    """Per-class HD95 and ASSD (mm, mean over query scans) and the mean over classes; a scan with an empty
    prediction has none (nan/inf in results.csv) and is counted under 'excluded' instead."""
    header = f"{'class':<12}{'hd95 mm':>10}{'assd mm':>10}{'scans':>7}{'excluded':>10}"
    lines = [header, "-" * len(header)]
    for c in result.class_ids():
        (means, excluded), name = class_distances(result, c), result.class_scores(c)[0].class_name
        lines.append(f"{name:<12}{means.hd95_mm:>10.2f}{means.assd_mm:>10.2f}{len(result.class_scores(c)):>7d}"
                     f"{excluded:>10d}")
    overall = mean_class_distances(result)
    lines += ["-" * len(header), f"{'mean':<12}{overall.hd95_mm:>10.2f}{overall.assd_mm:>10.2f}",
              "excluded: query scans with an empty prediction, left out of the means"]
    return "\n".join(lines)


def summary(result: EvaluationResult) -> dict:
    return {
        "dataset": result.dataset,
        "fold": result.fold,
        "support_scan": result.support_id,
        "query_scans": list(result.query_ids),
        "support_slices": {result.class_scores(c)[0].class_name: zs for c, zs in result.support_slices.items()
                           if result.class_scores(c)},
        "classes": {s.class_name: {"dice": result.class_mean(s.class_id), "dice_std": result.class_std(s.class_id),
                                   "iou": result.class_mean(s.class_id, "iou"),
                                   **_surface_entry(*class_distances(result, s.class_id))}
                    for s in result.scores},
        "mean_dice": result.mean(),
        "mean_iou": result.mean("iou"),
        "mean_hd95_mm": mean_class_distances(result).hd95_mm,
        "mean_assd_mm": mean_class_distances(result).assd_mm,
        "per_scan": [{"class": s.class_name, "class_id": s.class_id, "scan": s.scan_id, "dice": s.dice,
                      "iou": s.iou, "hd95_mm": s.hd95_mm, "assd_mm": s.assd_mm, "tp": s.tp, "fp": s.fp, "fn": s.fn,
                      "scored_slices": s.n_slices}
                     for s in result.scores],
        "seconds": result.seconds,
        "query_slices": result.n_query_slices,
    }


def _surface_entry(means: SurfaceDistances, excluded: int) -> dict:
    return {"hd95_mm": means.hd95_mm, "assd_mm": means.assd_mm, "surface_excluded": excluded}


def write_results(result: EvaluationResult, out_dir: Path, extra: dict | None = None) -> dict[str, Path]:
    """The results of a run folder: a CSV (one row per class and scan) and a JSON (summary + extra)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunFolder(out_dir)
    paths = {"csv": run.results_csv, "json": run.results_json}
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "class_id", "scan", "dice", "iou", "hd95_mm", "assd_mm", "tp", "fp", "fn",
                         "scored_slices"])
        for s in result.scores:
            writer.writerow([s.class_name, s.class_id, s.scan_id, f"{s.dice:.6f}", f"{s.iou:.6f}",
                             f"{s.hd95_mm:.4f}", f"{s.assd_mm:.4f}", s.tp, s.fp, s.fn, s.n_slices])
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps({**summary(result), **(extra or {})}, indent=2))
    return paths


def write_predictions(result: EvaluationResult, store: VolumeStore, out_dir: Path) -> list[Path]:
    """One NIfTI per (query scan, class): the prediction times the class id, in the scan's geometry."""
    paths = []
    for (scan_id, c), pred in sorted(result.predictions.items()):
        name = store.spec.label_name(c)
        path = safe_child_path(out_dir, f"scan_{scan_id}_{name}.nii.gz")
        write_volume(path, pred.astype(np.uint8) * np.uint8(c), store.scan(scan_id).geometry)
        paths.append(path)
    return paths


def save_figure(fig, path: Path, panels: int) -> Path:
    """Write a matplotlib figure as PNG atomically; the PNG's "Panels" text field records how many
    panels it shows, "Title" the figure's title and "Panel titles" the panels' titles, one a line
    (read back by tests and tools)."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suptitle = fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    metadata = {"Panels": str(panels), "Title": suptitle or "", "Panel titles": "\n".join(titles)}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", metadata={k: v for k, v in metadata.items() if v})
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- slices as a reader sees them
PREDICTION_COLOR = (1.0, 0.0, 0.0)      # red: translucent fill and outline
TRUTH_COLOR = (0.0, 1.0, 0.0)           # lime: outline
SUPPORT_COLOR = (1.0, 1.0, 0.0)         # yellow: outline of the support label
FILL_ALPHA = 0.35                       # opacity of the prediction's fill
_MARKER_POINTS = 20                     # training curves with at most this many points get markers


@dataclass(frozen=True)
class SliceView:
    """How an array slice (rows = array y, columns = array x) becomes the picture: transpose first,
    then flip the rows (upside down) and/or the columns (left-right)."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    plane: str = "axial"          # axial, coronal or sagittal: the plane the slice is closest to

    def __call__(self, slice2d: np.ndarray) -> np.ndarray:
        out = np.asarray(slice2d)
        if self.transpose:
            out = out.T
        if self.flip_rows:
            out = out[::-1, :]
        if self.flip_cols:
            out = out[:, ::-1]
        return out

    def aspect(self, spacing=None) -> float:
        """Height / width of a displayed pixel, from the volume's spacing (x, y, z; None: square)."""
        if spacing is None:
            return 1.0
        across, along = (spacing[1], spacing[0]) if self.transpose else (spacing[0], spacing[1])
        return float(along) / float(across)


# The radiological convention: what the picture's columns (left -> right) and rows (top -> bottom)
# should run towards, in the LPS world frame (+x = patient left, +y = posterior, +z = superior).
_L, _P, _I = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
_CONVENTION = {"axial": (_L, _P), "coronal": (_L, _I), "sagittal": (_P, _I)}


def radiological_view(direction=None) -> SliceView:
    """The transposition and flips that show a slice image[z] of a volume in the radiological
    convention, from the volume's direction cosines (SimpleITK's 9 row-major floats: column j is
    the LPS world direction of array index axis j, in (x, y, z) order; arrays are (z, y, x)).

    Axial slice: anterior up and the patient's right on the image's left (picture columns run
    towards patient left, rows towards posterior). Any direction works: LAS (CHAOS, the phantoms:
    rows run anterior, so the rows are flipped), RPS (both flipped), LPS (as stored), or in-plane
    axes swapped (transposed).

    A slice that is not axial is classified by the world axis its normal is closest to, and shown
    in that plane's usual convention: coronal with superior up and patient right on the left,
    sagittal with superior up and anterior on the left. An oblique slice (CMR short axis, tilted
    acquisitions) is treated as the plane it is closest to, and its in-plane axes are matched to
    that plane's screen directions by their dominant world components; this is only a permutation
    and flips of the pixel grid, never a resampling, so an oblique slice is shown as acquired,
    turned to the nearest of the eight right-angle orientations. For the CMR scans (short axis, the
    normal between the left-right and the anterior-posterior axis: "sagittal" or "coronal", both
    giving the same picture for these scans) this puts the inferior wall at the bottom and the
    septum and right ventricle on the left, as cardiac short-axis views are usually shown.

    direction None: the identity (LPS), for arrays without geometry.
    """
    if direction is None:
        return SliceView()
    d = np.asarray(direction, np.float64).reshape(3, 3)
    cols, rows = d[:, 0], d[:, 1]                     # world directions of array x (columns) and y (rows)
    normal = np.cross(cols, rows)
    plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]
    right, down = _CONVENTION[plane]
    keep = abs(cols @ right) + abs(rows @ down)
    swap = abs(rows @ right) + abs(cols @ down)
    transpose = bool(swap > keep + 1e-9)
    across, along = (rows, cols) if transpose else (cols, rows)   # world direction of picture columns, rows
    return SliceView(transpose, bool(along @ down < 0), bool(across @ right < 0), plane)


def slice_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one slice (NaN when both are empty)."""
    return dice_score(*count_overlap(prediction > 0, truth > 0))


def slice_title(class_name: str, scan, slice_label, dice: float | None = None) -> str:
    """A panel's title: class and scan, then slice and (when a ground truth is drawn) that slice's Dice."""
    scan = "" if scan is None else str(scan)
    first = ", ".join(part for part in (class_name, f"scan {scan}" if scan else "") if part)
    second = slice_label if isinstance(slice_label, str) else f"slice {slice_label}"
    if dice is not None:
        second += ", Dice " + ("n/a (both empty)" if np.isnan(dice) else f"{dice:.3f}")
    return f"{first}\n{second}" if first else second


def _draw_mask(ax, mask: np.ndarray, color, fill: bool) -> bool:
    """Draw a 2-D mask on `ax` (already in picture orientation): its outline, and a translucent fill
    when `fill`. The outline is traced on the mask padded with background, so a mask touching the
    border (a whole-slice prediction) still gets one. Returns whether anything was drawn."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return False
    h, w = mask.shape
    if fill:
        rgba = np.zeros((h, w, 4), np.float32)
        rgba[mask] = (*color, FILL_ALPHA)
        ax.imshow(rgba, interpolation="nearest")
    padded = np.pad(mask.astype(np.float32), 1)
    ax.contour(np.arange(-1, w + 1), np.arange(-1, h + 1), padded, levels=[0.5], colors=[color], linewidths=1.0)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    return True


def _legend_handles(support: bool, truth: bool, prediction: bool) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = []
    if support:
        handles.append(Line2D([], [], color=SUPPORT_COLOR, label="support label (outline)"))
    if truth:
        handles.append(Line2D([], [], color=TRUTH_COLOR, label="ground truth (outline)"))
    if prediction:
        handles.append(Patch(facecolor=(*PREDICTION_COLOR, FILL_ALPHA), edgecolor=PREDICTION_COLOR,
                             label="prediction"))
    return handles


def _panel(ax, image2d: np.ndarray, view: SliceView, masks, title: str, spacing=None) -> None:
    """One slice: the image in grey and the masks [(mask, colour, fill)], all turned by `view`,
    pixels drawn with the volume's in-plane spacing (x, y, z; None: square)."""
    ax.imshow(view(image2d), cmap="gray")
    for mask, color, fill in masks:
        _draw_mask(ax, view(mask), color, fill)
    ax.set_aspect(view.aspect(spacing))
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def _panels_figure(n: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, n, figsize=(max(2.6 * n, 3.6), 3.4), squeeze=False, layout="constrained")
    return fig, axes[0]


def _finish(fig, handles, title: str) -> None:
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)


def write_overlays(result: EvaluationResult, store: VolumeStore, out_dir: Path, per_class: int = 3) -> list[Path]:
    """PNG per class: support slice(s) with the support label's outline, then query slices with the
    prediction (translucent fill and outline) and the ground truth (outline), every slice in the
    radiological convention (`radiological_view` of each scan's geometry)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    support = store.scan(result.support_id)
    support_view = radiological_view(support.geometry.direction)
    paths = []
    for c in result.class_ids():
        scores = result.class_scores(c)
        name, scan_id = scores[0].class_name, scores[0].scan_id
        query = store.scan(scan_id)
        query_view = radiological_view(query.geometry.direction)
        pred = result.predictions[(scan_id, c)]
        labelled = query.slices_with(c)
        picks = labelled[np.linspace(0, len(labelled) - 1, per_class).round().astype(int)] if len(labelled) else []
        s_zs = result.support_slices[c]
        n = len(s_zs) + len(picks)
        fig, axes = _panels_figure(n)
        for ax, z in zip(axes, s_zs):
            _panel(ax, support.image[z], support_view, [(support.label[z] == c, SUPPORT_COLOR, False)],
                   slice_title(name, f"{result.support_id} (support)", int(z)), support.geometry.spacing)
        for ax, z in zip(axes[len(s_zs):], picks):
            truth, predicted = query.label[z] == c, pred[z] > 0
            _panel(ax, query.image[z], query_view, [(truth, TRUTH_COLOR, False), (predicted, PREDICTION_COLOR, True)],
                   slice_title(name, scan_id, int(z), slice_dice(predicted, truth)), query.geometry.spacing)
        mean = result.class_mean(c)
        _finish(fig, _legend_handles(len(s_zs) > 0, len(picks) > 0, len(picks) > 0),
                f"{result.dataset} fold {result.fold}: {name} (mean Dice {mean:.3f} over {len(scores)} "
                f"query scan{'s' if len(scores) != 1 else ''})")
        paths.append(save_figure(fig, safe_child_path(out_dir, f"overlay_{name}.png"), n))
    return paths


def write_training_curves(history: dict, path: Path, title: str = "") -> Path | None:
    """PNG of the training losses and the learning rate against episodes.

    history: {metric name: (steps, values)} as Sacred records metrics ("loss.<part>", "lr", ...).
    One panel for the losses, one for the learning rate. Short series (a run that logged once or a
    few times) are drawn with markers, so a single logged point is visible.
    """
    losses = {k: v for k, v in history.items() if k.startswith("loss.") and len(v[0])}
    if not losses:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def style(steps) -> dict:
        return {"marker": "o", "markersize": 4} if len(steps) <= _MARKER_POINTS else {}

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, (steps, values) in sorted(losses.items()):
        ax_loss.plot(steps, values, label=name[len("loss."):], linewidth=1.2, **style(steps))
    ax_loss.set_xlabel("episodes")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    if "lr" in history and len(history["lr"][0]):
        ax_lr.plot(*history["lr"], color="tab:gray", **style(history["lr"][0]))
    ax_lr.set_xlabel("episodes")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, 2)



def curves_from_metrics(run_dir: Path) -> dict:
    """{name: (steps, values)} from a run folder's recorded metrics."""
    data = RunFolder(run_dir).read_metrics()
    return {k: (v["steps"], v["values"]) for k, v in data.items()}


def pick_slices(prediction: np.ndarray, truth: np.ndarray | None, n: int) -> list[int]:
    """Up to n slices spread evenly over those holding the prediction or the truth (all slices if
    neither holds anything): the slices a picture of one prediction shows."""
    present = prediction.any(axis=(1, 2)) | (truth.any(axis=(1, 2)) if truth is not None else False)
    zs = np.flatnonzero(present)
    if len(zs) == 0:
        zs = np.arange(prediction.shape[0])
    return sorted({int(z) for z in zs[np.linspace(0, len(zs) - 1, min(n, len(zs))).round().astype(int)]})


def render_prediction(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None, slices, title: str,
                      path: Path, class_name: str = "", scan="", direction=None, slice_label=None,
                      spacing=None) -> Path:
    """PNG with one panel per slice: the image, the prediction (translucent red fill and outline)
    and, when known, the ground truth (green outline). image, prediction, truth: Z x H x W.

    direction: the volume's direction cosines (SimpleITK's 9 floats), so that each slice is shown in
    the radiological convention (`radiological_view`; None: the array is taken as LPS); spacing
    (x, y, z mm, as SimpleITK gives it) draws non-square pixels to scale. Each panel's
    title names the class, the scan, the slice (`slice_label(z)`, default "slice z") and, with a
    ground truth, that slice's Dice; `title` is the figure's."""
    slices = list(slices)
    view = radiological_view(direction)
    fig, axes = _panels_figure(len(slices))
    for ax, z in zip(axes, slices):
        predicted = prediction[z] > 0
        masks = [(predicted, PREDICTION_COLOR, True)]
        dice = None
        if truth is not None:
            masks.insert(0, (truth[z] > 0, TRUTH_COLOR, False))
            dice = slice_dice(predicted, truth[z] > 0)
        label = slice_label(z) if slice_label else int(z)
        _panel(ax, image[z], view, masks, slice_title(class_name, scan, label, dice), spacing)
    _finish(fig, _legend_handles(False, truth is not None, True), title)
    return save_figure(fig, path, len(slices))
