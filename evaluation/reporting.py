"""Evaluation outputs: plain tables, CSV/JSON, NIfTI predictions and PNG overlays."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from data.core.io import atomic_path, safe_child_path, write_volume
from data.core.run_folder import RunFolder
from evaluation.protocol import EvaluationResult
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


def summary(result: EvaluationResult) -> dict:
    return {
        "dataset": result.dataset,
        "fold": result.fold,
        "support_scan": result.support_id,
        "query_scans": list(result.query_ids),
        "support_slices": {result.class_scores(c)[0].class_name: zs for c, zs in result.support_slices.items()
                           if result.class_scores(c)},
        "classes": {s.class_name: {"dice": result.class_mean(s.class_id), "dice_std": result.class_std(s.class_id),
                                   "iou": result.class_mean(s.class_id, "iou")}
                    for s in result.scores},
        "mean_dice": result.mean(),
        "mean_iou": result.mean("iou"),
        "per_scan": [{"class": s.class_name, "class_id": s.class_id, "scan": s.scan_id, "dice": s.dice,
                      "iou": s.iou, "tp": s.tp, "fp": s.fp, "fn": s.fn, "scored_slices": s.n_slices}
                     for s in result.scores],
        "seconds": result.seconds,
        "query_slices": result.n_query_slices,
    }


def write_results(result: EvaluationResult, out_dir: Path, extra: dict | None = None) -> dict[str, Path]:
    """The results of a run folder: a CSV (one row per class and scan) and a JSON (summary + extra)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunFolder(out_dir)
    paths = {"csv": run.results_csv, "json": run.results_json}
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "class_id", "scan", "dice", "iou", "tp", "fp", "fn", "scored_slices"])
        for s in result.scores:
            writer.writerow([s.class_name, s.class_id, s.scan_id, f"{s.dice:.6f}", f"{s.iou:.6f}",
                             s.tp, s.fp, s.fn, s.n_slices])
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
    panels it shows (read back by tests and tools)."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png", metadata={"Panels": str(panels)})
    plt.close(fig)
    return path


def _contour(ax, mask: np.ndarray, color: str, label: str | None = None) -> None:
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1.0)
    if label:
        ax.plot([], [], color=color, label=label)


def write_overlays(result: EvaluationResult, store: VolumeStore, out_dir: Path, per_class: int = 3) -> list[Path]:
    """PNG per class: support slice(s) with the mask, then query slices with prediction and truth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    support = store.scan(result.support_id)
    paths = []
    for c in result.class_ids():
        name = result.class_scores(c)[0].class_name
        scan_id = result.class_scores(c)[0].scan_id
        query = store.scan(scan_id)
        pred = result.predictions[(scan_id, c)]
        labelled = query.slices_with(c)
        picks = labelled[np.linspace(0, len(labelled) - 1, per_class).round().astype(int)] if len(labelled) else []
        s_zs = result.support_slices[c]
        n = len(s_zs) + len(picks)
        fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
        for ax, z in zip(axes[0], s_zs):
            ax.imshow(support.image[z], cmap="gray")
            _contour(ax, support.label[z] == c, "yellow")
            ax.set_title(f"support {result.support_id} z{z}", fontsize=8)
        for ax, z in zip(axes[0][len(s_zs):], picks):
            ax.imshow(query.image[z], cmap="gray")
            _contour(ax, query.label[z] == c, "lime", "truth")
            _contour(ax, pred[z] > 0, "red", "prediction")
            ax.set_title(f"query {scan_id} z{z}", fontsize=8)
        for ax in axes[0]:
            ax.axis("off")
        axes[0][-1].legend(loc="lower right", fontsize=6, framealpha=0.6)
        fig.suptitle(f"{result.dataset} fold {result.fold}: {name} (dice {result.class_mean(c):.3f})", fontsize=9)
        fig.tight_layout()
        paths.append(save_figure(fig, safe_child_path(out_dir, f"overlay_{name}.png"), n))
    return paths


def write_training_curves(history: dict, path: Path, title: str = "") -> Path | None:
    """PNG of the training losses and the learning rate against episodes.

    history: {metric name: (steps, values)} as Sacred records metrics ("loss.<part>", "lr", ...).
    One panel for the losses, one for the learning rate.
    """
    losses = {k: v for k, v in history.items() if k.startswith("loss.") and len(v[0])}
    if not losses:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, (steps, values) in sorted(losses.items()):
        ax_loss.plot(steps, values, label=name[len("loss."):], linewidth=1.2)
    ax_loss.set_xlabel("episodes")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=7)
    ax_loss.grid(alpha=0.3)
    if "lr" in history and len(history["lr"][0]):
        ax_lr.plot(*history["lr"], color="tab:gray")
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
                      path: Path) -> Path:
    """PNG with one panel per slice: the image, the prediction's contour (red) and, when known, the
    ground truth's (green). image, prediction, truth: Z x H x W."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = list(slices)
    fig, axes = plt.subplots(1, len(slices), figsize=(2.6 * len(slices), 2.9), squeeze=False)
    for ax, z in zip(axes[0], slices):
        ax.imshow(image[z], cmap="gray")
        if truth is not None:
            _contour(ax, truth[z] > 0, "lime", "truth")
        _contour(ax, prediction[z] > 0, "red", "prediction")
        ax.set_title(f"z{z}", fontsize=8)
        ax.axis("off")
    axes[0][-1].legend(loc="lower right", fontsize=6, framealpha=0.6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, len(slices))
