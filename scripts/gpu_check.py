"""Check this code base on a CUDA machine in a few minutes, and print one table.

    python -m scripts.gpu_check [--budget 360] [--size 256] [--qnet-episodes 500] [--out results/gpu_check.md]

On a machine with CUDA it installs nothing and downloads nothing (random encoder weights, synthetic
phantoms written under --work) and runs, on `cuda`:

1. Q-Net trained --qnet-episodes (500) episodes on the phantoms at --size (256) x --size with the
   defaults (fast mode: 8 episodes per step, bf16, channels_last, augmentation on the device), then
   evaluated on fold 0 with the defaults (fp32 encoder): episodes/s, query slices/s, peak device
   memory and mean Dice;
2. scripts.benchmark (its measure_peaks, and mode_config / spawn / measure, one process per run) for
   every method in its reference-like and fast modes: training episodes/s, evaluation slices/s, peak
   device memory, and the benchmark's roofline columns: GFLOP per training episode and per evaluated
   slice, the fraction of the device's measured peak (bf16 peak for a bf16 mode, fp32 otherwise;
   measured before the runs at the 256 x 256 encoder shapes, its table printed after the main one),
   and an evaluated slice's time split into encoder, head and Q-Net's refinement (ms per slice).

It keeps to --budget seconds (default 360, counted from the start, data preparation included, so that
the last run ends within 8 minutes): a run that would start after the budget is spent is listed as
skipped. Not yet run on a GPU: the budget is planned from CPU timings (data preparation at 256 x 256
takes about 2 minutes on 2 CPU cores; the phantoms are kept in --work for the next run). On a machine
without CUDA it says so and exits with status 0 without running anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from configs.experiment import method_names
from models.engine.builders import episodes_per_step, resolve_device
from models.engine.evaluation import evaluate
from models.engine.trainer import train
from scripts.benchmark import (
    MODES,
    PEAK_SIZE,
    fmt,
    measure_peaks,
    mode_config,
    peaks_table,
    percent,
    prepare_data,
    refinement_lines,
    roofline,
    spawn,
)

COLUMNS = ("run", "method", "mode", "episodes/step", "train episodes/s", "GFLOP/episode", "train % peak",
           "eval slices/s", "GFLOP/slice", "eval % peak", "encoder ms/slice", "head ms/slice",
           "refinement ms/slice", "peak device MB", "mean Dice")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def no_cuda_message() -> str:
    return (f"gpu_check: no CUDA device here (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'none'}); nothing was run. Run it on a machine with a GPU.")


def format_table(rows: list[dict], title: str = "", peaks: dict | None = None) -> str:
    """One markdown table. Each row: run, method, mode, and any of batch, train_episodes_per_s,
    train_gflop_per_episode, eval_slices_per_s, eval_gflop_per_slice, eval_ms_per_slice ({"encoder",
    "head", "refinement"}), train_dtype / eval_dtype, device_peak_mb, dice (missing or None prints
    '-'); a row with `skipped` prints its reason in the run column. `peaks` ({"fp32": GFLOP/s,
    "bf16": ...}, measure_peaks) gives the % peak columns (scripts.benchmark.roofline)."""
    lines = ([title, ""] if title else []) + ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        run = r["run"] + (f" (skipped: {r['skipped']})" if r.get("skipped") else "")
        derived = roofline(r, peaks)
        split = r.get("eval_ms_per_slice") or {}
        cells = [run, r["method"], r["mode"], "-" if r.get("batch") is None else str(r["batch"]),
                 fmt(r.get("train_episodes_per_s"), 3), fmt(r.get("train_gflop_per_episode"), 1),
                 percent(derived["train_peak_fraction"]), fmt(r.get("eval_slices_per_s"), 2),
                 fmt(r.get("eval_gflop_per_slice"), 1), percent(derived["eval_peak_fraction"]),
                 fmt(split.get("encoder"), 1), fmt(split.get("head"), 1), fmt(split.get("refinement"), 1),
                 fmt(r.get("device_peak_mb"), 0), fmt(r.get("dice"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def train_and_evaluate_qnet(data_dir: Path, work: Path, episodes: int, device_name: str = "cuda") -> dict:
    """Q-Net with the defaults on the device: train `episodes` episodes, evaluate fold 0 (in this process)."""

    exp = mode_config("qnet", "fast", device_name, data_dir, work, 0,
                      {"train.n_steps": episodes, "train.snapshot_every": episodes, "train.checkpoint_every": episodes,
                       "train.print_every": max(episodes // 5, 1), "evaluation.amp": "off",
                       "evaluation.n_overlays": 0, "evaluation.save_predictions": False})
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    snapshot = train(exp, work / "qnet_train", progress=False)
    if cuda:
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    exp = dataclasses.replace(exp, evaluation=dataclasses.replace(exp.evaluation, checkpoint=str(snapshot)))
    result = evaluate(exp, None, progress=False)
    return {"batch": episodes_per_step(exp.train, device), "train_episodes_per_s": episodes / train_seconds,
            "eval_slices_per_s": result.n_query_slices / max(result.seconds, 1e-9),
            "device_peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None,
            "dice": result.mean()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds after which no further run starts (default 360: the last run then ends within 8 minutes)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--scans", type=int, default=10)
    parser.add_argument("--qnet-episodes", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    parser.add_argument("--steps", type=int, default=10, help="timed benchmark steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed benchmark steps first")
    parser.add_argument("--work", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check.md"))
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)   # cpu: a smoke run of this script
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not cuda_available():
        print(no_cuda_message())
        return 0


    start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - start)    # noqa: E731
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    print(f"gpu_check on {name} (torch {torch.__version__}, CUDA {torch.version.cuda}); budget {args.budget:.0f} s",
          flush=True)
    data_dir = prepare_data(args.work / f"SYNTH_{args.size}_{args.slices}x{args.scans}", args.size, args.slices,
                            args.methods, args.scans)
    print(f"phantoms ready in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    print(f"measuring the peaks of {args.device} ...", flush=True)
    try:
        peak_run = measure_peaks(PEAK_SIZE, args.device)
    except Exception as err:                    # report, and go on without the % peak columns
        print(f"peak measurement failed: {type(err).__name__}: {err}", flush=True)
        peak_run = {"device": args.device, "peaks": {"fp32": None, "bf16": None}, "kernels": []}

    row = {"run": f"train {args.qnet_episodes} ep + evaluate fold 0", "method": "qnet", "mode": "defaults"}
    print(f"training Q-Net {args.qnet_episodes} episodes, then evaluating fold 0 ...", flush=True)
    try:
        row.update(train_and_evaluate_qnet(data_dir, args.work / "qnet", args.qnet_episodes, args.device))
    except Exception as err:                    # report, and go on with the benchmark
        row["skipped"] = f"failed: {type(err).__name__}: {err}"[:200]
    rows.append(row)

    for method in args.methods:
        for mode in MODES:
            row = {"run": "benchmark", "method": method, "mode": mode}
            rows.append(row)
            if left() <= 0:
                row["skipped"] = "time budget spent"
                continue
            print(f"benchmark {method} {mode} on {args.device} ({left():.0f} s of the budget left) ...", flush=True)
            exp = mode_config(method, mode, args.device, data_dir, args.work / "benchmark", 0, image_size=args.size)
            try:
                row.update(spawn(exp, args.work / "benchmark" / f"{method}_{mode}", args))
            except Exception as err:
                row["skipped"] = f"failed: {type(err).__name__}: {getattr(err, 'last_line', str(err))[-160:]}"

    title = (f"gpu_check on {name}, phantoms {args.size}x{args.size} ({args.scans} scans x {args.slices} slices), "
             f"fold 0, random encoder weights; {time.perf_counter() - start:.0f} s")
    peaks = peak_run["peaks"]
    text = format_table(rows, title, peaks) + (
        f"\nPeaks of {name} (best of 3 repeats; % peak is against bf16's for a bf16 mode, fp32's otherwise): "
        f"fp32 {fmt(peaks['fp32'], 1)} GFLOP/s, bf16 {fmt(peaks.get('bf16'), 1)} GFLOP/s\n\n" + peaks_table([peak_run]))
    refinement = refinement_lines([{**r, "device": args.device} for r in rows if not r.get("skipped")])
    if refinement:
        text += "\nTest-time refinement against the encoder, per evaluated slice:\n" + "\n".join(refinement) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written: {args.out}")
    return 1 if any(str(r.get("skipped", "")).startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
