"""Frozen-backbone detection probe: does an init's backbone + FPN carry what a detector needs, in COCO AP?

Full fine-tuning on two CPU cores cannot run long enough for box AP to leave the floor, so this probe
trains only the detector's heads on frozen features, and measures COCO box AP / AP50 with pycocotools:

1. one box-only Faster R-CNN architecture (:func:`soco_det.models.maskrcnn.build_maskrcnn`, the
   fine-tuning network without its mask branch) per init, its backbone (ResNet + FPN) loaded from the
   init and frozen (eval mode: BatchNorm uses its running statistics);
2. every train and val image resized to ``size x size`` pixels (a square: boxes are scaled per axis
   and predictions mapped back to the original image), and the FPN features (P2..P5 and the pooled
   P6) of all of them, plus the mirrored train images when ``flip``, computed **once per init** and
   kept in memory;
3. the RPN and the RoI box head (4conv1fc + predictor) trained for ``iterations`` steps of SGD on
   those cached features, then scored on the val features.

Pairing (fine-tuning seed ``f``): every init gets the same randomly initialised RPN and predictor
(torch seeded with ``f`` before the network is built), the same low-label subset of the train images
and the same order of images and flips (``numpy.random.default_rng([f, ...])``). The 4conv1fc box
head is SoCo-pretrained in a SoCo run, so ``head`` decides what it starts from:

* ``"own"`` (default): each init's own box head — SoCo's pretrained one; the untrained network's for
  ``untrained`` and for an image-level BYOL run (which has no head) — as fine-tuning from the export
  would start;
* ``"shared"``: the same freshly initialised head (seeded by ``f``) for every init, so that only the
  backbone and FPN differ.

docs/method.md 7 describes the transfer setting this probe shortens (Mask R-CNN fine-tuned end to end).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.models.maskrcnn import build_maskrcnn, widths_of
from soco_det.transfer.coco_data import CocoInstances, to_tensor
from soco_det.transfer.evaluation import coco_metrics, to_coco_results
from soco_det.transfer.frozen_config import FrozenSettings

log = get_logger(__name__)

BOX_HEAD = "roi_heads.box_head."
BACKBONE = "backbone."
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- data
@dataclass
class SplitImages:
    """The images of a COCO split, resized to ``size x size``: ``pixels`` float32 ``[N, 3, S, S]`` in
    ``[0, 1]``; ``targets[i]``: ``boxes`` float32 ``[n, 4]`` xyxy pixels of the resized image and
    ``labels`` int64 ``[n]`` in ``1..C``; ``sizes[i]`` the original ``(W, H)``; ``image_ids`` the COCO ids."""

    dataset: CocoInstances
    pixels: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    sizes: list[tuple[int, int]]
    image_ids: list[int]


def read_split(json_path: str | Path, images: str | Path, size: int) -> SplitImages:
    """Decode and resize every image of a COCO file (checked by :class:`CocoInstances`)."""
    dataset = CocoInstances(json_path, images, train=False)
    if len(dataset) == 0:
        raise UserError(f"{json_path}: no images")
    pixels, targets, sizes = [], [], []
    for i in range(len(dataset)):
        image = dataset.load_image(i)
        w, h = image.size
        target = dataset.target(i)
        scale = torch.tensor([size / w, size / h, size / w, size / h])
        targets.append({"boxes": target["boxes"] * scale, "labels": target["labels"]})
        pixels.append(to_tensor(image.resize((size, size), resample=2)))  # 2: bilinear
        sizes.append((w, h))
    return SplitImages(dataset, torch.stack(pixels), targets, sizes, list(dataset.ids))


def flipped_targets(targets: list[dict[str, torch.Tensor]], size: int) -> list[dict[str, torch.Tensor]]:
    """The targets of the mirrored images: ``x -> size - x``, so ``[x1, x2]`` becomes ``[S - x2, S - x1]``."""
    out = []
    for t in targets:
        boxes = t["boxes"].clone()
        boxes[:, 0], boxes[:, 2] = size - t["boxes"][:, 2], size - t["boxes"][:, 0]
        out.append({"boxes": boxes, "labels": t["labels"]})
    return out


# ----------------------------------------------------------------------------- network
def load_inits(
    sources: Sequence[str], cfg: Any | None, seed: int | None, tmp: str | Path
) -> dict[str, dict[str, torch.Tensor]]:
    """Torchvision-named weights of every source: ``"untrained"`` (the network a run with ``cfg``
    starts from, seed ``seed`` or the config's; written as a step-0 checkpoint under ``tmp``), a run
    folder, checkpoint, official checkpoint or export file (:func:`soco_det.transfer.model.read_weights`).
    With a ``cfg``, what a source lacks (an image-level run's FPN and box head) is the untrained network's."""
    import copy

    from soco_det.export.untrained import save_untrained
    from soco_det.probe.network import UNTRAINED, fpn_model_config
    from soco_det.transfer.model import read_weights

    base = None
    if cfg is not None:
        cfg = copy.deepcopy(cfg)
        cfg.model = fpn_model_config(cfg.model)  # an image-level run's config: the FPN network of its depth
        base = read_weights(save_untrained(cfg, Path(tmp) / "untrained.pt", cfg.seed if seed is None else seed))
    inits = {}
    for src in sources:
        if str(src) == UNTRAINED:
            if base is None:
                raise UserError("'untrained' needs --config (a recipe name or a run's config.yaml) or a run folder")
            inits[str(src)] = base
        else:
            weights = read_weights(src)
            inits[str(src)] = complete_weights(weights, base) if base is not None else weights
    return inits


def complete_weights(weights: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with the parts it lacks taken from ``base`` (e.g. an image-level BYOL export, a
    ResNet alone, completed by the untrained network's FPN and box head, as the object probe does)."""
    parts = ("backbone.body.", "backbone.fpn.", BOX_HEAD)
    have = {p for p in parts if any(k.startswith(p) for k in weights)}
    return {**{k: v for k, v in base.items() if k.startswith(parts) and not k.startswith(tuple(have))}, **weights}


def infer_depth_of(state: Mapping[str, torch.Tensor], where: object) -> int:
    from soco_det.export.source import infer_depth

    prefix = "backbone.body."
    body = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not body:
        raise UserError(f"{where}: holds no backbone (backbone.body.*) to probe")
    return infer_depth(body, where)


def build_detector(
    weights: Mapping[str, torch.Tensor], num_classes: int, settings: FrozenSettings, seed: int, where: object
) -> nn.Module:
    """The box-only Faster R-CNN of ``weights`` (torchvision export names): its random parts drawn with
    torch seeded by ``seed`` (the same for every init of that seed), then the backbone and FPN — and,
    with ``head="own"``, the 4conv1fc box head where ``weights`` has one — loaded. Every key the
    network does not load must be the RPN's or the box predictor's (or the box head's)."""
    widths = widths_of(dict(weights))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_maskrcnn(
            infer_depth_of(weights, where),
            num_classes,
            min_size_test=settings.size,
            max_size_test=settings.size,
            roi_batch_size=settings.roi_batch_size,
            rpn_batch_size=settings.rpn_batch_size,
            rpn_pre_nms_top_n=tuple(settings.rpn_pre_nms_top_n),
            rpn_post_nms_top_n=tuple(settings.rpn_post_nms_top_n),
            detections_per_img=settings.detections_per_img,
            score_thresh=settings.score_thresh,
            masks=False,
            **widths,
        )
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    sizes = tuple((int(a),) for a in settings.anchor_sizes)
    model.rpn.anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    keep = (BACKBONE, BOX_HEAD) if settings.head == "own" else (BACKBONE,)
    state = {k: v for k, v in weights.items() if k.startswith(keep)}
    result = model.load_state_dict(state, strict=False)
    bad = list(result.unexpected_keys)
    left = [k for k in result.missing_keys if not k.startswith(("rpn.", "roi_heads.box_predictor.", BOX_HEAD))]
    if bad or left:
        raise UserError(f"{where}: does not fit the probe's detector: unexpected {bad[:3]}, missing {left[:3]}")
    log.info(
        "%s: backbone+FPN%s loaded (frozen); random: RPN, box predictor%s",
        where,
        " and box head" if any(k.startswith(BOX_HEAD) for k in state) else "",
        "" if any(k.startswith(BOX_HEAD) for k in state) else ", box head",
    )
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def precise_bn(backbone: nn.Module, pixels: torch.Tensor, device: torch.device, batch: int) -> None:
    """Replace the running mean and variance of every BatchNorm of ``backbone`` by their average over
    ``pixels`` ``[N, 3, S, S]`` (in ``[0, 1]``), in batches of ``batch``; no weight changes."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    backbone.to(device).train()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
    for start in range(0, len(pixels), batch):
        backbone((pixels[start : start + batch].to(device) - mean) / std)
    backbone.eval()


@torch.no_grad()
def cache_features(backbone: nn.Module, pixels: torch.Tensor, device: torch.device, batch: int) -> dict[str, Any]:
    """FPN features of ``pixels`` ``[N, 3, S, S]`` in ``[0, 1]``: ``{level: float32 [N, C, h, w]}`` on
    ``device`` (levels ``"0"``..``"3"`` = P2..P5, ``"pool"`` = P6), backbone in eval mode."""
    backbone.eval().to(device)
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(pixels), batch):
        x = (pixels[start : start + batch].to(device) - mean) / std
        for level, f in backbone(x).items():
            chunks.setdefault(level, []).append(f.float())
    return {level: torch.cat(parts) for level, parts in chunks.items()}


def _image_list(n: int, size: int, device: torch.device) -> Any:
    from torchvision.models.detection.image_list import ImageList

    # the RPN's anchors read only the batch's padded shape, dtype and device: no pixels needed
    return ImageList(torch.zeros(1, 1, 1, 1, device=device).expand(n, 3, size, size), [(size, size)] * n)


# ----------------------------------------------------------------------------- training and scoring
def lr_at(step: int, settings: FrozenSettings) -> float:
    """Linear warmup from lr/10 over ``warmup_iters``, then ``lr``, x0.1 after ``decay_at`` of the run."""
    lr = settings.lr * (0.1 if step >= settings.decay_at * settings.iterations else 1.0)
    if step < settings.warmup_iters:
        lr *= 0.1 + 0.9 * step / settings.warmup_iters
    return lr


def batch_order(n_train: int, subset: np.ndarray, settings: FrozenSettings, seed: int) -> list[np.ndarray]:
    """Per iteration, the cached-feature rows of the batch: seeded epochs over ``subset`` (image
    indices), each row ``i`` or ``i + n_train`` (mirrored) by a seeded coin when ``flip``."""
    rows, epoch, stream = [], 0, np.empty(0, np.int64)
    while len(rows) < settings.iterations:
        while len(stream) < settings.batch_size:
            rng = np.random.default_rng([seed, 1, epoch])
            order = subset[rng.permutation(len(subset))]
            if settings.flip:
                order = order + n_train * (rng.random(len(order)) < 0.5)
            stream, epoch = np.concatenate([stream, order]), epoch + 1
        rows.append(stream[: settings.batch_size])
        stream = stream[settings.batch_size :]
    return rows


def train_heads(
    model: nn.Module,
    feats: Mapping[str, torch.Tensor],
    targets: Sequence[dict[str, torch.Tensor]],
    order: Sequence[np.ndarray],
    settings: FrozenSettings,
    seed: int,
) -> dict[str, float]:
    """SGD on the RPN and RoI heads over the cached features (rows ``order[step]`` of ``feats`` and
    ``targets``); returns ``{"seconds", "it_per_s", "final_loss"}``."""
    device = next(iter(feats.values())).device
    heads = [model.rpn, model.roi_heads]
    params = [p for h in heads for p in h.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norm parameters: no weight decay
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=settings.lr)
    else:
        opt = torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    for h in heads:
        h.to(device).train()
    torch.manual_seed(seed)  # the RPN's and RoI heads' box sampling
    t0, losses = time.perf_counter(), []
    for step, rows in enumerate(order):
        idx = torch.as_tensor(rows, device=device)
        batch = OrderedDict((level, f[idx]) for level, f in feats.items())
        tgt = [{k: v.to(device) for k, v in targets[int(r)].items()} for r in rows]
        images = _image_list(len(rows), settings.size, device)
        proposals, rpn_losses = model.rpn(images, batch, tgt)
        _, roi_losses = model.roi_heads(batch, proposals, images.image_sizes, tgt)
        loss = sum(rpn_losses.values()) + sum(roi_losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"frozen probe: non-finite loss at step {step}")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10) :]
    return {"seconds": seconds, "it_per_s": len(order) / max(seconds, 1e-9), "final_loss": float(np.mean(tail))}


@torch.no_grad()
def score_heads(model: nn.Module, feats: Mapping[str, torch.Tensor], split: SplitImages, size: int) -> dict[str, Any]:
    """COCO box metrics (fractions, :func:`~soco_det.transfer.evaluation.coco_metrics`) of the heads
    on the cached val features; predictions are mapped from the ``size x size`` image back to each
    image's own size."""
    model.rpn.eval()
    model.roi_heads.eval()
    n, results = len(split.image_ids), []
    for start in range(0, n, 16):
        rows = list(range(start, min(start + 16, n)))
        batch = OrderedDict((level, f[rows]) for level, f in feats.items())
        images = _image_list(len(rows), size, next(iter(feats.values())).device)
        proposals, _ = model.rpn(images, batch)
        detections, _ = model.roi_heads(batch, proposals, images.image_sizes)
        for r, det in zip(rows, detections):
            w, h = split.sizes[r]
            det = {k: v.cpu() for k, v in det.items()}
            det["boxes"] = det["boxes"] * torch.tensor([w / size, h / size, w / size, h / size])
            results += to_coco_results(det, split.image_ids[r], split.dataset.cat_ids)[0]
    return coco_metrics(split.dataset.coco, results, "bbox", split.image_ids)


# ----------------------------------------------------------------------------- the probe
def label_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """The seeded subset of ``round(fraction * n)`` (at least one) train image indices, sorted."""
    if not 0 < fraction <= 1:
        raise UserError(f"frozen probe: a train fraction must be in (0, 1], got {fraction}")
    k = max(1, int(round(fraction * n)))
    if k == n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 2]).choice(n, size=k, replace=False))


@dataclass
class ProbeData:
    """The train and val images of the probe, read once and shared by every init."""

    train: SplitImages
    val: SplitImages
    train_targets: list[dict[str, torch.Tensor]]  # the rows of the cached train features (mirrored after)


def read_probe_data(
    train_json: str | Path, val_json: str | Path, images: str | Path, settings: FrozenSettings
) -> ProbeData:
    train = read_split(train_json, images, settings.size)
    val = read_split(val_json, images, settings.size)
    if train.dataset.cat_ids != val.dataset.cat_ids:
        raise UserError(
            f"{val_json}: category ids {val.dataset.cat_ids} differ from {train_json}'s {train.dataset.cat_ids}"
        )
    targets = train.targets + (flipped_targets(train.targets, settings.size) if settings.flip else [])
    return ProbeData(train, val, targets)


def probe_init(
    name: str,
    weights: Mapping[str, torch.Tensor],
    data: ProbeData,
    settings: FrozenSettings,
    seeds: Sequence[int],
    fractions: Sequence[float],
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """One init: its features cached once, then the heads trained and scored for every train
    fraction and seed. Returns ``{fraction_key: {str(seed): {"bbox": metrics, "train": timing}}}``."""
    t0 = time.perf_counter()
    num_classes = data.train.dataset.num_classes
    backbone = build_detector(weights, num_classes, settings, 0, name).backbone
    pixels = data.train.pixels
    if settings.precise_bn:
        precise_bn(backbone, pixels, device, settings.cache_batch)
    if settings.flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    train_feats = cache_features(backbone, pixels, device, settings.cache_batch)
    val_feats = cache_features(backbone, data.val.pixels, device, settings.cache_batch)
    cache_s = time.perf_counter() - t0
    log.info("%s: features of %d + %d images cached in %.1f s", name, len(pixels), len(data.val.pixels), cache_s)
    n_train = len(data.train.image_ids)
    out: dict[str, dict[str, Any]] = {}
    for fraction in fractions:
        by_seed = {}
        for seed in seeds:
            model = build_detector(weights, num_classes, settings, seed, name)
            model.backbone = backbone  # the same frozen backbone whose features are cached
            subset = label_subset(n_train, fraction, seed)
            timing = train_heads(
                model, train_feats, data.train_targets, batch_order(n_train, subset, settings, seed), settings, seed
            )
            t_score = time.perf_counter()
            metrics = score_heads(model, val_feats, data.val, settings.size)
            timing["score_seconds"] = time.perf_counter() - t_score
            timing["minutes"] = (timing["seconds"] + timing["score_seconds"]) / 60
            by_seed[str(seed)] = {"bbox": metrics, "train": {**timing, "images": len(subset)}}
            log.info(
                "%s, %.0f %% of the labels, seed %d: box AP %.1f AP50 %.1f (%.2f it/s)",
                name,
                100 * fraction,
                seed,
                100 * (metrics["AP"] or 0),
                100 * (metrics["AP50"] or 0),
                timing["it_per_s"],
            )
        out[fraction_key(fraction)] = by_seed
    out["cache_seconds"] = cache_s  # type: ignore[assignment]
    return out


def fraction_key(fraction: float) -> str:
    """``"1"``, ``"0.2"``...: the JSON key of a train fraction."""
    return f"{fraction:g}"


def frozen_detection_probe(
    inits: Mapping[str, Mapping[str, torch.Tensor]],
    train_json: str | Path,
    val_json: str | Path,
    images: str | Path,
    settings: FrozenSettings | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    fractions: Sequence[float] = (1.0,),
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The frozen detection probe of every init (``{name: torchvision-named weights}``, e.g. from
    :func:`soco_det.transfer.model.read_weights`) on one COCO train/val pair.

    Returns ``{"settings", "seeds", "fractions", "results": {name: {fraction: {seed: {"bbox": {AP,
    AP50, ...}, "train": {...}}}, "cache_seconds"}}, "paired": {"B-A": {fraction: {"box_ap": {mean,
    ci95, values}, "box_ap50": ...}}}, "seconds"}``; AP values in ``results`` are fractions, the
    paired differences (each init minus the first, per seed, with a t-interval) in AP points."""
    from soco_det.torch_io import resolve_device

    settings = settings or FrozenSettings()
    settings.validate()
    if not inits:
        raise UserError("the frozen detection probe needs at least one init")
    device = torch.device(resolve_device(device, "--device"))
    t0 = time.perf_counter()
    data = read_probe_data(train_json, val_json, images, settings)
    results = {
        name: probe_init(name, weights, data, settings, seeds, fractions, device) for name, weights in inits.items()
    }
    names = list(inits)
    paired = {f"{b}-{names[0]}": paired_ap(results[b], results[names[0]], seeds, fractions) for b in names[1:]}
    return {
        "settings": asdict(settings),
        "seeds": list(seeds),
        "fractions": [float(f) for f in fractions],
        "results": results,
        "paired": paired,
        "seconds": time.perf_counter() - t0,
    }


def paired_ap(
    a: Mapping[str, Any], b: Mapping[str, Any], seeds: Sequence[int], fractions: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """``{fraction: {"box_ap": t_interval, "box_ap50": t_interval}}`` of the per-seed differences a - b (AP points)."""
    from soco_det.stats import t_interval

    out = {}
    for fraction in fractions:
        key = fraction_key(fraction)
        out[key] = {
            label: t_interval(
                [100 * ((a[key][str(s)]["bbox"][m] or 0.0) - (b[key][str(s)]["bbox"][m] or 0.0)) for s in seeds]
            )
            for m, label in (("AP", "box_ap"), ("AP50", "box_ap50"))
        }
    return out


def mean_ap(result: Mapping[str, Any], fraction: float, metric: str = "AP") -> float:
    """Mean over seeds of one init's ``metric`` at ``fraction``, in AP points."""
    runs = result[fraction_key(fraction)].values()
    return float(np.mean([100 * (r["bbox"][metric] or 0.0) for r in runs])) if runs else math.nan
