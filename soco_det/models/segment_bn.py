"""Segment-wise BatchNorm: one batched call that normalises like several separate calls.

The official SoCo forward runs the box head, projector and predictor once per (pair, view, level)
and the backbone once per view, each call with its own BatchNorm statistics (docs/method.md 3.4, 9.8).
Batching those calls into one is much faster on a GPU, but plain BatchNorm would then pool the
statistics of all calls. :class:`SegmentBatchNorm1d` / :class:`SegmentBatchNorm2d` keep the
per-call semantics: inside ``with bn_segments(modules, S):`` an input ``[S*n, C, ...]`` is read as
``S`` consecutive segments of ``n`` rows, and each segment is normalised with its own batch
statistics, exactly as ``S`` separate calls would be (up to float rounding). Running statistics
are updated as ``S`` successive calls in segment order, so their values after a step follow the
order of the official calls; ``num_batches_tracked`` grows by ``S``.

Outside a ``bn_segments`` block (``S = 1``), in eval mode and for frozen BN these modules are plain
``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` (same code path, same state-dict names and buffers).

``sync=True`` (set by :func:`soco_det.models.convert_sync_bn`) is SyncBatchNorm with the same
per-segment semantics: each segment's statistics are taken over that segment on every process, as
the official SyncBatchNorm does per call. The exchange is one differentiable ``all_gather`` of the
per-segment ``(mean, var, count)`` per call, through ``torch.distributed``, so it works on gloo
(CPU) and NCCL alike; without a process group, or with one process, it is plain segment-wise BN.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGather(torch.autograd.Function):
    """``[W, *x.shape]`` of every process's ``x``; the gradient of each slice flows back to its owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every process used every slice
        return grad[ctx.rank], None


@lru_cache(maxsize=64)
def _decay_weights(segments: int, momentum: float, device: torch.device) -> tuple[float, torch.Tensor]:
    """``S`` successive updates ``r <- (1-m) r + m x_s`` equal ``(1-m)^S r + sum_s w_s x_s``."""
    keep = (1.0 - momentum) ** segments
    w = [momentum * (1.0 - momentum) ** (segments - 1 - s) for s in range(segments)]
    return keep, torch.tensor(w, dtype=torch.float32, device=device)


def _fold(x: torch.Tensor, s: int) -> torch.Tensor:
    """``[S*n, C, *sp]`` -> ``[n, S*C, *sp]`` (segment s's channels at ``s*C..``), keeping NHWC."""
    n, c = x.shape[0] // s, x.shape[1]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        h, w = x.shape[2:]
        t = x.permute(0, 2, 3, 1).reshape(s, n, h, w, c).permute(1, 2, 3, 0, 4).reshape(n, h, w, s * c)
        return t.permute(0, 3, 1, 2)
    return x.reshape(s, n, *x.shape[1:]).transpose(0, 1).reshape(n, s * c, *x.shape[2:])


def _unfold(y: torch.Tensor, s: int) -> torch.Tensor:
    """Inverse of :func:`_fold`."""
    n, c = y.shape[0], y.shape[1] // s
    if y.dim() == 4 and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last):
        h, w = y.shape[2:]
        t = y.permute(0, 2, 3, 1).reshape(n, h, w, s, c).permute(3, 0, 1, 2, 4).reshape(s * n, h, w, c)
        return t.permute(0, 3, 1, 2)
    return y.reshape(n, s, c, *y.shape[2:]).transpose(0, 1).reshape(s * n, c, *y.shape[2:])


class _SegmentBN:
    """Forward shared by the 1-d and 2-d modules (mixed into ``nn.BatchNorm1d`` / ``2d``)."""

    segments: int = 1
    sync: bool = False
    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.segments
        batch_stats = self.training or self.running_mean is None
        world = 1
        if self.sync and batch_stats and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(self.process_group)
        if not batch_stats or (s == 1 and world == 1):
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[0] % s:
            raise ValueError(f"{type(self).__name__}: {x.shape[0]} rows do not split into {s} equal segments")
        if world == 1:
            return self._local(x, s)
        return self._synced(x, s)

    # -- one process: the native kernel on [n, S*C, ...] gives each (segment, channel) its statistics
    def _local(self, x: torch.Tensor, s: int) -> torch.Tensor:
        c = self.num_features
        track = self.running_mean is not None
        # momentum 1 turns the temporary buffers into this call's batch mean and unbiased variance
        mean = x.new_zeros(s * c, dtype=torch.float32) if track else None
        var = x.new_ones(s * c, dtype=torch.float32) if track else None
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        y = F.batch_norm(_fold(x, s), mean, var, weight, bias, True, 1.0, self.eps)
        if track:
            self._update_running(mean.view(s, c), var.view(s, c))
        return _unfold(y, s)

    # -- several processes: all-gather per-segment (mean, var, count), combine (Chan), normalise
    def _synced(self, x: torch.Tensor, s: int) -> torch.Tensor:
        c = self.num_features
        n = x.shape[0] // s
        xs = x.float().reshape(s, n, c, -1)  # [S, n, C, L]
        local_var, local_mean = torch.var_mean(xs, dim=(1, 3), unbiased=False)  # [S, C]
        count = torch.full((s, 1), float(n * xs.shape[-1]), device=x.device)
        stats = _AllGather.apply(torch.cat([local_mean, local_var, count], dim=1), self.process_group)
        counts = stats[..., 2 * c :]  # [W, S, 1]
        total = counts.sum(0)  # [S, 1]
        mean = (stats[..., :c] * counts).sum(0) / total
        var = ((stats[..., c : 2 * c] + (stats[..., :c] - mean) ** 2) * counts).sum(0) / total  # biased
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.float()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        y = xs * scale[:, None, :, None] + shift[:, None, :, None]
        if self.running_mean is not None:
            with torch.no_grad():
                unbiased = var * (total / (total - 1).clamp(min=1))
                self._update_running(mean.detach(), unbiased.detach())
        return y.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """``S`` successive running-statistics updates with the ``[S, C]`` batch statistics."""
        s = mean.shape[0]
        if self.momentum is None:  # cumulative average, one call at a time
            for k in range(s):
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean[k], alpha=f)
                self.running_var.mul_(1 - f).add_(var[k], alpha=f)
            return
        keep, w = _decay_weights(s, float(self.momentum), mean.device)
        self.running_mean.mul_(keep).add_((w @ mean).to(self.running_mean.dtype))
        self.running_var.mul_(keep).add_((w @ var).to(self.running_var.dtype))
        self.num_batches_tracked.add_(s)


class SegmentBatchNorm1d(_SegmentBN, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with segment-wise statistics (see the module docstring)."""


class SegmentBatchNorm2d(_SegmentBN, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with segment-wise statistics (see the module docstring)."""


_SEGMENT_CLASSES = {
    nn.BatchNorm1d: SegmentBatchNorm1d,
    nn.BatchNorm2d: SegmentBatchNorm2d,
    SegmentBatchNorm1d: SegmentBatchNorm1d,
    SegmentBatchNorm2d: SegmentBatchNorm2d,
}


def convert_segment_bn(module: nn.Module, sync: bool | None = None, process_group=None) -> nn.Module:  # noqa: ANN001
    """Replace every ``BatchNorm1d/2d`` in ``module`` by the
    segment-wise class, keeping the parameter and buffer objects (same state-dict names).

    ``sync``: ``None`` keeps each module's setting, ``True``/``False`` sets it. Returns the module
    (or its replacement when ``module`` itself is a BatchNorm).
    """
    out = module
    cls = _SEGMENT_CLASSES.get(type(module))
    if cls is not None:
        if type(module) is not cls:
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
        if sync is not None:
            out.sync = sync
            out.process_group = process_group
    for name, child in module.named_children():
        new = convert_segment_bn(child, sync, process_group)
        if new is not child:
            setattr(module, name, new)
    return out


@contextlib.contextmanager
def bn_segments(modules: Iterable[nn.Module | None], segments: int) -> Iterator[None]:
    """Inside the block, every segment-wise BN in ``modules`` reads its input as ``segments``
    consecutive equal segments (restored to 1 on exit)."""
    bns = [m for mod in modules if mod is not None for m in mod.modules() if isinstance(m, _SegmentBN)]
    for m in bns:
        m.segments = segments
    try:
        yield
    finally:
        for m in bns:
            m.segments = 1
