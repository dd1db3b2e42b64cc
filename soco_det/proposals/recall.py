"""Ground-truth recall of a proposal store: the fraction of a COCO file's boxes that some proposal
covers at IoU >= 0.5 (``soco-det proposals info STORE --coco FILE.json``), and the precision the
other way round (the fraction of proposals that cover some ground-truth box).

Store images are matched to the COCO ``file_name`` by basename (a store is keyed by paths relative
to its images root, a COCO file often by bare names). Rects are the official convention
(``w = max_x - min_x``, so the box spans ``x .. x + w + 1`` in continuous coordinates); COCO boxes
are ``[x, y, w, h]`` continuous.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soco_det.errors import UserError

IOU = 0.5


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[n, m]`` of continuous boxes ``a [n, 4]`` x ``b [m, 4]`` (``x1, y1, x2, y2``)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def rects_to_boxes(rects: np.ndarray) -> np.ndarray:
    """Official rects ``[n, 4]`` (w = max - min) -> continuous ``[x1, y1, x2, y2]`` float64."""
    r = np.asarray(rects, np.float64).reshape(-1, 4)
    return np.concatenate([r[:, :2], r[:, :2] + r[:, 2:] + 1], axis=1)


def read_coco_boxes(path: str | Path) -> dict[str, np.ndarray]:
    """``{basename: float64 [n, 4] x1y1x2y2}`` of a COCO json's non-crowd boxes (every image listed,
    with or without boxes)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the COCO json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: not a COCO json (no 'images' list)")
    names: dict[Any, str] = {}
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise UserError(f"{path}: image entry {im!r:.80} needs 'id' and 'file_name'")
        names[im["id"]] = posixpath.basename(im["file_name"].replace("\\", "/"))
    boxes: dict[str, list] = {n: [] for n in names.values()}
    for a in data.get("annotations") or []:
        box = a.get("bbox") if isinstance(a, dict) else None
        if not (isinstance(box, list) and len(box) == 4) or a.get("image_id") not in names:
            raise UserError(f"{path}: annotation {a!r:.80} needs a [x, y, w, h] bbox and a known image_id")
        if not a.get("iscrowd"):
            x, y, w, h = (float(v) for v in box)
            boxes[names[a["image_id"]]].append([x, y, x + w, y + h])
    return {n: np.asarray(b, np.float64).reshape(-1, 4) for n, b in boxes.items()}


@dataclass
class Recall:
    """Matched images, ground-truth boxes, the recall (fraction of GT boxes covered at IoU >= 0.5)
    and precision (fraction of proposals covering a GT box) of the kept and, if stored, raw rects."""

    images: int
    gt_boxes: int
    kept: float
    kept_precision: float
    raw: float | None = None

    def format(self, coco: str | Path) -> str:
        raw = f", raw {self.raw:.3f}" if self.raw is not None else ", raw not stored (--keep-raw)"
        return (
            f"GT recall at IoU {IOU} ({coco}: {self.images} images matched by basename, {self.gt_boxes} boxes): "
            f"kept {self.kept:.3f}{raw}; kept precision {self.kept_precision:.3f}"
        )


def _match(gt: np.ndarray, rects: np.ndarray) -> tuple[int, int]:
    """(GT boxes covered, rects covering one) at IoU >= :data:`IOU`."""
    if not len(gt) or not len(rects):
        return 0, 0
    iou = iou_matrix(gt, rects_to_boxes(rects))
    return int((iou.max(1) >= IOU).sum()), int((iou.max(0) >= IOU).sum())


def store_recall(store: Any, coco: str | Path) -> Recall:
    """:class:`Recall` of a :class:`~soco_det.proposals.store.ProposalStore` against a COCO json."""
    gt = read_coco_boxes(coco)
    index: dict[str, int] = {}
    for i in store.ok_indices():
        index.setdefault(posixpath.basename(store.paths[int(i)]), int(i))
    matched = [n for n in gt if n in index]
    if not matched:
        raise UserError(f"{coco}: none of its {len(gt)} file_names is an image of the store {store.path} (by basename)")
    keep_raw = bool(store.meta.get("keep_raw"))
    hit = hit_raw = total = covering = kept_total = 0
    for name in matched:
        i = index[name]
        rects = store.boxes(i)
        h, c = _match(gt[name], rects)
        hit, covering, total, kept_total = hit + h, covering + c, total + len(gt[name]), kept_total + len(rects)
        if keep_raw:
            hit_raw += _match(gt[name], store.raw_boxes(i))[0]
    return Recall(
        images=len(matched),
        gt_boxes=total,
        kept=hit / max(total, 1),
        kept_precision=covering / max(kept_total, 1),
        raw=hit_raw / max(total, 1) if keep_raw else None,
    )
