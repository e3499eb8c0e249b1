"""Training and evaluation speed, reference-like against fast mode, for every method: one table.

    python -m scripts.benchmark [--methods adnet qnet ...] [--devices cpu cuda] [--size 256]
                                [--steps 10] [--warmup 3] [--batch-episodes 4] [--out results/benchmark.md]
    python -m scripts.benchmark --methods adnet --quality 600 --size 128    # + Dice after equal episodes

Modes (each a set of config keys; "fast" is what the defaults give):

- reference: one episode per step, fp32, NCHW, augmentation with OpenCV in the loader, evaluation
  slice by slice with support and query re-encoded for every slice and class (the references' loop);
- fast: the defaults: episodes per step and evaluation batch "auto" (8 and 16 on CUDA, 1 and 1 on
  the CPU), bf16 autocast for the encoder (CUDA, or a CPU with native bf16), channels_last,
  augmentation on the device, evaluation with cached features.

Data: synthetic phantoms at --size (written once under --data-dir), fold 0. Each (method, device,
mode) runs in its own process, so its peak host memory (max RSS) is its own; device memory is
torch.cuda.max_memory_allocated. Training episodes/s is timed over --steps steps after --warmup;
evaluation query slices/s over one fold's queries of every class.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from configs.experiment import build_config, method_names
from data.phantoms import generate_phantoms
from data.pseudolabels import generate_pseudolabels
from dataloaders.episodes import collate_episodes
from models.engine.builders import (
    autocast_dtype,
    build_episode_dataset,
    episodes_per_step,
    fold_data,
    protocol_options,
    resolve_device,
)
from models.engine.evaluation import Evaluator, evaluate
from models.engine.experiment import Experiment
from models.engine.trainer import StepRunner, lr_at, make_optimizer, prepare_model, seed_everything, train

MODES = {
    "reference": {"train.batch_episodes": 1, "train.amp": "off", "train.channels_last": False,
                  "augment.on_device": False, "evaluation.batch_size": 1, "evaluation.cache_features": False,
                  "evaluation.amp": "off"},
    "fast": {"train.batch_episodes": "auto", "train.amp": "auto", "train.channels_last": "auto",
             "augment.on_device": True, "evaluation.batch_size": "auto", "evaluation.cache_features": True,
             "evaluation.amp": "auto"},
}
SUPERPIXEL_METHODS = ("alpnet", "dspnet")


def prepare_data(data_dir: Path, size: int, slices: int, methods, n_scans: int = 10) -> Path:
    generate_phantoms(data_dir, n_scans=n_scans, size=size, slices=slices, progress=False)
    if any(m in SUPERPIXEL_METHODS for m in methods):
        generate_pseudolabels(data_dir, "SYNTH", kind="superpixels", progress=False, summary=False)
    return data_dir


def mode_config(method: str, mode: str, device: str, data_dir: Path, log_dir: Path, batch_episodes: int,
                extra: dict | None = None, image_size: int | None = None) -> Experiment:
    """The experiment of one benchmark run. `image_size`: the phantoms' size, given to heads whose layers
    are sized for the image (GMRD's descriptor MLPs: `head.image_size`)."""
    updates = {"device": device, "encoder.weights": "none", "train.num_workers": 0, **MODES[mode]}
    if mode == "fast" and batch_episodes:
        updates["train.batch_episodes"] = batch_episodes
    updates.update(extra or {})
    exp = Experiment.from_config(build_config(method, "SYNTH", data_dir, log_dir, updates=updates))
    if image_size is not None and exp.head.get("image_size") not in (None, image_size):
        updates["head.image_size"] = image_size
        exp = Experiment.from_config(build_config(method, "SYNTH", data_dir, log_dir, updates=updates))
    return exp


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(exp: Experiment, steps: int, warmup: int) -> dict:
    """Training episodes/s and evaluation slices/s of one configuration (run in a child process)."""
    import torch

    device = resolve_device(exp.device)
    seed_everything(int(exp.seed))
    spec, store, fold = fold_data(exp)
    dataset = build_episode_dataset(exp, store, fold.train_ids, int(exp.seed))
    model = prepare_model(exp, device).train()
    runner = StepRunner(model, make_optimizer(model, exp.optim), exp.train, exp.loss, exp.augment, device)
    B = episodes_per_step(exp.train, device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=B, sampler=range((steps + warmup) * B),
                                         collate_fn=collate_episodes, num_workers=int(exp.train.num_workers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = None
    for i, batch in enumerate(loader):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        runner(batch, lr_at(i * B, exp.optim, exp.train, B))
    _sync(device)
    train_rate = steps * B / (time.perf_counter() - start)

    evaluator = Evaluator(model, store, spec, fold, protocol_options(exp.evaluation, device), device=device,
                          autocast_dtype=autocast_dtype(exp.evaluation.amp, device, "evaluation.amp"), progress=False)
    result = evaluator.run(spec.eval_labels)
    _sync(device)
    return {
        "batch": B,
        "train_episodes_per_s": train_rate,
        "eval_slices_per_s": result.n_query_slices / result.seconds,
        "eval_slices": result.n_query_slices,
        "host_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def quality(exp: Experiment, log_dir: Path) -> dict:
    """Train the experiment's n_steps episodes with the real trainer, then evaluate fold 0: mean Dice."""
    snapshot = train(exp, log_dir / "run", progress=False)
    exp = dataclasses.replace(exp, evaluation=dataclasses.replace(
        exp.evaluation, checkpoint=str(snapshot), n_overlays=0, save_predictions=False))
    return {"dice": evaluate(exp, None, progress=False).mean()}


def run_child(args) -> int:
    exp = Experiment.from_config(json.loads(Path(args.child).read_text()))
    out = quality(exp, Path(args.child).parent) if args.child_quality else measure(exp, args.steps, args.warmup)
    print("RESULT " + json.dumps(out))
    return 0


def spawn(exp: Experiment, work: Path, args, quality_run: bool = False) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(exp.to_config()))
    cmd = [sys.executable, "-m", "scripts.benchmark", "--child", str(cfg_path), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--child-quality"] if quality_run else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict], size: int) -> str:
    lines = [f"Benchmark at {size}x{size} (phantoms, fold 0): training episodes/s, evaluation query slices/s, "
             f"peak memory", "",
             "| method | device | mode | episodes/step | train ep/s | eval slices/s | host peak MB | device peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['device']} | {r['mode']} | {r['batch']} | {fmt(r['train_episodes_per_s'], 3)} "
                     f"| {fmt(r['eval_slices_per_s'], 2)} | {fmt(r['host_peak_mb'], 0)} | {fmt(r['device_peak_mb'], 0)} |")
    by_key = {(r["method"], r["device"], r["mode"]): r for r in rows}
    for (method, device, mode), fast in by_key.items():
        ref = by_key.get((method, device, "reference"))
        if mode == "fast" and ref:
            lines.append(f"| {method} | {device} | fast / reference | | "
                         f"{fast['train_episodes_per_s'] / ref['train_episodes_per_s']:.2f}x | "
                         f"{fast['eval_slices_per_s'] / ref['eval_slices_per_s']:.2f}x | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=method_names(), choices=method_names(),
                        help="methods to time (default: all, configs/methods/*.yaml)")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, and cuda if present)")
    parser.add_argument("--size", type=int, default=256, help="image size (phantoms are generated at this size)")
    parser.add_argument("--slices", type=int, default=24, help="slices per phantom (the real scans have 11-46)")
    parser.add_argument("--scans", type=int, default=10, help="phantoms (fold 0 evaluates scans 1-2 with 3 as support)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed training steps first (oneDNN builds its kernels on the first calls)")
    parser.add_argument("--batch-episodes", type=int, default=0,
                        help="episodes per step in fast mode (default: the config's auto, 8 on CUDA, 1 on CPU)")
    parser.add_argument("--modes", nargs="+", default=["reference", "fast"], choices=list(MODES))
    parser.add_argument("--quality", type=int, default=0,
                        help="also train this many episodes in each mode and compare the Dice (slow)")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/benchmark/data"))
    parser.add_argument("--out", type=Path, default=Path("results/benchmark.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-quality", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)

    import torch
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    data_dir = prepare_data(args.data_dir / f"SYNTH_{args.size}_{args.slices}x{args.scans}", args.size, args.slices,
                            args.methods, args.scans)
    work = args.data_dir.parent / "work"
    rows, quality_rows = [], []
    for method in args.methods:
        for device in devices:
            for mode in args.modes:
                exp = mode_config(method, mode, device, data_dir, work, args.batch_episodes, image_size=args.size)
                print(f"measuring {method} on {device}, {mode} mode ...", flush=True)
                r = spawn(exp, work / f"{method}_{device}_{mode}", args)
                rows.append({"method": method, "device": device, "mode": mode, **r})
                if args.quality:
                    qexp = mode_config(method, mode, device, data_dir, work, args.batch_episodes,
                                       {"train.n_steps": args.quality, "train.snapshot_every": args.quality,
                                        "train.checkpoint_every": args.quality, "train.print_every": args.quality},
                                       image_size=args.size)
                    q = spawn(qexp, work / f"{method}_{device}_{mode}_quality", args, quality_run=True)
                    quality_rows.append(f"| {method} | {device} | {mode} | {args.quality} | {q['dice']:.4f} |")
    text = table(rows, args.size)
    if quality_rows:
        text += ("\nDice after equal training episodes (fold 0, mean over classes)\n\n"
                 "| method | device | mode | episodes | mean Dice |\n|---|---|---|---|---|\n" + "\n".join(quality_rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
