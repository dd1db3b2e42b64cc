"""Statistics shared by several stages: how spread a set of feature vectors is (the effective rank and
the normalised per-channel spread), and the t-interval of paired per-seed differences.

The training dynamics of a pretraining run (``collapse/*`` records, :mod:`soco_det.engine.dynamics`)
and the object probe's effective rank (:mod:`soco_det.probe`) read the first two; the frozen
detection probe (:mod:`soco_det.transfer.frozen`) and ``benchmarks/transfer.py`` the interval. So they
live here, below all of them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch


def effective_rank(x: torch.Tensor) -> float:
    """``exp(entropy)`` of the normalised singular values of the centred rows of ``x`` ``[N, D]``
    (~1 when one direction carries the variance, up to ``min(N, D)``)."""
    x = torch.as_tensor(x).double()
    x = x - x.mean(0)
    # the Gram matrix of the smaller side has the same non-zero spectrum (squared)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def output_spread(x: torch.Tensor) -> tuple[float, float]:
    """``(effective rank of the centred rows of x, per-channel std x sqrt(D) of the L2-normalised
    rows)``: the rank falls to ~1 when one direction carries the variance (dimensional collapse),
    the std to ~0 when every row points the same way (complete collapse)."""
    x = x.detach().float().flatten(1)
    z = torch.nn.functional.normalize(x, dim=1)
    return effective_rank(x), float(z.std(0).mean() * math.sqrt(z.shape[1]))


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95 % t-interval (n - 1 degrees of freedom) of paired per-seed differences:
    ``{"mean", "ci95": [lo, hi], "values"}``; with one value the interval is ``[nan, nan]``."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci95": [float("nan"), float("nan")], "values": v.tolist()}
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "values": v.tolist()}
