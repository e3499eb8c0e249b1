"""BatchNorm with training statistics per episode.

The references train one episode per step, so BatchNorm normalises each training batch with the
statistics of one episode's images (support + query: 2 images in 1-shot). With B episodes per step,
plain BatchNorm would pool the statistics of all 2B images. `EpisodeBatchNorm2d` keeps the
reference semantics: in training, each group of G consecutive images (one episode, as the model
orders them) is normalised with its own mean and variance; the running statistics take one
momentum update per step with the mean of the episodes' statistics (the reference takes one per
episode). In evaluation it is plain BatchNorm with the running statistics. State-dict keys are
those of nn.BatchNorm2d, so checkpoints are interchangeable.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class EpisodeBatchNorm2d(nn.BatchNorm2d):
    group_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.group_size
        if not self.training or G is None:
            return super().forward(x)
        N, C, H, W = x.shape
        if N % G:
            raise ValueError(f"{N} images do not form episodes of {G}")
        xg = x.view(N // G, G, C, H, W)
        var, mean = torch.var_mean(xg.float(), dim=(1, 3, 4), correction=0)          # episodes x C
        if self.track_running_stats:
            with torch.no_grad():
                n = G * H * W
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.mean(0) * n / max(n - 1, 1)).to(self.running_var.dtype), m)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
            shift = self.bias - mean * scale
        else:
            shift = -mean * scale
        y = xg * scale[:, None, :, None, None].to(x.dtype) + shift[:, None, :, None, None].to(x.dtype)
        return y.view(N, C, H, W)


def use_episode_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d in `module` by an EpisodeBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = EpisodeBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            use_episode_batchnorm(child)
    return module


@contextlib.contextmanager
def episodes_of(module: nn.Module, group_size: int):
    """Within the block, EpisodeBatchNorm2d layers of `module` normalise groups of `group_size` images."""
    layers = [m for m in module.modules() if isinstance(m, EpisodeBatchNorm2d)]
    for m in layers:
        m.group_size = group_size
    try:
        yield
    finally:
        for m in layers:
            m.group_size = None
