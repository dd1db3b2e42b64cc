"""The numbers of a prepared data set, read back from its COCO files: images per split, objects per
image and the median object side (``sqrt(w * h)`` of the boxes, in pixels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from soco_det.errors import UserError


def split_summary(coco_json: str | Path) -> dict[str, Any]:
    """``{"images", "objects", "objects_per_image": {"mean", "min", "max"}, "median_side",
    "median_long_side"}`` of one COCO file (sides ``None`` without annotations)."""
    path = Path(coco_json)
    try:
        data = json.loads(path.read_text())
        ids = [image["id"] for image in data["images"]]
        boxes = np.asarray([ann["bbox"] for ann in data["annotations"]], dtype=np.float64).reshape(-1, 4)
        owners = [ann["image_id"] for ann in data["annotations"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable COCO file ({exc})") from None
    counts = np.asarray([owners.count(i) for i in ids] or [0])
    return {
        "images": len(ids),
        "objects": len(owners),
        "objects_per_image": {"mean": float(counts.mean()), "min": int(counts.min()), "max": int(counts.max())},
        "median_side": float(np.median(np.sqrt(boxes[:, 2] * boxes[:, 3]))) if len(boxes) else None,
        "median_long_side": float(np.median(boxes[:, 2:].max(axis=1))) if len(boxes) else None,
    }


def summarise(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """:func:`split_summary` of each split of a :func:`soco_det.datasets.prepare` result."""
    return {split: split_summary(paths[split]) for split in ("unlabeled", "train", "val")}


def format_summary(summary: dict[str, dict[str, Any]]) -> list[str]:
    """One line per split, e.g. ``train: 4 images, 31 objects (7.8 per image, 4-11), median side 24.5 px``."""
    lines = []
    for split, s in summary.items():
        line = f"{split}: {s['images']} image{'' if s['images'] == 1 else 's'}"
        if s["objects"]:
            per = s["objects_per_image"]
            line += (
                f", {s['objects']} objects ({per['mean']:.1f} per image, {per['min']}-{per['max']}),"
                f" median side {s['median_side']:.1f} px (long side {s['median_long_side']:.1f} px)"
            )
        lines.append(line)
    return lines
