"""The probe's read-outs of frozen object features, each scored per val object for the bootstrap.

* :func:`linear_probe`: multinomial logistic regression (L-BFGS, L2 chosen on a held-out fifth of
  the train objects) -> 1/0 per val object;
* :func:`knn_probe`: cosine k-nearest neighbours with temperature-weighted votes (k = 20, T = 0.07,
  as in DINO) -> 1/0 per val object;
* :func:`localisation_probe`: ridge regression of the IoU of jittered boxes with their object ->
  squared error and squared deviation per object (R^2 = 1 - sum SE / sum SD);
* :func:`retrieval_probe`: the object in a second augmented view of its image, among all the val
  objects of that view, by cosine similarity -> 1/0 per val object;
* :func:`effective_rank`: ``exp(entropy(s / sum(s)))`` of the singular values of the centred
  features (Roy & Vetterli, 2007): ~1 when one direction carries everything (collapse);
* :func:`balanced_stat` (the mean of the per-class accuracies: a constant answer scores 1 / classes
  however unbalanced the classes) and :func:`auc` (of the logistic regression's margin, for two
  classes) read the classifiers' answers where plain accuracy would reward the majority class.

Features are standardised with the train objects' mean and std first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from soco_det import stats

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """float64 tensors of ``train`` and ``others`` scaled by the train mean and std."""
    t = torch.as_tensor(train, dtype=torch.float64)
    mean, std = t.mean(0), t.std(0).clamp_min(1e-6)
    return [(t - mean) / std] + [(torch.as_tensor(o, dtype=torch.float64) - mean) / std for o in others]


def _holdout(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    cut = max(1, n // 5)
    return perm[cut:], perm[:cut]


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, iters: int = 100) -> torch.Tensor:
    w = torch.zeros(x.shape[1] + 1, classes, dtype=x.dtype, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xb @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _predict_logistic(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1) @ w).argmax(1)


def linear_logits(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, classes: int, seed: int = 0
) -> np.ndarray:
    """``[N_val, classes]`` logits of the logistic regression fitted on the train objects (L2 picked
    on a held-out fifth of them)."""
    xt, xv = standardise(train_x, val_x)
    yt = torch.as_tensor(train_y)
    fit_rows, held = _holdout(len(yt), seed)
    scores = [
        (_predict_logistic(_fit_logistic(xt[fit_rows], yt[fit_rows], classes, l2), xt[held]) == yt[held])
        .double()
        .mean()
        .item()
        for l2 in L2_GRID
    ]
    best = L2_GRID[int(np.argmax(scores))]
    w = _fit_logistic(xt, yt, classes, best)
    return (torch.cat([xv, torch.ones(len(xv), 1, dtype=xv.dtype)], dim=1) @ w).numpy()


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int = 0
) -> np.ndarray:
    """1.0/0.0 per val object: is the logistic-regression prediction right?"""
    classes = int(max(train_y.max(), val_y.max())) + 1
    return (linear_logits(train_x, train_y, val_x, classes, seed).argmax(1) == val_y).astype(np.float64)


def knn_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """1.0/0.0 per val object: is the weighted k-NN vote right?"""
    xt, xv = (F.normalize(t, dim=1) for t in standardise(train_x, val_x))
    classes = int(max(train_y.max(), val_y.max())) + 1
    sim = xv @ xt.T
    k = min(k, len(xt))
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(xv), classes, dtype=sim.dtype)
    votes.scatter_add_(1, torch.as_tensor(train_y)[idx], (top / temperature).exp())
    return (votes.argmax(1).numpy() == val_y).astype(np.float64)


def _fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    y_mean = y.mean()
    n, d = x.shape
    if d <= n:
        w = torch.linalg.solve(x.T @ x + l2 * n * torch.eye(d, dtype=x.dtype), x.T @ (y - y_mean))
    else:  # dual form: the n x n system is smaller
        w = x.T @ torch.linalg.solve(x @ x.T + l2 * n * torch.eye(n, dtype=x.dtype), y - y_mean)
    return w, y_mean


def localisation_probe(
    train_x: np.ndarray,
    train_iou: np.ndarray,
    train_owner: np.ndarray,
    val_x: np.ndarray,
    val_iou: np.ndarray,
    val_owner: np.ndarray,
    n_val_objects: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of IoU from the features of jittered boxes: per val object, the summed
    squared error and the summed squared deviation from the mean IoU (over its boxes)."""
    xt, xv = standardise(train_x, val_x)
    yt, yv = torch.as_tensor(train_iou, dtype=torch.float64), torch.as_tensor(val_iou, dtype=torch.float64)
    objects = np.unique(train_owner)
    fit_obj, held_obj = _holdout(len(objects), seed)
    fit_rows = np.isin(train_owner, objects[fit_obj])
    held_rows = ~fit_rows

    def r2(l2: float) -> float:
        w, b = _fit_ridge(xt[fit_rows], yt[fit_rows], l2)
        pred = xt[held_rows] @ w + b
        return (
            1 - ((pred - yt[held_rows]) ** 2).sum().item() / ((yt[held_rows] - yt[held_rows].mean()) ** 2).sum().item()
        )

    best = max((1e-2, 1e-1, 1.0, 10.0), key=r2)
    w, b = _fit_ridge(xt, yt, best)
    err = ((xv @ w + b - yv) ** 2).numpy()
    dev = ((yv - yv.mean()) ** 2).numpy()
    return (np.bincount(val_owner, err, minlength=n_val_objects), np.bincount(val_owner, dev, minlength=n_val_objects))


def retrieval_probe(view_a: np.ndarray, view_b: np.ndarray, valid: np.ndarray, train_x: np.ndarray) -> np.ndarray:
    """1.0/0.0 per val object valid in both views: is its nearest view-b object (cosine, among the
    valid ones) itself? Invalid objects get NaN."""
    xa, xb = standardise(train_x, view_a[valid], view_b[valid])[1:]
    sim = F.normalize(xa, dim=1) @ F.normalize(xb, dim=1).T
    hit = (sim.argmax(1) == torch.arange(len(xa))).numpy().astype(np.float64)
    out = np.full(len(valid), np.nan)
    out[valid] = hit
    return out


def effective_rank(x: np.ndarray) -> float:
    """``exp(H(p))`` with ``p`` the normalised singular values of the centred rows of ``x``."""
    return stats.effective_rank(torch.as_tensor(x))


# ---------------------------------------------------------------------- bootstrap
Statistic = Callable[[np.ndarray], float]


@dataclass
class Estimate:
    """A value with its bootstrap 95 % interval."""

    value: float
    lo: float
    hi: float

    def as_dict(self) -> dict:
        return {"mean": self.value, "ci95": [self.lo, self.hi]}


def bootstrap(stat: Statistic, n: int, resamples: int = 1000, seed: int = 0) -> Estimate:
    """``stat(indices)`` on all ``n`` objects, and its 2.5/97.5 percentiles over resampled indices."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, size=n)) for _ in range(resamples)]
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return Estimate(float(stat(np.arange(n))), float(lo), float(hi))


def subsample(stat: Statistic, n: int, fraction: float = 0.8, resamples: int = 50, seed: int = 0) -> Estimate:
    """Mean and 2.5/97.5 percentiles of ``stat`` over random ``fraction`` subsets without
    replacement: for statistics that duplicates would bias (the effective rank)."""
    rng = np.random.default_rng(seed)
    m = max(2, int(round(fraction * n)))
    values = [stat(rng.choice(n, size=m, replace=False)) for _ in range(resamples)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return Estimate(float(np.mean(values)), float(lo), float(hi))


def mean_stat(per_object: np.ndarray) -> Statistic:
    return lambda idx: float(np.nanmean(per_object[idx]))


def r2_stat(err: np.ndarray, dev: np.ndarray) -> Statistic:
    return lambda idx: float(1 - err[idx].sum() / max(dev[idx].sum(), 1e-12))


def balanced_stat(hits: np.ndarray, labels: np.ndarray) -> Statistic:
    """Balanced accuracy: the mean over the classes present of the fraction of their objects right
    (1/0 ``hits`` per object, ``labels`` its class); a constant answer scores 1 / classes."""
    classes = int(labels.max()) + 1 if len(labels) else 1

    def stat(idx: np.ndarray) -> float:
        count = np.bincount(labels[idx], minlength=classes)
        right = np.bincount(labels[idx], hits[idx], minlength=classes)
        present = count > 0
        return float(np.mean(right[present] / count[present]))

    return stat


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the ``positive`` (bool) objects: the probability that a
    positive outscores a negative, ties counting half (Mann-Whitney U); NaN without both kinds."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_stat(score: np.ndarray, positive: np.ndarray) -> Statistic:
    return lambda idx: auc(score[idx], positive[idx])
