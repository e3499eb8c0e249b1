"""The training loop shared by every method.

Schedule: `train.n_steps` counts episodes. Each step draws `train.batch_episodes` (B) episodes per
process; the step's loss is the mean of its episodes' losses; the learning rate is multiplied by
`optim.lr_step_gamma` every `optim.lr_step_every` episodes (the references step a MultiStepLR every
iteration with milestones 1000, 2000, ..., (n_steps // 1000 - 1) * 1000: the same for B = 1).

Episodes: episode i is a pure function of (seed, i) (see the samplers), so a run is reproducible
with any number of DataLoader workers. Under torchrun with N processes, step k of rank r trains on
episodes (k N + r) B ... (k N + r) B + B - 1: the processes together see the episodes a single
process with N B episodes per step would see, and DistributedDataParallel averages their gradients.
Rank 0 alone writes snapshots and logs.

Snapshots: `snapshots/<episodes>.pth` every `train.snapshot_every` episodes and at the end (the
model's state dict under "model", for evaluation), and `snapshots/last.pth` every
`train.checkpoint_every` episodes: everything an exact resume needs (model, optimizer, episodes
seen, RNG states, config). Both are written to a temporary file and renamed, so a crash or kill
never leaves a truncated snapshot and the previous resume point stays until the next is complete.
`train.resume=<run folder>` continues that run in its own folder; on CPU the result is
bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data.io import atomic_path
from dataloaders.augment import AugmentParams
from dataloaders.augment_torch import augment_episode
from dataloaders.episodes import Episode, collate_episodes
from models.builders import (
    autocast_dtype, build_episode_dataset, build_model, episodes_per_step, fold_data, resolve_device,
    use_channels_last,
)
from models.heads.common import episode_nll

log = logging.getLogger(__name__)
SNAPSHOT_FORMAT = 1
RESUME_FILE = "last.pth"
# keys that may differ between a run and its resumption (they do not change what is computed)
RESUMABLE_CHANGES = {"train.resume", "train.num_workers", "train.print_every", "log_dir", "device"}


# ----------------------------------------------------------------------------- schedule
def lr_at(episodes: int, cfg: dict, episodes_per_step: int = 1) -> float:
    """Learning rate for the step that starts after `episodes` episodes.

    With optim.scale_lr_with_batch, the base lr is multiplied by the episodes per step (linear
    scaling): the step's loss is a mean over its episodes, so this keeps the update per episode of
    one-episode steps."""
    o, n_steps = cfg["optim"], int(cfg["train"]["n_steps"])
    every = int(o["lr_step_every"])
    decays = min(episodes // every, max(n_steps // every - 1, 0))
    scale = episodes_per_step if o.get("scale_lr_with_batch", False) else 1
    return float(o["lr"]) * scale * float(o["lr_step_gamma"]) ** decays


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every != before // every


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """SGD over all parameters; a head may scale the lr of some of its parameters
    (`lr_multipliers`: {parameter-name fragment: factor}, e.g. DSPNet's `cal`)."""
    o = cfg["optim"]
    multipliers = getattr(model.head, "lr_multipliers", {}) or {}
    groups = defaultdict(list)
    for name, param in model.named_parameters():
        factor = next((f for frag, f in multipliers.items() if frag in name), 1.0)
        groups[factor].append(param)
    param_groups = [{"params": ps, "lr_factor": f, "lr": float(o["lr"]) * f} for f, ps in groups.items()]
    return torch.optim.SGD(param_groups, lr=float(o["lr"]), momentum=float(o["momentum"]),
                           weight_decay=float(o["weight_decay"]))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)


def step_loss(output, episode: Episode, cfg: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Query NLL (weights [bg_weight, 1], ignore_index) + weighted auxiliary losses."""
    lcfg = cfg["loss"]
    parts = {"query": episode_nll(output.log_probs.float(), episode.query_labels,
                                  [float(lcfg["bg_weight"]), 1.0], int(lcfg["ignore_index"]))}
    weights = lcfg.get("weights", {}) or {}
    for name, value in output.aux_losses.items():
        parts[name] = value.float() * float(weights.get(name, 1.0))
    return sum(parts.values()), parts


class StepRunner:
    """One optimisation step on a collated batch: device transfer, on-device augmentation,
    autocast, loss, backward, SGD step. Used by the training loop and the benchmark."""

    def __init__(self, trained: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: dict,
                 device: torch.device):
        self.trained, self.optimizer, self.cfg, self.device = trained, optimizer, cfg, device
        self.amp = autocast_dtype(cfg["train"]["amp"], device)
        self.augment = AugmentParams.from_config(cfg["augment"])

    def __call__(self, batch: Episode, lr: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        set_lr(self.optimizer, lr)
        episode = augment_episode(batch.to(self.device, non_blocking=True), self.augment)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            output = self.trained(episode.support_images, episode.support_masks, episode.query_images)
        total, parts = step_loss(output, episode, self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return total, parts, episode.batch_size


def prepare_model(cfg: dict, device: torch.device) -> torch.nn.Module:
    model = build_model(cfg).to(device)
    model.set_channels_last(use_channels_last(cfg["train"]["channels_last"], device))
    return model


# ----------------------------------------------------------------------------- distribution
class Distributed:
    """Process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def episode_indices(start_step: int, n_steps_total: int, per_rank: int, world: int, rank: int) -> list[int]:
    """Global episode indices this rank trains on, step after step."""
    return [(k * world + rank) * per_rank + j for k in range(start_step, n_steps_total) for j in range(per_rank)]


# ----------------------------------------------------------------------------- snapshots
def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def save_snapshot(path: Path, model, optimizer, episodes: int, cfg: dict) -> Path:
    state = {"format": SNAPSHOT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "episodes": episodes, "config": cfg, "rng": _rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resumable(saved_cfg: dict, cfg: dict, source: Path) -> None:
    a, b = _flatten(saved_cfg), _flatten(cfg)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        detail = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ValueError(f"cannot resume {source}: the configuration differs ({detail}). Resume with the "
                         f"same named configs and updates as the original run.")


def restore(run_dir: Path, model, optimizer, cfg: dict) -> int:
    """Load the resume point of run_dir into model and optimizer; returns the episodes already seen."""
    path = Path(run_dir) / "snapshots" / RESUME_FILE
    if not path.is_file():
        raise FileNotFoundError(f"train.resume: {path} not found (a run writes it every "
                                f"train.checkpoint_every episodes); nothing to resume from")
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_resumable(state["config"], cfg, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    log.info("resuming %s after %d episodes", run_dir, state["episodes"])
    return int(state["episodes"])


# ----------------------------------------------------------------------------- the loop
def _metrics_history(run_dir: Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def train(cfg: dict, run_dir: Path, log_scalar: Callable[[str, float, int], None] | None = None,
          progress: bool = True) -> Path:
    """Train the configured method; returns the path of the final snapshot."""
    ddp = Distributed(cfg["device"])
    device = ddp.device
    seed_everything(int(cfg["seed"]))
    spec, store, fold = fold_data(cfg)
    log.info("fold %d: training on %d scans %s; held out %s", fold.index, len(fold.train_ids),
             list(fold.train_ids), list(fold.test_ids))
    dataset = build_episode_dataset(cfg, store, fold.train_ids, int(cfg["seed"]))

    model = prepare_model(cfg, device)
    optimizer = make_optimizer(model, cfg)
    run_dir = Path(run_dir)
    episodes = 0
    if cfg["train"].get("resume"):
        episodes = restore(run_dir, model, optimizer, cfg)
        if ddp.is_main:
            from configs.runs import truncate_metrics
            truncate_metrics(run_dir, episodes)
    trained = ddp.wrap(model)
    trained.train()
    step = StepRunner(trained, optimizer, cfg, device)

    tcfg = cfg["train"]
    n_steps, B = int(tcfg["n_steps"]), episodes_per_step(cfg, device)
    if n_steps < 1 or B < 1:
        raise ValueError(f"train.n_steps and train.batch_episodes must be >= 1, got {n_steps}, {B}")
    per_step = B * ddp.world
    total_steps = math.ceil(n_steps / per_step) if ddp.world == 1 else n_steps // per_step
    if episodes % per_step:
        raise ValueError(f"cannot resume after {episodes} episodes with {per_step} episodes per step")
    indices = [i for i in episode_indices(episodes // per_step, total_steps, B, ddp.world, ddp.rank) if i < n_steps]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=B, sampler=indices, collate_fn=collate_episodes,
        num_workers=int(tcfg["num_workers"]), pin_memory=device.type == "cuda",
        persistent_workers=int(tcfg["num_workers"]) > 0)
    snapshots = run_dir / "snapshots"
    if ddp.is_main:
        snapshots.mkdir(parents=True, exist_ok=True)
    every = {k: int(tcfg[k]) for k in ("print_every", "snapshot_every", "checkpoint_every")}
    end = min(n_steps, total_steps * per_step)

    since, t_last, last_path = 0, time.perf_counter(), None
    history = {k: (v["steps"], v["values"]) for k, v in _metrics_history(run_dir).items()} if ddp.is_main else {}
    pending = defaultdict(lambda: torch.zeros((), device=device))
    bar = tqdm(total=end, initial=episodes, desc="training", unit="ep", disable=not (progress and ddp.is_main),
               mininterval=5)
    for batch in loader:
        lr = lr_at(episodes, cfg, per_step)
        total, parts, batch_size = step(batch, lr)
        n = batch_size * ddp.world
        for k, v in parts.items():
            pending[k] += v.detach() * n
        pending["total"] += total.detach() * n
        before, episodes, since = episodes, episodes + n, since + n
        bar.update(n)
        if crossed(before, episodes, every["print_every"]) or episodes == end:
            now = time.perf_counter()
            means = {k: float(v) / since for k, v in pending.items()}   # the only host sync of the step
            if not all(math.isfinite(v) for v in means.values()):
                raise FloatingPointError(f"loss became non-finite after {episodes} episodes: {means}")
            rate = since / (now - t_last)
            if ddp.is_main:
                tqdm.write(f"episodes {episodes:>7d}  lr {lr:.2e}  " + "  ".join(
                    f"{k} {v:.4f}" for k, v in sorted(means.items())) + f"  ({rate:.2f} ep/s)")
                for name, value in [*((f"loss.{k}", v) for k, v in means.items()), ("lr", lr),
                                    ("episodes_per_s", rate)]:
                    steps, values = history.setdefault(name, ([], []))
                    steps.append(episodes)
                    values.append(value)
                    if log_scalar is not None:
                        log_scalar(name, value, episodes)
            pending.clear()
            since, t_last = 0, now
        if ddp.is_main:
            if crossed(before, episodes, every["snapshot_every"]) or episodes == end:
                last_path = save_snapshot(snapshots / f"{episodes}.pth", model, optimizer, episodes, cfg)
            if crossed(before, episodes, every["checkpoint_every"]) or episodes == end:
                save_snapshot(snapshots / RESUME_FILE, model, optimizer, episodes, cfg)
    bar.close()
    if ddp.is_main:
        from dataloaders.reporting import write_training_curves
        write_training_curves(history, run_dir / "curves.png", title=cfg.get("exp_name", ""))
    ddp.close()
    return last_path if last_path is not None else snapshots / f"{episodes}.pth"
