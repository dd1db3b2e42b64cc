"""The object-level probe: what a frozen detector's box features can tell, with intervals.

:func:`run_probe` takes a :class:`~soco_det.probe.network.ProbeNetwork` and two object sets
(train objects fit the read-outs, val objects score them), re-estimates BatchNorm statistics on
their images, and scores, for each feature (``roi``: FPN RoIAlign; ``head``: box-head output):

========================  ====================================================================
``linear_top1``           logistic regression on the object classes
``linear_balanced``       its balanced accuracy (mean of the per-class accuracies)
``linear_auc``            two classes only (e.g. object vs background): ROC AUC of its margin
``knn_top1``              20-NN cosine vote
``knn_balanced``          its balanced accuracy
``loc_r2``                R^2 of the IoU of jittered boxes regressed from their features
``retrieval_top1``        the same object found in a second augmented view of its image
``effective_rank``        of the val features (~1: collapsed), over 80 % subsets of them
========================  ====================================================================

Every score is kept per val object, so :func:`summarise` gives bootstrap 95 % intervals and
:func:`paired_difference` compares two networks on the *same* objects and resamples.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from soco_det.logs import get_logger
from soco_det.probe import tasks
from soco_det.probe.network import ProbeNetwork
from soco_det.probe.objects import ObjectSet, PoolSpec, augmented_views, extract, jittered_boxes, reestimate_bn

log = get_logger(__name__)

FEATURES = ("roi", "head")
TASKS = ("linear", "knn", "loc", "retrieval", "rank")
JITTERS_PER_OBJECT = 4


@dataclass
class ProbeResult:
    """Per-object scores of one network: ``scores[feature][name]`` arrays over the val objects
    (``loc_err``/``loc_dev`` for the R^2), ``ranks[feature]`` the effective rank of the val features."""

    name: str
    n_train: int
    n_val: int
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    labels: np.ndarray | None = None  # the val objects' classes, for the balanced accuracy and the AUC
    ranks: dict[str, float] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # val features, for the rank's bootstrap
    seconds: float = 0.0
    loaded: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def run_probe(
    net: ProbeNetwork,
    train: ObjectSet,
    val: ObjectSet,
    spec: PoolSpec,
    device: torch.device | str = "cpu",
    seed: int = 0,
    task_names: Sequence[str] = TASKS,
    copy_network: bool = True,
) -> ProbeResult:
    """Probe ``net`` (a copy of it, unless ``copy_network=False``): BN re-estimated on the images of
    ``train`` and ``val``, read-outs fitted on ``train`` objects and scored on ``val`` objects."""
    t0 = time.perf_counter()
    device = torch.device(device)
    unknown = sorted(set(task_names) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown probe tasks {unknown} (known: {list(TASKS)})")
    if copy_network:
        net = copy.deepcopy(net)
    net.to(device)
    reestimate_bn(net, [train, val], spec, device)
    result = ProbeResult(net.name, len(train), len(val), loaded=dict(net.loaded), labels=val.labels)
    sets = {}
    for name, objects in (("train", train), ("val", val)):
        box_sets = {"objects": (objects.boxes, objects.image_index)}
        if "loc" in task_names:
            boxes, owner, iou = jittered_boxes(objects, JITTERS_PER_OBJECT, seed + (name == "val"))
            box_sets["jitter"] = (boxes, objects.image_index[owner])
        feats = extract(net, objects, spec, device, box_sets)
        sets[name] = feats
        if "loc" in task_names:
            sets[name + "_jitter"] = (feats["jitter"], owner, iou)
    feats_t, feats_v = sets["train"]["objects"], sets["val"]["objects"]
    second = None
    if "retrieval" in task_names:
        views, boxes, valid = augmented_views(val, seed + 7)
        second = (extract(net, val, spec, device, {"objects": (boxes, val.image_index)}, views)["objects"], valid)
    for kind in FEATURES:
        xt, xv = feats_t.get(kind), feats_v.get(kind)
        s: dict[str, np.ndarray] = {}
        if "linear" in task_names:
            s.update(_linear_scores(xt, train.labels, xv, val.labels, seed))
        if "knn" in task_names:
            s["knn_top1"] = tasks.knn_probe(xt, train.labels, xv, val.labels)
        if "loc" in task_names:
            (jt, ot, it), (jv, ov, iv) = sets["train_jitter"], sets["val_jitter"]
            s["loc_err"], s["loc_dev"] = tasks.localisation_probe(
                jt.get(kind), it, ot, jv.get(kind), iv, ov, len(val), seed
            )
        if second is not None:
            s["retrieval_top1"] = tasks.retrieval_probe(xv, second[0].get(kind), second[1], xt)
        if "rank" in task_names:
            result.ranks[kind] = tasks.effective_rank(xv)
            result.features[kind] = xv
        result.scores[kind] = s
    result.seconds = time.perf_counter() - t0
    return result


def _linear_scores(xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """``linear_top1`` (1/0 per val object) and, for two classes, ``linear_margin``: the logit of
    class 0 (the objects, against background boxes) minus class 1's, per val object (for the AUC)."""
    classes = int(max(yt.max(), yv.max())) + 1
    logits = tasks.linear_logits(xt, yt, xv, classes, seed)
    out = {"linear_top1": (logits.argmax(1) == yv).astype(np.float64)}
    if classes == 2:
        out["linear_margin"] = logits[:, 0] - logits[:, 1]
    return out


def _statistics(result: ProbeResult, kind: str) -> dict[str, tasks.Statistic]:
    s = result.scores[kind]
    stats: dict[str, tasks.Statistic] = {}
    for name in ("linear_top1", "knn_top1", "retrieval_top1"):
        if name in s:
            stats[name] = tasks.mean_stat(s[name])
    if "loc_err" in s:
        stats["loc_r2"] = tasks.r2_stat(s["loc_err"], s["loc_dev"])
    if result.labels is not None:
        for name in ("linear", "knn"):
            if f"{name}_top1" in s:
                stats[f"{name}_balanced"] = tasks.balanced_stat(s[f"{name}_top1"], result.labels)
        if "linear_margin" in s:
            stats["linear_auc"] = tasks.auc_stat(s["linear_margin"], result.labels == 0)
    return stats


def summarise(result: ProbeResult, resamples: int = 1000, rank_resamples: int = 50, seed: int = 0) -> dict[str, Any]:
    """``{"roi": {"linear_top1": {"mean", "ci95"}, ..., "effective_rank": {...}}, "head": ...}``."""
    out: dict[str, Any] = {}
    for kind in result.scores:
        out[kind] = {
            name: tasks.bootstrap(stat, result.n_val, resamples, seed).as_dict()
            for name, stat in _statistics(result, kind).items()
        }
        if kind in result.ranks:
            x = result.features[kind]
            out[kind]["effective_rank"] = tasks.subsample(
                lambda idx: tasks.effective_rank(x[idx]), result.n_val, resamples=rank_resamples, seed=seed
            ).as_dict()
    return out


def paired_difference(a: ProbeResult, b: ProbeResult, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``a - b`` per feature and score, with a bootstrap interval over the same resampled objects."""
    if a.n_val != b.n_val:
        raise ValueError(f"paired probes need the same val objects ({a.n_val} vs {b.n_val})")
    out: dict[str, Any] = {}
    for kind in a.scores:
        sa, sb = _statistics(a, kind), _statistics(b, kind)
        out[kind] = {
            name: tasks.bootstrap(
                lambda idx, f=sa[name], g=sb[name]: f(idx) - g(idx), a.n_val, resamples, seed
            ).as_dict()
            for name in sa
            if name in sb
        }
    return out


def combined_paired_difference(
    pairs: Sequence[tuple[ProbeResult, ProbeResult]], resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The mean over several (a, b) pairs (e.g. one per seed, all on the same val objects) of
    ``a - b``, with one bootstrap over the objects shared by every pair (the same resample for all)."""
    n = pairs[0][0].n_val
    if any(a.n_val != n or b.n_val != n for a, b in pairs):
        raise ValueError("every pair must be probed on the same val objects")
    out: dict[str, Any] = {}
    for kind in pairs[0][0].scores:
        stats = [(_statistics(a, kind), _statistics(b, kind)) for a, b in pairs]
        names = [name for name in stats[0][0] if all(name in sa and name in sb for sa, sb in stats)]
        out[kind] = {
            name: tasks.bootstrap(
                lambda idx, name=name: float(np.mean([sa[name](idx) - sb[name](idx) for sa, sb in stats])),
                n,
                resamples,
                seed,
            ).as_dict()
            for name in names
        }
    return out


TABLE_SCORES = (
    "linear_top1",
    "linear_balanced",
    "linear_auc",
    "knn_top1",
    "knn_balanced",
    "loc_r2",
    "retrieval_top1",
    "effective_rank",
)
PAIRED_HEADER = "difference = second minus first"


def format_table(summaries: dict[str, dict[str, Any]], kind: str = "roi", paired: bool = False) -> str:
    """A markdown table: one row per network, ``mean [lo, hi]`` per score (those any row has).
    ``paired``: the rows are paired differences (``"B - A"``), and the header says so."""
    present = [n for n in TABLE_SCORES if any(n in s.get(kind, {}) for s in summaries.values())]
    title = f"{kind} features" + (f", {PAIRED_HEADER}" if paired else "")
    lines = [f"| {title} | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for label, s in summaries.items():
        cells = []
        for n in present:
            e = s.get(kind, {}).get(n)
            cells.append("" if e is None else f"{e['mean']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
