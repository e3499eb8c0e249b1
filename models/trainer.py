"""The training loop shared by every method.

The schedule counts episodes: `train.n_steps` episodes are drawn in steps of `train.batch_episodes`
(B); the loss of a step is the mean of its B episodes' losses; the learning rate is multiplied by
`optim.lr_step_gamma` every `optim.lr_step_every` episodes (the references step a MultiStepLR every
iteration with milestones 1000, 2000, ..., (n_steps // 1000 - 1) * 1000, which is the same for
B = 1).

Snapshots (`snapshots/<episodes>.pth`) hold the model's state dict under "model" plus what resuming
needs (optimizer, episodes seen, RNG states, config). They are written to a temporary file and
renamed, so a crash never leaves a truncated snapshot.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from data.io import atomic_path
from dataloaders.episodes import Episode, collate_episodes
from models.builders import (
    autocast_dtype, build_episode_dataset, build_model, fold_data, resolve_device, use_channels_last,
)
from models.heads.common import episode_nll

log = logging.getLogger(__name__)
SNAPSHOT_FORMAT = 1


def lr_at(episodes: int, cfg: dict) -> float:
    """Learning rate for the step that starts after `episodes` episodes."""
    o, n_steps = cfg["optim"], int(cfg["train"]["n_steps"])
    every = int(o["lr_step_every"])
    decays = min(episodes // every, max(n_steps // every - 1, 0))
    return float(o["lr"]) * float(o["lr_step_gamma"]) ** decays


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


def save_snapshot(path: Path, model, optimizer, episodes: int, cfg: dict) -> Path:
    state = {
        "format": SNAPSHOT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "episodes": episodes,
        "config": cfg,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def train(cfg: dict, run_dir: Path, log_scalar: Callable[[str, float, int], None] | None = None,
          progress: bool = True) -> Path:
    """Train the configured method; returns the path of the final snapshot."""
    device = resolve_device(cfg["device"])
    seed_everything(int(cfg["seed"]))
    spec, store, fold = fold_data(cfg)
    log.info("fold %d: training on %d scans %s; held out %s", fold.index, len(fold.train_ids),
             list(fold.train_ids), list(fold.test_ids))
    dataset = build_episode_dataset(cfg, store, fold.train_ids, int(cfg["seed"]))

    model = build_model(cfg).to(device)
    channels_last = use_channels_last(cfg["train"]["channels_last"], device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(cfg["train"]["amp"], device)
    optimizer = make_optimizer(model, cfg)
    model.train()

    tcfg = cfg["train"]
    n_steps, B = int(tcfg["n_steps"]), int(tcfg["batch_episodes"])
    if n_steps < 1 or B < 1:
        raise ValueError(f"train.n_steps and train.batch_episodes must be >= 1, got {n_steps}, {B}")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=B, sampler=range(0, n_steps), collate_fn=collate_episodes,
        num_workers=int(tcfg["num_workers"]), pin_memory=device.type == "cuda",
        persistent_workers=int(tcfg["num_workers"]) > 0)
    snapshots = Path(run_dir) / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    print_every, snapshot_every = int(tcfg["print_every"]), int(tcfg["snapshot_every"])

    episodes, since, t_last, last_path = 0, 0, time.perf_counter(), None
    pending = defaultdict(lambda: torch.zeros((), device=device))
    bar = tqdm(total=n_steps, desc="training", unit="ep", disable=not progress, mininterval=5)
    for batch in loader:
        lr = lr_at(episodes, cfg)
        set_lr(optimizer, lr)
        episode = batch.to(device, non_blocking=True)
        images = [episode.support_images, episode.query_images]
        if channels_last:
            images = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in images]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            output = model(images[0], episode.support_masks, images[1])
        total, parts = step_loss(output, episode, cfg)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        n = episode.batch_size
        for k, v in parts.items():
            pending[k] += v.detach() * n
        pending["total"] += total.detach() * n
        episodes += n
        since += n
        bar.update(n)
        if episodes // print_every != (episodes - n) // print_every or episodes == n_steps:
            now = time.perf_counter()
            means = {k: float(v) / since for k, v in pending.items()}   # the only host sync
            if not all(math.isfinite(v) for v in means.values()):
                raise FloatingPointError(f"loss became non-finite after {episodes} episodes: {means}")
            rate = since / (now - t_last)
            tqdm.write(f"episodes {episodes:>7d}  lr {lr:.2e}  " + "  ".join(
                f"{k} {v:.4f}" for k, v in sorted(means.items())) + f"  ({rate:.2f} ep/s)")
            if log_scalar is not None:
                for k, v in means.items():
                    log_scalar(f"loss.{k}", v, episodes)
                log_scalar("lr", lr, episodes)
                log_scalar("episodes_per_s", rate, episodes)
            pending.clear()
            since, t_last = 0, now
        if episodes // snapshot_every != (episodes - n) // snapshot_every or episodes == n_steps:
            last_path = save_snapshot(snapshots / f"{episodes}.pth", model, optimizer, episodes, cfg)
    bar.close()
    return last_path
