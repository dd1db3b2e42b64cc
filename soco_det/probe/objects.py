"""Object features for the probe: ground-truth boxes of a COCO set pooled by a frozen network.

Every image is resized to ``size x size`` (as SoCo's whole-image view V1 is), normalised with the
pretraining mean/std, and each ground-truth box is pooled with RoIAlign on its assigned FPN level
(the pretraining level thresholds, in pixels of that view; larger boxes go to the top level). Two
features per box: ``roi`` (the flattened ``C x s x s`` RoIAlign output, what a detector's box head
reads) and ``head`` (the box head's fc output). Boxes are ``[x1, y1, x2, y2]`` normalised to the
image (continuous convention).

Before pooling, :func:`reestimate_bn` replaces every BatchNorm's running statistics by the
average over the probe images (and their boxes, for the head), so that a network trained on other
images (or untrained) is read with statistics of the images it is probed on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from soco_det.data.coco import check_image_files, read_coco
from soco_det.data.levels import assign_levels
from soco_det.errors import UserError
from soco_det.imageio import load_rgb
from soco_det.logs import get_logger
from soco_det.models.roi import roi_align_boxes
from soco_det.probe.network import ProbeNetwork

log = get_logger(__name__)

MIN_BOX_PIXELS = 4.0  # boxes thinner than this (in the original image) are left out


@dataclass
class ObjectSet:
    """The objects of a COCO file: ``images[i]`` paths, and per object its image index, normalised
    box ``[N, 4]`` float32, contiguous label ``[N]`` int64 (``categories[label]`` is its COCO id)."""

    images: list[Path]
    image_index: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    categories: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def read_objects(
    coco_json: str | Path,
    images_root: str | Path,
    max_images: int | None = None,
    categories: Sequence[int] | None = None,
) -> ObjectSet:
    """Objects of ``coco_json`` (non-crowd, at least :data:`MIN_BOX_PIXELS` wide and high), from
    the first ``max_images`` images (in file order) that have any. ``categories`` fixes the
    label order (pass the train set's to the val set); objects of other categories are left out
    and counted in a warning.

    The file is read and checked as fine-tuning reads it (:func:`soco_det.data.coco.read_coco`:
    a ``bbox`` that is not four numbers, a category that ``categories`` does not list, a
    ``file_name`` outside ``images_root`` are one-line errors), and every image used must exist."""
    path = Path(coco_json)
    coco, _ = read_coco(path)
    per_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd", 0) or w < MIN_BOX_PIXELS or h < MIN_BOX_PIXELS:
            continue
        per_image.setdefault(ann["image_id"], []).append(ann)
    cats = (
        list(categories)
        if categories is not None
        else sorted(
            {c["id"] for c in coco.get("categories", [])} or {a["category_id"] for v in per_image.values() for a in v}
        )
    )
    label_of = {c: i for i, c in enumerate(cats)}
    other = sum(a["category_id"] not in label_of for v in per_image.values() for a in v)
    if other:
        log.warning("%s: %d object(s) of categories the train set does not have are left out", path, other)
    paths, index, boxes, labels = [], [], [], []
    for im in coco["images"]:
        anns = [a for a in per_image.get(im["id"], []) if a["category_id"] in label_of]
        if not anns:
            continue
        if max_images is not None and len(paths) >= max_images:
            break
        w_img, h_img = float(im["width"]), float(im["height"])
        for a in anns:
            x, y, w, h = a["bbox"]
            boxes.append([x / w_img, y / h_img, (x + w) / w_img, (y + h) / h_img])
            labels.append(label_of[a["category_id"]])
            index.append(len(paths))
        paths.append(Path(images_root) / im["file_name"])
    if not paths:
        raise UserError(f"{path}: no annotated objects to probe")
    check_image_files(path, Path(images_root), [p.relative_to(Path(images_root)).as_posix() for p in paths])
    return ObjectSet(
        paths,
        np.asarray(index, np.int64),
        np.clip(np.asarray(boxes, np.float32), 0, 1),
        np.asarray(labels, np.int64),
        cats,
    )


def load_image_tensor(
    path: Path,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    flip: bool = False,
    crop: tuple[float, float, float, float] | None = None,
) -> torch.Tensor:
    """``float32 [3, size, size]``: the image (or its normalised ``crop`` window), resized, normalised."""
    img = load_rgb(path)
    box = None
    if crop is not None:
        box = (crop[0] * img.width, crop[1] * img.height, crop[2] * img.width, crop[3] * img.height)
    img = img.resize((size, size), Image.BILINEAR, box=box)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def box_levels(boxes: np.ndarray, size: int, thresholds: Sequence[float], num_levels: int) -> np.ndarray:
    """FPN level per normalised box in a ``size``-pixel square view; above the last threshold: top level."""
    sides = (boxes[:, 2:] - boxes[:, :2]) * size
    levels = assign_levels(np.sqrt(np.clip(sides[:, 0] * sides[:, 1], 0, None)), thresholds)
    levels[levels < 0] = num_levels - 1
    return np.minimum(levels, num_levels - 1)


@torch.no_grad()
def pool_boxes(
    net: ProbeNetwork,
    pyramid: list[torch.Tensor],
    boxes: torch.Tensor,
    image: torch.Tensor,
    levels: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """RoIAlign ``[R, C, s, s]`` of normalised ``boxes`` ``[R, 4]`` of batch images ``image`` ``[R]``,
    each on its level (row order kept)."""
    out = None
    for p, (feat, stride) in enumerate(zip(pyramid, net.strides)):
        rows = torch.nonzero(levels == p, as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        pooled = roi_align_boxes(feat, boxes[rows], (size, size), stride, net.roi_size, batch_index=image[rows])
        if out is None:
            out = pooled.new_zeros(len(boxes), *pooled.shape[1:])
        out[rows] = pooled
    assert out is not None or len(boxes) == 0
    return out if out is not None else torch.zeros(0)


def batches(n: int, size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


@dataclass
class PoolSpec:
    """How images become tensors and boxes become RoIs: view side, levels, normalisation."""

    size: int
    thresholds: Sequence[float]
    mean: Sequence[float]
    std: Sequence[float]
    batch_size: int = 32


@torch.no_grad()
def reestimate_bn(net: ProbeNetwork, sets: Sequence[ObjectSet], spec: PoolSpec, device: torch.device) -> None:
    """Running statistics of every BatchNorm = their average over the images of ``sets`` (encoder
    and neck) and over the boxes' RoIs (head); the network is in eval mode afterwards."""
    bns = [m for mod in net.modules() for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    for mod in net.modules():
        mod.train()
    try:
        for objects in sets:
            for rows in batches(len(objects.images), spec.batch_size):
                images = torch.stack(
                    [load_image_tensor(objects.images[i], spec.size, spec.mean, spec.std) for i in rows]
                ).to(device)
                pyramid = net.pyramid(images)
                mask = np.isin(objects.image_index, rows)
                if mask.sum() < 2:
                    continue
                image = torch.as_tensor(np.searchsorted(rows, objects.image_index[mask]), device=device)
                boxes = torch.as_tensor(objects.boxes[mask], device=device)
                levels = torch.as_tensor(
                    box_levels(objects.boxes[mask], spec.size, spec.thresholds, len(net.strides)), device=device
                )
                net.head(pool_boxes(net, pyramid, boxes, image, levels, spec.size))
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        for mod in net.modules():
            mod.eval()


ROI_GRID = 2  # the RoIAlign output is average-pooled to 2x2 cells for the "roi" feature


@dataclass
class BoxFeatures:
    """``roi`` ``[N, C*4]`` (the RoIAlign output average-pooled to 2x2) and ``head`` ``[N, D]``
    (the box head's output) float32 features of N boxes."""

    roi: np.ndarray
    head: np.ndarray

    def get(self, kind: str) -> np.ndarray:
        return getattr(self, kind)


BoxSet = tuple[np.ndarray, np.ndarray]  # (normalised boxes [N, 4], image index [N])


@torch.no_grad()
def extract(
    net: ProbeNetwork,
    objects: ObjectSet,
    spec: PoolSpec,
    device: torch.device,
    box_sets: dict[str, BoxSet] | None = None,
    views: Sequence[tuple[bool, tuple[float, float, float, float] | None]] | None = None,
) -> dict[str, BoxFeatures]:
    """Features of every box set (default: ``{"objects": the objects' own boxes}``), each image's
    pyramid computed once; ``views[i]`` optionally gives image i a ``(flip, crop window)`` (the
    boxes must then be in that view's coordinates)."""
    if box_sets is None:
        box_sets = {"objects": (objects.boxes, objects.image_index)}
    collected: dict[str, list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]] = {k: [] for k in box_sets}
    for rows in batches(len(objects.images), spec.batch_size):
        flips_crops = [views[i] if views is not None else (False, None) for i in rows]
        images = torch.stack(
            [
                load_image_tensor(objects.images[i], spec.size, spec.mean, spec.std, flip, crop)
                for i, (flip, crop) in zip(rows, flips_crops)
            ]
        ).to(device)
        pyramid = net.pyramid(images)
        for name, (boxes, image_index) in box_sets.items():
            sel = np.nonzero((image_index >= rows[0]) & (image_index <= rows[-1]))[0]
            if len(sel) == 0:
                continue
            b = boxes[sel]
            rois = pool_boxes(
                net,
                pyramid,
                torch.as_tensor(b, device=device),
                torch.as_tensor(image_index[sel] - rows[0], device=device),
                torch.as_tensor(box_levels(b, spec.size, spec.thresholds, len(net.strides)), device=device),
                spec.size,
            )
            grid = torch.nn.functional.adaptive_avg_pool2d(rois, ROI_GRID).flatten(1)
            collected[name].append((sel, grid.float().cpu(), net.head(rois).float().cpu()))
    out = {}
    for name, (boxes, _) in box_sets.items():
        parts = collected[name]
        if not parts:
            raise ValueError(f"no boxes to pool in box set {name!r}")
        order = np.concatenate([p[0] for p in parts])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        roi = torch.cat([p[1] for p in parts]).numpy()[inverse]
        head = torch.cat([p[2] for p in parts]).numpy()[inverse]
        assert len(roi) == len(boxes)
        out[name] = BoxFeatures(roi=roi, head=head)
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two ``[N, 4]`` box arrays."""
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def jittered_boxes(objects: ObjectSet, per_object: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_object`` boxes around each object (centre shifted by up to half its size, sides scaled
    by 0.5x-2x, clipped to the image) and their IoU with it: ``(boxes [N*J, 4], owner [N*J], iou [N*J])``."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(len(objects)), per_object)
    gt = objects.boxes[owner]
    wh = gt[:, 2:] - gt[:, :2]
    centre = (gt[:, :2] + gt[:, 2:]) / 2 + rng.uniform(-0.5, 0.5, size=wh.shape) * wh
    new_wh = wh * np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=wh.shape))
    boxes = np.clip(np.concatenate([centre - new_wh / 2, centre + new_wh / 2], axis=1), 0, 1).astype(np.float32)
    tiny = (boxes[:, 2:] - boxes[:, :2]).min(axis=1) < 1e-3
    boxes[tiny] = gt[tiny]
    return boxes, owner, box_iou(boxes, gt).astype(np.float32)


def augmented_views(
    objects: ObjectSet, seed: int, min_visible: float = 0.6
) -> tuple[list[tuple[bool, tuple[float, float, float, float]]], np.ndarray, np.ndarray]:
    """A second view per image (a random crop keeping 60-100 % of each side, flipped with p 0.5)
    and the objects' boxes in it: ``(views, boxes [N, 4], valid [N])``; an object is valid when at
    least ``min_visible`` of its box stays inside the crop."""
    rng = np.random.default_rng(seed)
    views = []
    for _ in objects.images:
        side = rng.uniform(0.6, 1.0, size=2)
        x0, y0 = rng.uniform(0, 1 - side[0]), rng.uniform(0, 1 - side[1])
        views.append((bool(rng.random() < 0.5), (float(x0), float(y0), float(x0 + side[0]), float(y0 + side[1]))))
    crops = np.asarray([v[1] for v in views], np.float32)[objects.image_index]
    flips = np.asarray([v[0] for v in views])[objects.image_index]
    origin, extent = crops[:, :2], crops[:, 2:] - crops[:, :2]
    inside = np.clip(
        np.concatenate([(objects.boxes[:, :2] - origin) / extent, (objects.boxes[:, 2:] - origin) / extent], axis=1),
        0,
        1,
    )
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    visible = area(inside) * np.prod(extent, axis=1) / np.maximum(area(objects.boxes), 1e-12)
    boxes = inside.copy()
    boxes[flips, 0], boxes[flips, 2] = 1 - inside[flips, 2], 1 - inside[flips, 0]
    return views, boxes.astype(np.float32), visible >= min_visible


def _pairwise_overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(intersection [N, M], area of a [N], area of b [M])`` of every pair of boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return inter, area_a, area_b


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` ``[N, 4]`` with every box of ``b`` ``[M, 4]``: ``[N, M]``."""
    inter, area_a, area_b = _pairwise_overlap(a, b)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def pairwise_inside(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The fraction of each box of ``a`` that lies inside each box of ``b``: ``[N, M]``."""
    inter, area_a, _ = _pairwise_overlap(a, b)
    return inter / np.maximum(area_a[:, None], 1e-12)


BACKGROUND_LABEL_ID = -1  # the "category id" of the background class in ``ObjectSet.categories``
BACKGROUND_SHRINK = (1.0, 0.5, 0.25)  # box sizes tried in turn, as fractions of the object's
MAX_INSIDE = 0.5  # at most this fraction of a background box may lie inside any one object


def _background_for_image(own: np.ndarray, rng: np.random.Generator, max_iou: float, tries: int) -> np.ndarray:
    """One box per object of ``own`` ``[K, 4]``: the object's size (sides x0.8-1.25), placed at random
    where its IoU with every object is below ``max_iou`` and at most :data:`MAX_INSIDE` of it lies in
    any one object (a box inside a large object is a part of it); where no draw of ``tries`` fits, a
    smaller box is tried (:data:`BACKGROUND_SHRINK`). ``[<= K, 4]``: objects that found no place get none."""
    sides = np.clip(own[:, 2:] - own[:, :2], 1e-3, 0.95)
    found = np.full((len(own), 4), np.nan, np.float32)
    for shrink in BACKGROUND_SHRINK:
        pending = np.nonzero(np.isnan(found[:, 0]))[0]
        if len(pending) == 0:
            break
        scale = np.exp(rng.uniform(np.log(0.8), np.log(1.25), size=(len(pending), tries, 2)))
        wh = np.clip(sides[pending, None, :] * shrink * scale, 1e-3, 0.95)
        x0y0 = rng.uniform(0, 1, size=wh.shape) * (1 - wh)
        cand = np.concatenate([x0y0, x0y0 + wh], axis=2).astype(np.float32)  # [P, tries, 4]
        inter, area_c, area_o = _pairwise_overlap(cand.reshape(-1, 4), own)
        iou = inter / np.maximum(area_c[:, None] + area_o[None, :] - inter, 1e-12)
        inside = inter / np.maximum(area_c[:, None], 1e-12)
        ok = ((iou.max(axis=1) < max_iou) & (inside.max(axis=1) <= MAX_INSIDE)).reshape(len(pending), tries)
        has = ok.any(axis=1)
        first = ok.argmax(axis=1)
        found[pending[has]] = cand[np.nonzero(has)[0], first[has]]
    return found[~np.isnan(found[:, 0])]


def with_background_boxes(objects: ObjectSet, seed: int, max_iou: float = 0.3, tries: int = 50) -> ObjectSet:
    """For a single-class set: as many background boxes in each image as it has objects, each the size
    of one of them and drawn away from all of them (IoU < ``max_iou`` with each, and at most half of it
    inside any one), labelled ``1``
    (category id :data:`BACKGROUND_LABEL_ID`): the classifiers then tell objects from background on a
    balanced two-class task, where answering "object" always scores 0.5 (plain and balanced accuracy).
    An image too full for some of them gets fewer (counted in a warning)."""
    rng = np.random.default_rng(seed)
    extra_boxes, extra_index = [], []
    for i in range(len(objects.images)):
        own = objects.boxes[objects.image_index == i]
        if len(own) == 0:
            continue
        boxes = _background_for_image(own, rng, max_iou, tries)
        extra_boxes.append(boxes)
        extra_index.append(np.full(len(boxes), i, np.int64))
    boxes = np.concatenate(extra_boxes) if extra_boxes else np.zeros((0, 4), np.float32)
    index = np.concatenate(extra_index) if extra_index else np.zeros(0, np.int64)
    if len(boxes) < len(objects):
        log.warning(
            "background boxes: %d of %d objects got no background box of IoU < %.2f with every object "
            "(images full of objects); the two classes are unbalanced, see the balanced accuracy",
            len(objects) - len(boxes),
            len(objects),
            max_iou,
        )
    return ObjectSet(
        objects.images,
        np.concatenate([objects.image_index, index]),
        np.concatenate([objects.boxes, boxes.astype(np.float32)]),
        np.concatenate([objects.labels, np.ones(len(boxes), np.int64)]),
        [*objects.categories, BACKGROUND_LABEL_ID],
    )


def spec_from_config(cfg, size: int | None = None) -> PoolSpec:  # noqa: ANN001 - a PretrainConfig
    """The V1 view side, level thresholds and normalisation of a pretraining config; with ``size``,
    images are probed at that side instead and the level thresholds scale with it."""
    views = cfg.data.views.resolved()
    v1 = int(views.geometry.view_sizes[0])
    size = v1 if size is None else int(size)
    return PoolSpec(
        size=size,
        thresholds=[t * size / v1 for t in views.levels.level_thresholds],
        mean=list(views.photometric.mean),
        std=list(views.photometric.std),
    )
