"""Render PNG overlays for saved predictions (the NIfTI files validation.py writes).

    python -m scripts.render_overlays runs/test/<exp>/<id>/predictions/scan_2_LIVER.nii.gz \
        --data-dir data/CHAOST2 --dataset CHAOST2 [--slices 12 15 18] [--out overlays/]

A prediction file is named scan_<id>_<CLASS>.nii.gz; the scan's image (and its label, for the
ground-truth contour) come from the dataset folder. Without --slices, up to --n slices evenly spread
over those where the prediction or the ground truth is non-empty are drawn. The prediction is a
translucent red fill with its outline, the ground truth a green outline; slices are shown in the
radiological convention (anterior up, the patient's right on the image's left), and each panel is
titled with class, scan, slice and that slice's Dice.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from data.core.cli import add_logging_arguments, run_cli
from data.core.io import DataError, read_volume, safe_child_path
from data.core.specs import load_spec
from evaluation.reporting import pick_slices, render_prediction
from dataloaders.volumes import VolumeStore

_NAME = re.compile(r"^scan_(\d+)_(.+)\.nii(\.gz)?$")


def render(pred_path: Path, store: VolumeStore, out_dir: Path, slices=None, n: int = 4) -> Path:
    match = _NAME.match(pred_path.name)
    if not match:
        raise DataError(f"{pred_path.name}: expected a prediction named scan_<id>_<CLASS>.nii.gz")
    scan_id, class_name = int(match.group(1)), match.group(2)
    class_id = store.spec.labels.get(class_name)
    if class_id is None:
        raise DataError(f"{pred_path.name}: class {class_name!r} is not in the {store.spec.name} label table")
    prediction, _ = read_volume(pred_path, what="prediction")
    scan = store.scan(scan_id)
    if prediction.shape != scan.image.shape:
        raise DataError(f"{pred_path} has shape {prediction.shape} but scan {scan_id} has {scan.image.shape}; "
                        f"is --data-dir the dataset it was predicted on?")
    truth = scan.label == class_id
    zs = slices if slices else pick_slices(prediction, truth, n)
    return render_prediction(scan.image, prediction, truth, zs, f"{store.spec.name} scan {scan_id}: {class_name}",
                             safe_child_path(out_dir, f"{pred_path.name.split('.')[0]}.png"),
                             class_name=class_name, scan=scan_id, direction=scan.geometry.direction,
                             spacing=scan.geometry.spacing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", nargs="+", type=Path, help="prediction NIfTI files")
    parser.add_argument("--data-dir", required=True, type=Path, help="the dataset folder of the scans")
    parser.add_argument("--dataset", required=True, help="dataset name (CHAOST2, CMR, SABS, SYNTH, ...)")
    parser.add_argument("--slices", nargs="*", type=int, help="slice indices to draw")
    parser.add_argument("--n", type=int, default=4, help="number of slices when --slices is not given")
    parser.add_argument("--out", type=Path, help="output folder (default: next to each prediction)")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        store = VolumeStore(load_spec(args.dataset, args.data_dir), args.data_dir)
        for pred in args.predictions:
            print(render(pred, store, args.out or pred.parent, args.slices, args.n))
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
