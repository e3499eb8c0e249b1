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

Snapshots (data.core.run_folder lays them out): an evaluable snapshot every `train.snapshot_every`
episodes and at the end (the model's state dict under "model", for evaluation), and the run's resume
point every `train.checkpoint_every` episodes: everything an exact resume needs (model, optimizer, episodes
seen, RNG states, config). Both are written to a temporary file and renamed, so a crash or kill
never leaves a truncated snapshot and the previous resume point stays until the next is complete.
Snapshots hold only tensors and plain data, and every snapshot is read with
torch.load(weights_only=True) (data.core.checkpoint_files.load_checkpoint_file): a crafted file cannot run code.
Each carries a sha256 digest of its tensors, checked on load with the archive's CRCs and the tensors'
finiteness: a damaged or NaN-holding snapshot or resume point is refused by name, never used.
`train.resume=<run folder>` continues that run in its own folder; on CPU the result is
bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data.core.checkpoint_files import DIGEST_KEY, tensor_digest
from data.core.io import ConfigError, UserError, atomic_path
from data.core.run_folder import TRAIN, RunFolder, config_differences, config_fingerprint
from dataloaders.augment_torch import augment_episode
from dataloaders.episodes import Episode, collate_episodes
from evaluation.reporting import write_training_curves
from models.engine.builders import (
    augment_params,
    autocast_dtype,
    build_episode_dataset,
    build_model,
    episodes_per_step,
    fold_data,
    resolve_device,
    seed_everything,
    use_channels_last,
)
from models.engine.experiment import (
    AugmentConfig,
    Experiment,
    LossConfig,
    OptimConfig,
    TrainConfig,
    as_experiment,
    upgrade_config,
)
from models.heads.common import episode_nll
from models.heads.contract import lr_multipliers

log = logging.getLogger(__name__)
# 2: RNG states as tensors and plain data (loads with torch.load(weights_only=True));
# 1: numpy's RNG state as numpy's own tuple with an ndarray (still read, see upgrade_snapshot)
SNAPSHOT_FORMAT = 2


# ----------------------------------------------------------------------------- schedule
def lr_at(episodes: int, optim: OptimConfig, train: TrainConfig, episodes_per_step: int = 1) -> float:
    """Learning rate for the step that starts after `episodes` episodes.

    With optim.scale_lr_with_batch, the base lr is multiplied by the episodes per step (linear
    scaling): the step's loss is a mean over its episodes, so this keeps the update per episode of
    one-episode steps. With optim.warmup_episodes = W > 0 the lr rises linearly over the first W
    episodes: the step ending at episode e (= episodes + episodes_per_step) gets min(1, e / W) of it
    (W = 0, the default: no warm-up, as the references)."""
    o, n_steps = optim, int(train.n_steps)
    every = int(o.lr_step_every)
    decays = min(episodes // every, max(n_steps // every - 1, 0))
    scale = episodes_per_step if o.scale_lr_with_batch else 1
    lr = float(o.lr) * scale * float(o.lr_step_gamma) ** decays
    warmup = int(o.warmup_episodes)
    if warmup < 0:
        raise ValueError(f"optim.warmup_episodes must be >= 0, got {warmup}")
    if warmup and episodes < warmup:
        lr *= min(1.0, (episodes + episodes_per_step) / warmup)
    return lr


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return every > 0 and after // every != before // every


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by optim.name over all parameters: `sgd` (lr, momentum, weight_decay; the
    references') or `adamw` (lr, betas, eps, weight_decay decoupled). A head may scale the lr of some
    of its parameters with either (the head contract's `lr_multipliers`: {parameter-name fragment:
    factor}, e.g. DSPNet's `cal`); each group keeps its factor as `lr_factor` for set_lr."""
    o = optim
    multipliers = lr_multipliers(model.head)
    groups = defaultdict(list)
    for name, param in model.named_parameters():
        factor = next((f for frag, f in multipliers.items() if frag in name), 1.0)
        groups[factor].append(param)
    lr = float(o.lr)
    param_groups = [{"params": ps, "lr_factor": f, "lr": lr * f} for f, ps in groups.items()]
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=float(o.momentum), weight_decay=float(o.weight_decay))
    if o.name == "adamw":
        betas = tuple(float(b) for b in o.betas)
        if len(betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers [beta1, beta2], got {list(betas)}")
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=float(o.eps), weight_decay=float(o.weight_decay))
    raise ConfigError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {o.name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the step's lr on every group, times the group's `lr_factor` (any optimizer)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)


def step_loss(output, episode: Episode, loss: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Query NLL (weights [bg_weight, 1], ignore_index) + weighted auxiliary losses (loss.weights; an
    auxiliary loss it does not name counts once)."""
    parts = {"query": episode_nll(output.log_probs.float(), episode.query_labels,
                                  [float(loss.bg_weight), 1.0], int(loss.ignore_index))}
    weights = loss.weights or {}
    for name, value in output.aux_losses.items():
        parts[name] = value.float() * float(weights.get(name, 1.0))
    return sum(parts.values()), parts


class StepRunner:
    """One optimisation step on a collated batch: device transfer, on-device augmentation,
    autocast, loss, backward, SGD step. Used by the training loop and the benchmark."""

    def __init__(self, trained: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig,
                 loss: LossConfig, augment: AugmentConfig, device: torch.device):
        self.trained, self.optimizer, self.loss, self.device = trained, optimizer, loss, device
        self.amp = autocast_dtype(train.amp, device)
        self.augment = augment_params(augment)

    def __call__(self, batch: Episode, lr: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        set_lr(self.optimizer, lr)
        total, parts, episode = self.losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return total, parts, episode.batch_size

    def losses(self, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor], Episode]:
        """The step's forward half: the batch on the device, augmented, through the model under the
        step's autocast -> (total loss, its named parts, the augmented episode)."""
        episode = augment_episode(batch.to(self.device, non_blocking=True), self.augment)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            output = self.trained(episode.support_images, episode.support_masks, episode.query_images,
                                  query_labels=episode.query_labels)
        total, parts = step_loss(output, episode, self.loss)
        return total, parts, episode


def prepare_model(exp: Experiment, device: torch.device) -> torch.nn.Module:
    model = build_model(exp.encoder, exp.head).to(device)
    model.set_channels_last(use_channels_last(exp.train.channels_last, device))
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
        # GMRD builds only the branch an episode uses (descriptors, or the anomaly branch for an empty
        # support), as its reference: the other branch's parameters get no gradient in that step. DDP
        # must look for them, or it waits for their gradients forever; a parameter unused on every rank
        # keeps no gradient, so SGD leaves it as one process would.
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class EpisodeIndices(torch.utils.data.Sampler):
    """The global episode indices this rank trains on, step after step (the DataLoader's sampler): step
    k in [start_step, n_steps_total) gives (k world + rank) per_rank + j for j < per_rank, and only the
    indices below `limit` (n_steps; None: all). Produced lazily, so nothing is held in proportion to
    n_steps; len() is computed, not counted."""

    def __init__(self, start_step: int, n_steps_total: int, per_rank: int, world: int, rank: int,
                 limit: int | None = None):
        self.start, self.stop = int(start_step), int(n_steps_total)
        self.per_rank, self.world, self.rank = int(per_rank), int(world), int(rank)
        self.limit = None if limit is None else int(limit)

    def _first(self, step: int) -> int:
        return (step * self.world + self.rank) * self.per_rank

    def __iter__(self):
        for step in range(self.start, self.stop):
            first = self._first(step)
            for i in range(first, first + self.per_rank):
                if self.limit is not None and i >= self.limit:
                    return                      # the indices only grow: none after this one is below it
                yield i

    def __len__(self) -> int:
        steps = max(self.stop - self.start, 0)
        if self.limit is None or steps == 0:
            return steps * self.per_rank
        # steps wholly below the limit: first(k) + per_rank <= limit
        stride = self.world * self.per_rank
        last_full = (self.limit - (self.rank + 1) * self.per_rank) // stride
        full = min(max(last_full + 1 - self.start, 0), steps)
        partial = 0
        if full < steps:                         # the next step holds the limit (if it is above its first)
            partial = min(max(self.limit - self._first(self.start + full), 0), self.per_rank)
        return full * self.per_rank + partial


def episode_indices(start_step: int, n_steps_total: int, per_rank: int, world: int, rank: int,
                    limit: int | None = None) -> EpisodeIndices:
    """Global episode indices this rank trains on, step after step (an EpisodeIndices: lazy)."""
    return EpisodeIndices(start_step, n_steps_total, per_rank, world, rank, limit)


# ----------------------------------------------------------------------------- snapshots
def _numpy_rng_as_data(state: tuple) -> dict:
    """numpy's legacy RNG state (np.random.get_state()) without its ndarray, which a weights-only
    load refuses: the 624 uint32 keys become an int64 tensor (exact), the rest plain numbers."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = state
    return {"bit_generator": str(bit_generator), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _rng_state() -> dict:
    """Every RNG an exact resume restores, as tensors and plain data only (random.getstate() is
    nested tuples of ints, which a weights-only load returns as they were)."""
    return {"python": random.getstate(), "numpy": _numpy_rng_as_data(np.random.get_state()),
            "torch": torch.get_rng_state()}


def _set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])


def upgrade_snapshot(state: dict) -> dict:
    """A snapshot as the current format lays it out. Format 1 (written before snapshots had to load
    with weights_only=True) kept numpy's RNG state as numpy's tuple with an ndarray; the loader
    rebuilds that array through a named numpy allowlist (models.engine.checkpoints), and this converts it."""
    if isinstance(state.get("rng", {}).get("numpy"), tuple):
        state = {**state, "rng": {**state["rng"], "numpy": _numpy_rng_as_data(state["rng"]["numpy"])}}
    return {**state, "format": SNAPSHOT_FORMAT}


class SnapshotWriteError(UserError):
    """A snapshot could not be written (full disk, permissions); the previous file is unchanged."""


# optimizer state per parameter, in parameter-sized tensors: SGD's momentum buffer, AdamW's two moments
_OPTIMIZER_STATE_COPIES = {"sgd": 1, "adamw": 2}


def snapshot_bytes(model: torch.nn.Module, optimizer_name: str = "sgd") -> int:
    """About the size of one resume point: the weights plus the optimizer's per-parameter state."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return weights * (1 + _OPTIMIZER_STATE_COPIES.get(optimizer_name, 2))


def warn_if_low_space(folder: Path, model: torch.nn.Module, optimizer_name: str = "sgd") -> None:
    """Warn at the start of training when the snapshot folder cannot hold two more snapshots (one
    being written next to the resume point it replaces)."""
    size = snapshot_bytes(model, optimizer_name)
    need, free = 2 * size, shutil.disk_usage(folder).free
    if free < need:
        log.warning("only %.0f MB free in %s; a snapshot takes about %.0f MB and two must fit while the resume "
                    "point is replaced: free some space before the first snapshot", free / 2 ** 20, folder,
                    size / 2 ** 20)


def save_snapshot(path: Path, model, optimizer, episodes: int, cfg: dict, metrics: dict | None = None,
                  run: RunFolder | None = None) -> Path:
    """Write a snapshot atomically: on any failure the previous file at `path` stays as it was.

    `metrics` (Sacred's layout of recorded metrics) travels with the resume point, so a resumed run gets
    back every metric logged up to it, also those Sacred had not yet flushed when the run was killed.
    The snapshot carries the sha256 digest of all its tensors (model, optimizer, RNG states), which
    every load checks (data.core.checkpoint_files.tensor_digest). `run`: the run folder, so that a
    failed write says how to go on from what is really on disk."""
    state = {"format": SNAPSHOT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "episodes": episodes, "config": cfg, "rng": _rng_state(), "metrics": metrics or {}}
    state[DIGEST_KEY] = tensor_digest(state)
    existed = Path(path).is_file()
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as err:     # torch's zip writer reports a full disk as a RuntimeError
        kept = f"The previous {path} is unchanged" if existed else f"Nothing was written to {path}"
        free = shutil.disk_usage(Path(path).parent).free if Path(path).parent.is_dir() else None
        size = snapshot_bytes(model, type(optimizer).__name__.lower())      # optim.name: sgd, adamw
        if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < size):
            raise SnapshotWriteError(
                f"no space left on the device writing {path} ({0 if free is None else free / 2 ** 20:.0f} MB "
                f"free, a snapshot takes about {size / 2 ** 20:.0f} MB). {kept}; free some space and "
                f"{how_to_go_on(run)}") from None
        raise SnapshotWriteError(f"cannot write snapshot {path}: {err}. {kept}") from None
    return path


def how_to_go_on(run: RunFolder | None) -> str:
    """After a failed snapshot write: resume from the resume point that exists, or start again."""
    if run is None:
        return "run the command again"
    if run.resume_file.is_file():
        return f"continue from its resume point {run.resume_file} with train.resume={run.path}"
    return (f"start the training again: run {run.path} has no resume point yet ({run.resume_file} was never "
            f"written), so there is nothing to resume")


def check_resumable(saved_cfg: dict, cfg: dict, source: Path) -> None:
    """A run resumes only with the configuration it was started with: the same training fingerprint
    (paths, log cadence, worker counts and the device may differ, data.core.run_folder.NOT_IN_FINGERPRINT)."""
    if config_fingerprint(saved_cfg, TRAIN) == config_fingerprint(cfg, TRAIN):
        return
    raise ConfigError(f"cannot resume {source}: the configuration differs "
                      f"({config_differences(saved_cfg, cfg, TRAIN)}). Resume with the same named configs and "
                      f"updates as the original run; the run was left as it was.")


def load_resume_point(run_dir: Path) -> tuple[Path, dict]:
    """The path and content (in the current snapshot format) of run_dir's resume point, read safely."""
    run = RunFolder(run_dir)
    state = upgrade_snapshot(run.read_resume_point())
    # its config as the current version writes it: the keys added since it was written filled in
    return run.resume_file, {**state, "config": upgrade_config(state["config"])}


def restore(run_dir: Path, model, optimizer, cfg: dict, state: dict | None = None) -> tuple[int, dict | None]:
    """Load the resume point of run_dir (`state`: as check_resume read it; read here when None) into
    model and optimizer; returns the episodes already seen and the metrics logged up to them (None for
    snapshots written before they carried metrics)."""
    if state is None:
        path, state = load_resume_point(run_dir)
        check_resumable(state["config"], cfg, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    log.info("resuming %s after %d episodes", run_dir, state["episodes"])
    return int(state["episodes"]), state.get("metrics")


def check_resume(cfg: Experiment | dict) -> dict:
    """Refuse a `train.resume` that cannot continue, reading only: the run folder must exist and
    hold a readable resume point written with the same configuration. training.py calls this
    before Sacred writes anything, so a refused resume leaves the run folder as it was. Returns the
    resume point (read once: hand it to `train`)."""
    exp = as_experiment(cfg)
    run_dir = Path(exp.train.resume)
    if not run_dir.is_dir():
        raise ConfigError(f"train.resume: run folder {run_dir} does not exist (train.resume takes a folder "
                          f"<log_dir>/train/<exp_name>/<run id>)")
    path, state = load_resume_point(run_dir)
    check_resumable(state["config"], exp.to_config(), path)
    return state


# ----------------------------------------------------------------------------- divergence
class TrainingDiverged(UserError, FloatingPointError):
    """The loss or the weights became NaN or infinite; nothing after the last finite point was saved."""


class DivergenceGuard:
    """Watches every step's loss without a host sync per step.

    Each step's loss is folded into a device-side record of the first episode count at which the
    loss was NaN or inf; `check` reads it back (the only sync) before anything is written and at
    logging steps, so a diverged model is never saved and the last finite resume point survives."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, episodes_after: int) -> None:
        newly_bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(newly_bad, torch.full_like(self.first_bad, episodes_after), self.first_bad)

    def check(self, model: torch.nn.Module, saved: dict[str, int], lr: float, weights: bool = False) -> None:
        """Raise if a loss since the start was non-finite (or, with `weights`, if a parameter is)."""
        bad = int(self.first_bad)
        if bad < 0 and weights and not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            bad = -2
        if bad == -1:
            return
        where = f"in the step ending at episode {bad}" if bad >= 0 else "in the model's weights"
        kept = ", ".join(f"{what} at episode {n}" for what, n in saved.items()) or "nothing (no snapshot yet)"
        raise TrainingDiverged(
            f"training diverged: the loss became NaN or infinite {where} (lr {lr:.3g}). Nothing was saved "
            f"after that; kept: {kept}. Lower optim.lr or check the training scans, then train again.")


# ----------------------------------------------------------------------------- the loop
def _record(metrics: dict, name: str, value: float, episodes: int) -> None:
    entry = metrics.setdefault(name, {"steps": [], "values": [], "timestamps": []})
    entry["steps"].append(episodes)
    entry["values"].append(value)
    entry["timestamps"].append(datetime.now(timezone.utc).replace(tzinfo=None).isoformat())


def train(cfg: Experiment | dict, run_dir: Path, log_scalar: Callable[[str, float, int], None] | None = None,
          progress: bool = True, resume_state: dict | None = None) -> Path:
    """Train the configured method; returns the path of the final snapshot. `resume_state`: the resume
    point as check_resume read it (read again when None)."""
    exp = as_experiment(cfg)            # a config dict (tests) is converted here
    config = exp.to_config()            # the plain config, as snapshots carry it
    ddp = Distributed(exp.device)
    device = ddp.device
    seed_everything(int(exp.seed))
    spec, store, fold = fold_data(exp)
    log.info("fold %d: training on %d scans %s; held out %s", fold.index, len(fold.train_ids),
             list(fold.train_ids), list(fold.test_ids))
    dataset = build_episode_dataset(exp, store, fold.train_ids, int(exp.seed))

    model = prepare_model(exp, device)
    optimizer = make_optimizer(model, exp.optim)
    run = RunFolder(run_dir)
    episodes, metrics = 0, {}
    if exp.train.resume:
        episodes, saved_metrics = restore(run.path, model, optimizer, config, resume_state)
        del resume_state
        if ddp.is_main:
            metrics = run.restore_metrics(saved_metrics, episodes)
            run.remove_partial_snapshots()
    trained = ddp.wrap(model)
    trained.train()
    step = StepRunner(trained, optimizer, exp.train, exp.loss, exp.augment, device)

    tcfg = exp.train
    n_steps, B = int(tcfg.n_steps), episodes_per_step(tcfg, device)
    if n_steps < 1 or B < 1:
        raise ValueError(f"train.n_steps and train.batch_episodes must be >= 1, got {n_steps}, {B}")
    per_step = B * ddp.world
    total_steps = math.ceil(n_steps / per_step) if ddp.world == 1 else n_steps // per_step
    if episodes % per_step:
        raise ValueError(f"cannot resume after {episodes} episodes with {per_step} episodes per step")
    indices = episode_indices(episodes // per_step, total_steps, B, ddp.world, ddp.rank, limit=n_steps)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=B, sampler=indices, collate_fn=collate_episodes,
        num_workers=int(tcfg.num_workers), pin_memory=device.type == "cuda",
        persistent_workers=int(tcfg.num_workers) > 0)
    if ddp.is_main:
        run.snapshot_dir.mkdir(parents=True, exist_ok=True)
        warn_if_low_space(run.snapshot_dir, model, exp.optim.name)
    every = {"print_every": int(tcfg.print_every), "snapshot_every": int(tcfg.snapshot_every),
             "checkpoint_every": int(tcfg.checkpoint_every)}
    end = min(n_steps, total_steps * per_step)

    since, t_last, last_path = 0, time.perf_counter(), None
    pending = defaultdict(lambda: torch.zeros((), device=device))
    guard = DivergenceGuard(device)
    saved = {"resume point": episodes} if episodes else {}
    bar = tqdm(total=end, initial=episodes, desc="training", unit="ep", disable=not (progress and ddp.is_main),
               mininterval=5)
    for batch in loader:
        lr = lr_at(episodes, exp.optim, exp.train, per_step)
        total, parts, batch_size = step(batch, lr)
        n = batch_size * ddp.world
        for k, v in parts.items():
            pending[k] += v.detach() * n
        pending["total"] += total.detach() * n
        before, episodes, since = episodes, episodes + n, since + n
        guard.observe(total, episodes)
        bar.update(n)
        due_snapshot = crossed(before, episodes, every["snapshot_every"]) or episodes == end
        due_resume_point = crossed(before, episodes, every["checkpoint_every"]) or episodes == end
        if due_snapshot or due_resume_point:      # on every rank: they all stop together
            guard.check(model, saved, lr, weights=True)
        if crossed(before, episodes, every["print_every"]) or episodes == end:
            guard.check(model, saved, lr)
            now = time.perf_counter()
            means = {k: float(v) / since for k, v in pending.items()}   # the only host sync of the step
            rate = since / (now - t_last)
            if ddp.is_main:
                log.info("episodes %7d  lr %.2e  %s  (%.2f ep/s)", episodes, lr,
                         "  ".join(f"{k} {v:.4f}" for k, v in sorted(means.items())), rate)
                for name, value in [*((f"loss.{k}", v) for k, v in means.items()), ("lr", lr),
                                    ("episodes_per_s", rate)]:
                    _record(metrics, name, value, episodes)
                    if log_scalar is not None:
                        log_scalar(name, value, episodes)
            pending.clear()
            since, t_last = 0, now
        if ddp.is_main:
            if due_snapshot:
                last_path = save_snapshot(run.snapshot_file(episodes), model, optimizer, episodes, config, metrics,
                                          run)
                saved["snapshot"] = episodes
            if due_resume_point:
                save_snapshot(run.resume_file, model, optimizer, episodes, config, metrics, run)
                saved["resume point"] = episodes
    bar.close()
    if ddp.is_main:
        history = {k: (v["steps"], v["values"]) for k, v in metrics.items()}
        write_training_curves(history, run.curves_file, title=exp.exp_name)
    ddp.close()
    return last_path if last_path is not None else run.snapshot_file(episodes)
