"""The optimizer (optim.name), the learning-rate schedule with warm-up, lr_multipliers under both, and
the episodes each step trains on (the lazy sampler of models.engine.trainer)."""
import pytest
import torch
import torch.nn as nn

from configs.experiment import build_config, method_defaults
from data.core.io import ConfigError
from models.engine.experiment import OptimConfig, TrainConfig
from models.engine.trainer import EpisodeIndices, episode_indices, lr_at, make_optimizer, set_lr


class _Head(nn.Module):
    feature_maps = ("out",)
    lr_multipliers = {"head.cal": 1e-4}

    def __init__(self):
        super().__init__()
        self.cal = nn.Parameter(torch.ones(3))
        self.other = nn.Parameter(torch.ones(2))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.head = _Head()


def _cfg(**optim) -> tuple[OptimConfig, TrainConfig]:
    cfg = method_defaults("adnet", "SYNTH")
    cfg["optim"].update(optim)
    cfg["train"]["n_steps"] = 5000
    return OptimConfig.from_config(cfg["optim"]), TrainConfig.from_config(cfg["train"])


def test_defaults_are_sgd_without_warmup():
    o = method_defaults("adnet", "SYNTH")["optim"]
    assert (o["name"], o["lr"], o["momentum"], o["weight_decay"], o["warmup_episodes"]) == ("sgd", 1e-3, 0.9, 5e-4, 0)
    opt = make_optimizer(_Model(), _cfg()[0])
    assert type(opt) is torch.optim.SGD
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in opt.param_groups)


def test_schedule_without_warmup_is_unchanged():
    cfg = _cfg()
    assert [lr_at(e, *cfg) for e in (0, 999, 1000, 2500)] == [1e-3, 1e-3, 1e-3 * 0.95, 1e-3 * 0.95 ** 2]
    assert lr_at(4999, *cfg) == pytest.approx(1e-3 * 0.95 ** 4)     # the last decay is at n_steps - 1000
    assert lr_at(0, *cfg, 4) == 4e-3                                # scale_lr_with_batch


def test_linear_warmup():
    cfg = _cfg(warmup_episodes=10)
    assert [lr_at(e, *cfg) for e in (0, 4, 9, 10, 500)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])
    # four episodes per step: the step ending at episode 4 gets 4/10 of the (batch-scaled) lr
    assert [lr_at(e, *cfg, 4) for e in (0, 4, 8, 12)] == pytest.approx([1.6e-3, 3.2e-3, 4e-3, 4e-3])
    with pytest.raises(ValueError, match="warmup_episodes must be >= 0"):
        lr_at(0, *_cfg(warmup_episodes=-1))


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_lr_multipliers_work_with_either_optimizer(name, kind):
    model = _Model()
    opt = make_optimizer(model, _cfg(name=name, betas=[0.8, 0.99], eps=1e-6, weight_decay=0.01)[0])
    assert type(opt) is kind
    (small,) = [g for g in opt.param_groups if g["lr_factor"] == 1e-4]
    assert small["params"] == [model.head.cal] and small["lr"] == pytest.approx(1e-7)
    if name == "adamw":
        assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 and g["weight_decay"] == 0.01
                   for g in opt.param_groups)
    set_lr(opt, 0.5)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.5e-4, 0.5])
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    moved = {k: (p.detach() - before[k]).abs().max().item() for k, p in model.named_parameters()}
    assert 0 < moved["head.cal"] < 1e-3 * moved["head.other"]


def test_optimizer_name_is_checked():
    with pytest.raises(ConfigError, match="optim.name must be one of 'sgd', 'adamw', got 'adam'"):
        build_config("adnet", "SYNTH", "data/SYNTH", updates={"optim.name": "adam"})
    with pytest.raises(ConfigError, match="optim.betas must be a list"):
        build_config("adnet", "SYNTH", "data/SYNTH", updates={"optim.betas": 0.9})
    with pytest.raises(ConfigError, match="optim.name must be one of"):
        make_optimizer(_Model(), _cfg(name="lbfgs")[0])


def _listed(start, total, per_rank, world, rank, limit):
    """The episode list the trainer used to build: every index of every step, those below the limit."""
    return [i for i in ((k * world + rank) * per_rank + j for k in range(start, total) for j in range(per_rank))
            if limit is None or i < limit]


@pytest.mark.parametrize("start, total, per_rank, world, rank, limit", [
    (0, 10, 1, 1, 0, 10), (0, 3, 4, 1, 0, 10), (2, 3, 4, 1, 0, 10),      # a short last step (n_steps 10, B 4)
    (0, 4, 2, 2, 0, 16), (0, 4, 2, 2, 1, 16), (1, 4, 2, 2, 1, 15),      # two ranks, a resumed rank
    (0, 3, 3, 3, 2, 25), (5, 5, 2, 1, 0, 10), (0, 6, 2, 1, 0, None), (0, 7, 4, 2, 1, 0),
])
def test_the_lazy_sampler_gives_the_episodes_of_the_old_list(start, total, per_rank, world, rank, limit):
    indices = episode_indices(start, total, per_rank, world, rank, limit)
    expected = _listed(start, total, per_rank, world, rank, limit)
    assert list(indices) == expected and len(indices) == len(expected)
    assert list(indices) == expected                                # iterable again (each epoch)


def test_the_lazy_sampler_holds_nothing_in_proportion_to_n_steps():
    import itertools
    import sys
    import time
    n_steps = 10 ** 12
    start = time.perf_counter()
    indices = EpisodeIndices(0, n_steps // 8, 8, 1, 0, limit=n_steps)
    assert len(indices) == n_steps
    assert list(itertools.islice(iter(indices), 10)) == list(range(10))
    loader = torch.utils.data.DataLoader(list(range(16)), batch_size=8, sampler=EpisodeIndices(0, 2, 8, 1, 0, 16))
    assert [b.tolist() for b in loader] == [list(range(8)), list(range(8, 16))]
    assert time.perf_counter() - start < 1.0 and sys.getsizeof(indices) < 1000
