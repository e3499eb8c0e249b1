"""Training and evaluation speed, reference-like against fast mode, for every method: one table,
with each number set against the machine's own peak.

    python -m scripts.benchmark [--methods adnet qnet ...] [--devices cpu cuda] [--size 256]
                                [--steps 10] [--warmup 3] [--batch-episodes 4] [--threads N] [--peak-size 256]
                                [--out results/benchmark.md]
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

Roofline columns:

- peaks (`measure_peaks`, on each device measured, in the parent before its runs): the best rate of
  a few kernels, best of 3 repeats after warm-up calls: the dilated 3 x 3 convolutions that hold
  most of the encoders' work (256 -> 256 channels, Q-Net's layer3 at S/4 with dilation 4 and the
  deeplab layout's layer3 at S/8 with dilation 2, both memory formats, 2 images on the CPU, 16
  on CUDA) and a square matmul (8 S on the CPU, at most 2048; 8192 on CUDA), S = --peak-size
  (256, the real data's size, whatever --size: smaller kernels do not reach the peak); fp32, and bf16 where the device
  runs it natively (CUDA with bf16 support, a CPU with AVX512-BF16/AMX). The peak of a dtype is the
  best of its kernels. fp32 is what torch runs by default, as the model does: on CUDA cuDNN's
  convolutions use TF32 (torch.backends.cudnn.allow_tf32), matmuls full fp32.
- FLOPs (torch.utils.flop_counter.FlopCounterMode: convolutions and matrix products, forward and
  backward; elementwise ops, normalisation and the optimizer are not counted): one training step
  as the trainer runs it (forward, backward, SGD step) divided by its episodes; per evaluated slice
  the encoder's FLOPs per image times the images the evaluation encoded, plus the head's FLOPs of
  its first support state and first query batch times the number of support states and query
  slices (the head's work per slice barely varies), divided by the query slices scored.
- achieved GFLOP/s = GFLOP per episode (slice) x episodes (slices) per second; % peak against the
  bf16 peak where the mode's encoder runs in bf16 (train.amp / evaluation.amp), the fp32 peak
  otherwise (the heads run in fp32, except the 3 x 3 convolutions of GMRD's decoders, which follow the
  encoder's autocast; apart from those the heads are a small share of the FLOPs).
- evaluation split, ms per scored slice: the model's `encode` calls (encoder), `prepare_support`
  and `segment_prepared` (head), and within them Q-Net's test-time refinement
  (`refine_prototypes`), each timed in the child with torch.cuda.synchronize on CUDA. What is left
  of 1000 / slices-per-s is the predictor's own work (slicing, argmax, copies, Dice).

The machine's state is recorded with the numbers: torch threads, cores, and the load average
(os.getloadavg) at the start and the end; a warning is printed (and written) when the load at the
start exceeds the cores the benchmark's threads leave free, since then other jobs take cores from
the timed runs and the fast / reference ratios mean little (on a shared machine, --threads).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from configs.experiment import build_config, method_names
from data.core.cli import add_logging_arguments, run_cli
from data.core.errors import ConfigError, UserError
from data.core.io import check_output_folder
from data.core.specs import load_spec
from data.phantoms import generate_phantoms
from data.pseudolabels import generate_pseudolabels
from dataloaders.episodes import collate_episodes
from models.engine.builders import (
    autocast_dtype,
    build_episode_dataset,
    cpu_has_fast_bf16,
    episodes_per_step,
    fold_data,
    protocol_options,
    resolve_device,
    supp_idx_problem,
)
from models.engine.evaluation import Evaluator, evaluate
from models.engine.experiment import Experiment
from models.engine.trainer import StepRunner, lr_at, make_optimizer, prepare_model, seed_everything, train

log = logging.getLogger(__name__)

MODES = {
    "reference": {"train.batch_episodes": 1, "train.amp": "off", "train.channels_last": False,
                  "augment.on_device": False, "evaluation.batch_size": 1, "evaluation.cache_features": False,
                  "evaluation.amp": "off"},
    "fast": {"train.batch_episodes": "auto", "train.amp": "auto", "train.channels_last": "auto",
             "augment.on_device": True, "evaluation.batch_size": "auto", "evaluation.cache_features": True,
             "evaluation.amp": "auto"},
}
SUPERPIXEL_METHODS = ("alpnet", "dspnet")

# The encoders reduce an image 8-fold (models/encoder.py: both layouts' last map is size/8), so the
# size must be a multiple of 8 for the feature grid to cover whole pixels, and at least 32 for a
# 4 x 4 last map.
SIZE_MULTIPLE = 8
MIN_SIZE = 32
# Fold 0 of five needs 6 scans (data/core/specs.py Fold); every phantom holds all four organs from
# 4 slices on (scans 1-12 checked at 32 and 64 pixels), 6 leaves a margin.
MIN_SCANS = 6
MIN_SLICES = 6
# Load (runnable processes, 1-minute average) tolerated on the cores the threads leave free before
# the warning: a quiet machine still shows a few tenths.
LOAD_TOLERANCE = 0.5
PEAK_SIZE = 256                 # the real data's size: the peak kernels' shapes, whatever --size
REFINEMENT_BUDGET = 0.20        # issue 24: Q-Net's refinement at most 20 % of its encoder time per slice


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=method_names(), choices=method_names(),
                        help="methods to time (default: all, configs/methods/*.yaml)")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="cpu, cuda or cuda:N (default: cpu, and cuda if present)")
    parser.add_argument("--size", type=int, default=256,
                        help=f"image size, a multiple of {SIZE_MULTIPLE}, at least {MIN_SIZE} (phantoms are "
                             f"generated at this size)")
    parser.add_argument("--slices", type=int, default=24,
                        help=f"slices per phantom, at least {MIN_SLICES} (the real scans have 11-46)")
    parser.add_argument("--scans", type=int, default=10,
                        help=f"phantoms, at least {MIN_SCANS} (fold 0 evaluates scans 1-2 with 3 as support)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (at least 1)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed training steps first (oneDNN builds its kernels on the first calls)")
    parser.add_argument("--batch-episodes", type=int, default=0,
                        help="episodes per step in fast mode (default 0: the config's auto, 8 on CUDA, 1 on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every run and in the peak measurement (default: torch's, one per "
                             "core); on a shared machine, the cores other jobs leave free")
    parser.add_argument("--peak-size", type=int, default=PEAK_SIZE,
                        help=f"image size whose encoder shapes the peak kernels take (default {PEAK_SIZE}, the real "
                             f"data's, whatever --size: small shapes do not reach the machine's peak; smaller only "
                             f"for quick checks)")
    parser.add_argument("--modes", nargs="+", default=["reference", "fast"], choices=list(MODES))
    parser.add_argument("--quality", type=int, default=0,
                        help="also train this many episodes in each mode and compare the Dice (slow)")
    parser.add_argument("--data-dir", type=Path, default=Path("runs/benchmark/data"),
                        help="where the phantoms are written (and kept); the runs' work folder is its sibling "
                             "'work'")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark.md"), help="the table, as markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-quality", action="store_true", help=argparse.SUPPRESS)
    add_logging_arguments(parser)
    return parser


def _at_least(flag: str, value: int, low: int, why: str, default) -> None:
    if value < low:
        raise ConfigError(f"{flag} {value} is too small: {why}; use {flag} {low} or more (default {default})")


def check_size(size: int, flag: str = "--size") -> None:
    _at_least(flag, size, MIN_SIZE, f"the encoders reduce an image 8-fold, so {MIN_SIZE} pixels leave a "
              f"4 x 4 last feature map and fewer leave almost nothing", 256)
    if size % SIZE_MULTIPLE:
        lower, upper = size // SIZE_MULTIPLE * SIZE_MULTIPLE, (size // SIZE_MULTIPLE + 1) * SIZE_MULTIPLE
        raise ConfigError(f"{flag} {size} is not a multiple of {SIZE_MULTIPLE}: the encoders reduce an image "
                          f"8-fold and their feature grid must cover whole pixels; use {flag} {lower} or {upper}")


def check_fold_zero(scans: int, slices: int) -> None:
    """Fold 0's protocol on `scans` phantoms of `slices` slices: a support scan, a query scan and
    training scans, each holding every organ."""
    _at_least("--scans", scans, MIN_SCANS, f"five-fold evaluation needs {MIN_SCANS} scans (fold 0 tests scans "
              f"1-2 with the next scan as support, and trains on the rest)", 10)
    _at_least("--slices", slices, MIN_SLICES, "with fewer slices some phantoms miss an organ, and fold 0's "
              "protocol needs every class (liver, kidneys, spleen) in the support scan and each query", 24)
    spec = load_spec("SYNTH")
    fold = spec.fold(tuple(range(1, scans + 1)), 0)
    problem = supp_idx_problem(-1, len(fold.test_ids), 0, spec.name)
    if problem or len(fold.support_and_queries(-1)[1]) < 1 or not fold.train_ids:
        raise ConfigError(f"--scans {scans}: fold 0 of {scans} phantoms has no support, query or training scan "
                          f"({problem or fold}); use --scans 10 (the default)")


def check_devices(devices: Sequence[str] | None) -> list[str]:
    """The devices to measure, each 'cpu', 'cuda' or 'cuda:N' that this machine has."""
    import torch

    if devices is None:
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for name in devices:
        match = re.fullmatch(r"cuda(?::(\d+))?", name)
        if name != "cpu" and not match:
            raise ConfigError(f"--devices {name}: unknown device; name cpu, cuda or cuda:N (e.g. --devices cpu cuda)")
        if match and not torch.cuda.is_available():
            raise ConfigError(f"--devices {name}: no CUDA device is available here (torch {torch.__version__}, "
                              f"built with CUDA {torch.version.cuda or 'none'}); use --devices cpu, or run on a "
                              f"machine with a GPU")
        if match and match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise ConfigError(f"--devices {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0..cuda:{torch.cuda.device_count() - 1}; name one of them")
    return list(dict.fromkeys(devices))


def check_writable_folder(flag: str, folder: Path) -> None:
    """`folder` is a directory or can be made one, writable and with free space
    (data.core.io.check_output_folder), or a ConfigError naming the flag."""
    try:
        check_output_folder(folder, "the folder")
    except UserError as err:
        raise ConfigError(f"{flag}: {err}") from None


def check_arguments(args) -> list[str]:
    """Every value checked before anything is written: ConfigError naming the flag, what is wrong and
    the fix. Returns the devices to measure."""
    check_size(args.size)
    check_size(args.peak_size, "--peak-size")
    _at_least("--steps", args.steps, 1, "at least one timed training step is needed", 10)
    _at_least("--warmup", args.warmup, 0, "untimed steps cannot be negative", 3)
    check_fold_zero(args.scans, args.slices)
    _at_least("--quality", args.quality, 0, "0 skips the Dice comparison, a positive count trains that many "
              "episodes", 0)
    _at_least("--batch-episodes", args.batch_episodes, 0, "0 takes the config's auto, a positive count sets "
              "the episodes per step", 0)
    if args.threads is not None:
        _at_least("--threads", args.threads, 1, "torch needs at least one thread", "one per core")
    devices = check_devices(args.devices)
    if args.out.exists() and args.out.is_dir():
        raise ConfigError(f"--out: {args.out} is a folder; name the markdown file to write, e.g. "
                          f"{args.out / 'benchmark.md'}")
    check_writable_folder("--out", args.out.parent)
    check_writable_folder("--data-dir", args.data_dir)
    check_writable_folder("--data-dir (its sibling 'work', the runs' folder)", args.data_dir.parent / "work")
    return devices


# ----------------------------------------------------------------------------- data and configs
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


# ----------------------------------------------------------------------------- timing and counting
def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable, *args, **kwargs) -> tuple[object, int]:
    """(fn(*args, **kwargs), the FLOPs torch.utils.flop_counter counts in it: convolutions and matrix
    products, forward and backward, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())


def best_seconds(fn: Callable[[], object], device, repeats: int = 3, min_repeat_s: float = 0.05,
                 warmup_calls: int = 2) -> float:
    """Seconds per call of `fn`: the best of `repeats` repeats, each the mean of enough calls to last
    `min_repeat_s` (calibrated on one call), after `warmup_calls` untimed calls (oneDNN and cuDNN pick
    and build their kernels on the first ones)."""
    for _ in range(warmup_calls):
        fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    calls = max(1, math.ceil(min_repeat_s / max(time.perf_counter() - start, 1e-9)))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def bf16_native(device) -> bool:
    """Whether the device runs bf16 natively (else bf16 is emulated and its "peak" means nothing)."""
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def peak_kernels(size: int, device) -> list[tuple[str, Callable]]:
    """(name, make(dtype, channels_last) -> a no-argument call) of the kernels `measure_peaks` times:
    the encoders' dilated 3 x 3 convolutions at `size` and a square matmul (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    cuda = device.type == "cuda"
    images, n = (16, 8192) if cuda else (2, min(2048, 8 * size))     # 2048 from --size 256 on

    def conv(side: int, dilation: int) -> Callable:
        def make(dtype, channels_last: bool):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(images, 256, side, side, device=device, dtype=dtype).contiguous(memory_format=fmt)
            w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=fmt)
            return lambda: F.conv2d(x, w, padding=dilation, dilation=dilation)
        return make

    def matmul(dtype, channels_last: bool):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        return lambda: a @ b

    return [(f"conv3x3 256ch dil4 {size // 4}x{size // 4} x{images} (qnet_r101 layer3)", conv(size // 4, 4)),
            (f"conv3x3 256ch dil2 {size // 8}x{size // 8} x{images} (deeplab_r101 layer3)", conv(size // 8, 2)),
            (f"matmul {n}x{n}x{n}", matmul)]


def measure_peaks(size: int, device_name: str, repeats: int = 3) -> dict:
    """The device's peak GFLOP/s per dtype, from `peak_kernels`: {"device", "peaks": {"fp32": .., "bf16": ..
    or None}, "kernels": [{"kernel", "dtype", "format", "gflop", "gflops"}]}."""
    import torch

    device = resolve_device(device_name)
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if bf16_native(device) else {})}
    kernels = []
    with torch.no_grad():
        for name, make in peak_kernels(size, device):
            formats = (False, True) if name.startswith("conv") else (False,)
            for dtype_name, dtype in dtypes.items():
                for channels_last in formats:
                    call = make(dtype, channels_last)
                    _, flops = count_flops(call)
                    seconds = best_seconds(call, device, repeats)
                    kernels.append({"kernel": name, "dtype": dtype_name,
                                    "format": "channels_last" if channels_last else "NCHW",
                                    "gflop": flops / 1e9, "gflops": flops / 1e9 / seconds})
    peaks = {d: max((k["gflops"] for k in kernels if k["dtype"] == d), default=None) for d in ("fp32", "bf16")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": device_name, "device_name": name, "threads": torch.get_num_threads(), "peaks": peaks,
            "kernels": kernels}


class EvalProbe:
    """Times the model calls the predictor makes (models/engine/predictor.py): `encode` (encoder),
    `prepare_support` and `segment_prepared` (head), and inside them the head's `refine_prototypes`
    if it has one (Q-Net's test-time refinement), each bracketed by torch.cuda.synchronize on CUDA.
    It wraps the bound methods on the instances (nothing in models/ changes) and keeps the first
    call's inputs of each kind, so their FLOPs can be counted afterwards (`count`)."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.seconds = {"encoder": 0.0, "head": 0.0, "refinement": 0.0}
        self.images_encoded = self.support_states = self.query_slices = 0
        self.first: dict[str, tuple] = {}
        # encode calls per set of maps asked for (None: all the head reads; GMRD's query slices ask
        # for layer3 alone, models/heads/contract.py query_maps): images and the first call's image
        self.encoded: dict[tuple | None, list] = {}
        self.refinement_timed = False
        self._wrapped: list[tuple[object, str]] = []

    def _timed(self, owner, name: str, part: str, record: Callable[[tuple, dict], None] | None = None) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if record is not None:
                record(args, kwargs)
            _sync(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            _sync(self.device)
            self.seconds[part] += time.perf_counter() - start
            return out

        setattr(owner, name, timed)        # an instance attribute shadows the method
        self._wrapped.append((owner, name))

    def _record_encode(self, args, kwargs) -> None:
        images, maps = args[0], kwargs.get("maps", args[1] if len(args) > 1 else None)
        self.images_encoded += images.shape[0]
        seen = self.encoded.setdefault(None if maps is None else tuple(maps), [0, images[:1]])
        seen[0] += images.shape[0]

    def _record_support(self, args, kwargs) -> None:
        self.support_states += 1
        self.first.setdefault("prepare_support", args)

    def _record_segment(self, args, kwargs) -> None:
        self.query_slices += next(iter(args[1].values())).shape[1]
        self.first.setdefault("segment_prepared", args)

    def install(self) -> "EvalProbe":
        self._timed(self.model, "encode", "encoder", self._record_encode)
        self._timed(self.model, "prepare_support", "head", self._record_support)
        self._timed(self.model, "segment_prepared", "head", self._record_segment)
        self.refinement_timed = callable(getattr(self.model.head, "refine_prototypes", None))
        if self.refinement_timed:
            self._timed(self.model.head, "refine_prototypes", "refinement")
        elif self.refines():
            log.warning("%s refines at test time but has no refine_prototypes to time: its refinement time is "
                        "counted as head time", type(self.model.head).__name__)
        return self

    def remove(self) -> None:
        for owner, name in self._wrapped:
            del owner.__dict__[name]
        self._wrapped.clear()

    def refines(self) -> bool:
        return int(getattr(self.model.head, "refine_steps", 0) or 0) > 0

    def count(self, autocast) -> dict:
        """FLOPs of the calls seen: {"encoder", "head", "refinement"} summed over the evaluation, each
        from the first call of its kind scaled by the count (refinement: the first query batch with the
        configured refine_steps minus with 0). Call after `remove`, with the predictor's autocast."""
        import torch

        flops = {"encoder": 0.0, "head": 0.0, "refinement": 0.0}
        with torch.no_grad(), autocast():
            for maps, (images, first) in self.encoded.items():
                call = (first,) if maps is None else (first, maps)
                flops["encoder"] += count_flops(self.model.encode, *call)[1] * images
            if "prepare_support" in self.first:
                flops["head"] += count_flops(self.model.prepare_support, *self.first["prepare_support"])[1] \
                    * self.support_states
            if "segment_prepared" in self.first:
                state, query = self.first["segment_prepared"]
                per_slice = self.query_slices / next(iter(query.values())).shape[1]
                with_refinement = count_flops(self.model.segment_prepared, state, query)[1]
                without = with_refinement
                if self.refines():
                    steps, self.model.head.refine_steps = self.model.head.refine_steps, 0
                    try:
                        without = count_flops(self.model.segment_prepared, state, query)[1]
                    finally:
                        self.model.head.refine_steps = steps
                flops["head"] += without * per_slice
                flops["refinement"] = (with_refinement - without) * per_slice
        return flops


def measure(exp: Experiment, steps: int, warmup: int) -> dict:
    """Training episodes/s and evaluation slices/s of one configuration (run in a child process), with
    the FLOPs of one training step (an extra, untimed step after the timed ones) and of the evaluation
    (`EvalProbe`), and the evaluation's split into encoder, head and refinement time."""
    import torch

    device = resolve_device(exp.device)
    seed_everything(int(exp.seed))
    spec, store, fold = fold_data(exp)
    dataset = build_episode_dataset(exp, store, fold.train_ids, int(exp.seed))
    model = prepare_model(exp, device).train()
    runner = StepRunner(model, make_optimizer(model, exp.optim), exp.train, exp.loss, exp.augment, device)
    B = episodes_per_step(exp.train, device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=B, sampler=range((steps + warmup + 1) * B),
                                         collate_fn=collate_episodes, num_workers=int(exp.train.num_workers))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, train_rate, train_flops = None, None, None
    for i, batch in enumerate(loader):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        if i == warmup + steps:                        # the extra step: counted, not timed
            _sync(device)
            train_rate = steps * B / (time.perf_counter() - start)
            train_flops = count_flops(runner, batch, lr_at(i * B, exp.optim, exp.train, B))[1]
            break
        runner(batch, lr_at(i * B, exp.optim, exp.train, B))
    _sync(device)

    eval_dtype = autocast_dtype(exp.evaluation.amp, device, "evaluation.amp")
    evaluator = Evaluator(model, store, spec, fold, protocol_options(exp.evaluation, device), device=device,
                          autocast_dtype=eval_dtype, progress=False)
    probe = EvalProbe(model, device).install()
    try:
        result = evaluator.run(spec.eval_labels)
    finally:
        probe.remove()
    _sync(device)
    eval_flops = probe.count(evaluator.predictor.autocast)
    n = max(result.n_query_slices, 1)
    train_dtype = autocast_dtype(exp.train.amp, device)
    return {
        "batch": B,
        "threads": torch.get_num_threads(),
        "train_episodes_per_s": train_rate,
        "train_gflop_per_episode": train_flops / B / 1e9,
        "train_dtype": "bf16" if train_dtype is not None else "fp32",
        "eval_slices_per_s": result.n_query_slices / result.seconds,
        "eval_slices": result.n_query_slices,
        "eval_gflop_per_slice": sum(eval_flops.values()) / n / 1e9,
        "eval_gflop_split": {k: v / n / 1e9 for k, v in eval_flops.items()},
        "eval_dtype": "bf16" if eval_dtype is not None else "fp32",
        "eval_ms_per_slice": {"encoder": 1e3 * probe.seconds["encoder"] / n,
                              "head": 1e3 * (probe.seconds["head"] - probe.seconds["refinement"]) / n,
                              "refinement": 1e3 * probe.seconds["refinement"] / n
                              if probe.refines() and probe.refinement_timed else None},
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


# ----------------------------------------------------------------------------- processes
def set_threads(threads: int | None) -> None:
    import torch
    if threads is not None:
        torch.set_num_threads(threads)


def run_child(args) -> int:
    set_threads(args.threads)
    exp = Experiment.from_config(json.loads(Path(args.child).read_text()))
    out = quality(exp, Path(args.child).parent) if args.child_quality else measure(exp, args.steps, args.warmup)
    print("RESULT " + json.dumps(out))
    return 0


class BenchmarkChildError(UserError):
    """A benchmark run (a child process) failed. The message names the run, the child's last error
    line and the file holding its whole output; `last_line` is that line."""

    def __init__(self, message: str, last_line: str):
        super().__init__(message)
        self.last_line = last_line


def last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output on stderr)"


def spawn(exp: Experiment, work: Path, args, quality_run: bool = False) -> dict:
    """Run one configuration in its own process; its result dict. A failed child raises
    BenchmarkChildError with its last error line; its stderr is kept in work/child_stderr.txt."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(exp.to_config()))
    cmd = [sys.executable, "-m", "scripts.benchmark", "--child", str(cfg_path), "--steps", str(args.steps),
           "--warmup", str(args.warmup)] + (["--child-quality"] if quality_run else [])
    if getattr(args, "threads", None) is not None:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        log_path = work / "child_stderr.txt"
        log_path.write_text(out.stderr)
        last = last_error_line(out.stderr)
        raise BenchmarkChildError(
            f"the benchmark run of {exp.method} on {exp.device} ({work.name}) failed with exit status "
            f"{out.returncode}: {last}\nIts whole output is in {log_path}; rerun it alone with: {' '.join(cmd)}",
            last)
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- machine state
def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:                          # not every platform has it
        return None


def load_warning(load: float | None, threads: int, cores: int) -> str | None:
    """A warning when the 1-minute load at the start exceeds the cores `threads` leave free (plus
    LOAD_TOLERANCE): other jobs then share the benchmark's cores."""
    free = max(cores - threads, 0)
    if load is None or load <= free + LOAD_TOLERANCE:
        return None
    advice = max(cores - math.ceil(load), 1)
    return (f"warning: load average {load:.2f} at the start, but the benchmark's {threads} threads leave "
            f"{free} of {cores} cores free: other jobs share its cores, so its numbers are low and the fast / "
            f"reference ratios unreliable (measured: Q-Net's 2.03x training and 5.29x evaluation fell to 0.88x and "
            f"1.08x beside one single-thread job); run it on a quiet machine, or with --threads {advice}")


# ----------------------------------------------------------------------------- the table
def fmt(v, digits=2):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def fraction_of_peak(gflop_per_item: float | None, items_per_s: float | None, peak_gflops: float | None):
    """(achieved GFLOP/s, its fraction of the peak): GFLOP per episode or slice x episodes or slices
    per second, over the peak; None where a number is missing."""
    if gflop_per_item is None or items_per_s is None:
        return None, None
    achieved = gflop_per_item * items_per_s
    return achieved, (achieved / peak_gflops if peak_gflops else None)


def relevant_peak(peaks: dict | None, dtype: str) -> float | None:
    """The peak a run is held against: bf16's for a bf16 encoder (where measured), fp32's otherwise."""
    if not peaks:
        return None
    if dtype == "bf16" and peaks.get("bf16"):
        return peaks["bf16"]
    return peaks.get("fp32")        # fp32, or bf16 forced on a device without native bf16 (emulated)


def roofline(row: dict, peaks: dict | None) -> dict:
    """The derived columns of one result row: train/eval achieved GFLOP/s and fraction of peak."""
    train, train_frac = fraction_of_peak(row.get("train_gflop_per_episode"), row.get("train_episodes_per_s"),
                                         relevant_peak(peaks, row.get("train_dtype", "fp32")))
    ev, ev_frac = fraction_of_peak(row.get("eval_gflop_per_slice"), row.get("eval_slices_per_s"),
                                   relevant_peak(peaks, row.get("eval_dtype", "fp32")))
    return {"train_gflops": train, "train_peak_fraction": train_frac, "eval_gflops": ev, "eval_peak_fraction": ev_frac}


def percent(v):
    return "-" if v is None else f"{100 * v:.1f}%"


COLUMNS = ("method", "device", "mode", "episodes/step", "threads", "train ep/s", "GFLOP/episode", "train GFLOP/s",
           "train % peak", "eval slices/s", "GFLOP/slice", "eval GFLOP/s", "eval % peak", "encoder ms/slice",
           "head ms/slice", "refinement ms/slice", "host peak MB", "device peak MB")


def row_cells(r: dict, peaks: dict | None) -> list[str]:
    d = roofline(r, peaks)
    split = r.get("eval_ms_per_slice") or {}
    return [r["method"], r["device"], r["mode"], str(r.get("batch", "-")), str(r.get("threads", "-")),
            fmt(r.get("train_episodes_per_s"), 3), fmt(r.get("train_gflop_per_episode"), 1),
            fmt(d["train_gflops"], 1), percent(d["train_peak_fraction"]), fmt(r.get("eval_slices_per_s"), 2),
            fmt(r.get("eval_gflop_per_slice"), 1), fmt(d["eval_gflops"], 1), percent(d["eval_peak_fraction"]),
            fmt(split.get("encoder"), 1), fmt(split.get("head"), 1), fmt(split.get("refinement"), 1),
            fmt(r.get("host_peak_mb"), 0), fmt(r.get("device_peak_mb"), 0)]


def refinement_lines(rows: list[dict]) -> list[str]:
    """One line per run with a test-time refinement: its share of the encoder's time per slice."""
    lines = []
    for r in rows:
        split = r.get("eval_ms_per_slice") or {}
        if split.get("refinement") is None or not split.get("encoder"):
            continue
        share = split["refinement"] / split["encoder"]
        verdict = "within" if share <= REFINEMENT_BUDGET else "over"
        lines.append(f"- {r['method']} {r['device']} {r['mode']}: fp32 refinement {split['refinement']:.1f} ms per "
                     f"slice = {100 * share:.0f}% of the encoder's {split['encoder']:.1f} ms ({verdict} the "
                     f"{100 * REFINEMENT_BUDGET:.0f}% budget)")
    return lines


def peaks_table(peak_runs: list[dict]) -> str:
    lines = ["| device | kernel | dtype | format | GFLOP per call | GFLOP/s |", "|---|---|---|---|---|---|"]
    for p in peak_runs:
        for k in p["kernels"]:
            lines.append(f"| {p['device']} | {k['kernel']} | {k['dtype']} | {k['format']} | {k['gflop']:.2f} "
                         f"| {k['gflops']:.1f} |")
    return "\n".join(lines) + "\n"


def machine_lines(machine: dict) -> list[str]:
    load = lambda key: fmt(machine.get(key), 2)      # noqa: E731
    lines = [f"Machine: {machine['cores']} cores, {machine['threads']} torch threads; load average (1 min) "
             f"{load('load_start')} at the start, {load('load_end')} at the end."]
    return lines + [w for w in machine.get("warnings", [])]


def table(rows: list[dict], size: int, peak_runs: Sequence[dict] = (), machine: dict | None = None) -> str:
    """The markdown report: machine state, peaks, one row per run, fast / reference ratios, and the
    refinement's share of the encoder time."""
    peaks = {p["device"]: p["peaks"] for p in peak_runs}
    lines = [f"Benchmark at {size}x{size} (phantoms, fold 0): training episodes/s, evaluation query slices/s, "
             f"FLOPs against the measured peak, evaluation time per slice, peak memory", ""]
    if machine:
        lines += machine_lines(machine) + [""]
    if peak_runs:
        lines += ["Peaks (best of 3 repeats; the peak of a dtype is its best kernel):", "", peaks_table(peak_runs)]
        for p in peak_runs:
            lines.append(f"- {p['device']} ({p['device_name']}): fp32 {fmt(p['peaks']['fp32'], 1)} GFLOP/s, bf16 "
                         f"{fmt(p['peaks'].get('bf16'), 1) if p['peaks'].get('bf16') else 'not native here'}"
                         f"{' GFLOP/s' if p['peaks'].get('bf16') else ''}")
        lines.append("")
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(row_cells(r, peaks.get(r["device"]))) + " |")
    by_key = {(r["method"], r["device"], r["mode"]): r for r in rows}
    for (method, device, mode), fast in by_key.items():
        ref = by_key.get((method, device, "reference"))
        if mode == "fast" and ref:
            cells = [method, device, "fast / reference", "", "",
                     f"{fast['train_episodes_per_s'] / ref['train_episodes_per_s']:.2f}x", "", "", "",
                     f"{fast['eval_slices_per_s'] / ref['eval_slices_per_s']:.2f}x"] + [""] * (len(COLUMNS) - 10)
            lines.append("| " + " | ".join(cells) + " |")
    refinement = refinement_lines(rows)
    if refinement:
        lines += ["", "Test-time refinement against the encoder, per evaluated slice:", *refinement]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command
def run_benchmark(args, devices: list[str]) -> int:
    import torch

    set_threads(args.threads)
    machine = {"cores": os.cpu_count() or 1, "threads": torch.get_num_threads(), "load_start": load_average()}
    warning = load_warning(machine["load_start"], machine["threads"], machine["cores"])
    machine["warnings"] = [warning] if warning else []
    if warning:
        log.warning(warning.removeprefix("warning: "))
    data_dir = prepare_data(args.data_dir / f"SYNTH_{args.size}_{args.slices}x{args.scans}", args.size, args.slices,
                            args.methods, args.scans)
    work = args.data_dir.parent / "work"
    rows, quality_rows, peak_runs = [], [], []
    for device in devices:
        print(f"measuring the peaks of {device} ...", flush=True)
        peak_runs.append(measure_peaks(args.peak_size, device))
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
    machine["load_end"] = load_average()
    text = table(rows, args.size, peak_runs, machine)
    if quality_rows:
        text += ("\nDice after equal training episodes (fold 0, mean over classes)\n\n"
                 "| method | device | mode | episodes | mean Dice |\n|---|---|---|---|---|\n" + "\n".join(quality_rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    json_path = args.out.with_suffix(".json" if args.out.suffix != ".json" else ".numbers.json")
    json_path.write_text(json.dumps({"machine": machine, "peaks": peak_runs, "runs": rows}, indent=1))
    print(text)
    print(f"written: {args.out} and {json_path}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        return run_cli(lambda: run_child(args), args)

    def body() -> int:
        devices = check_arguments(args)          # before anything is written
        return run_benchmark(args, devices)

    return run_cli(body, args)


if __name__ == "__main__":
    raise SystemExit(main())
