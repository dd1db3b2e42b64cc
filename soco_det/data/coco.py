"""COCO instances files, read and checked once for every stage that reads them.

Fine-tuning and evaluation (:mod:`soco_det.transfer.coco_data`), the object probe
(:mod:`soco_det.probe.objects`) read a COCO file with :func:`read_coco`: the JSON is parsed and
checked by :func:`validate_coco`, which refuses (one line naming the file and the entry) what
cannot be right and counts what is dropped, so that no stage trains or scores on a ``bbox`` that
is not numbers, a category that ``categories`` does not list, or an image outside the images
folder. :func:`check_image_files` then checks that every image it will read exists.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from soco_det.errors import UserError
from soco_det.imageio import check_relative_path
from soco_det.logs import get_logger

log = get_logger(__name__)


def read_coco(json_path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """``(data, report)`` of a COCO instances file: the parsed JSON after :func:`validate_coco`
    (annotations of unlisted images removed) and its counts of dropped and clipped boxes. A clear
    :class:`UserError` for a missing file, invalid JSON, or JSON that is not a COCO instances file."""
    path = Path(json_path)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: a COCO file holds a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: not a COCO instances file (no {key!r} list)")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise UserError(f"{path}: 'annotations' is not a list")
    return data, validate_coco(path, data)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _entry(path: Path, kind: str, i: int, item: Any) -> str:
    ident = item.get("id") if isinstance(item, dict) else None
    return f"{path}: {kind} #{i}" + (f" (id {ident!r})" if ident is not None else "")


def _check_categories(path: Path, data: dict[str, Any]) -> set[int]:
    categories: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise UserError(f"{_entry(path, 'category', i, cat)} has no whole-number 'id'")
        if cat["id"] in categories:
            raise UserError(f"{_entry(path, 'category', i, cat)}: category id {cat['id']} is listed twice")
        categories.add(cat["id"])
    return categories


def _check_images(path: Path, data: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """``{image id: (width, height)}`` of the listed images, each checked."""
    sizes: dict[int, tuple[float, float]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise UserError(f"{path}: image #{i} is not an object")
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if missing:
            raise UserError(f"{path}: image #{i} has no {', '.join(missing)}")
        where = _entry(path, "image", i, img)
        if not isinstance(img["id"], int) or isinstance(img["id"], bool):
            raise UserError(f"{where}: 'id' must be a whole number")
        if img["id"] in sizes:
            raise UserError(f"{where}: image id {img['id']} is listed twice (one image would be lost)")
        if not (_is_number(img["width"]) and _is_number(img["height"]) and img["width"] >= 1 and img["height"] >= 1):
            raise UserError(f"{where}: width/height must be positive numbers, got {img['width']!r} x {img['height']!r}")
        if not isinstance(img["file_name"], str):
            raise UserError(f"{where}: 'file_name' must be a string")
        check_relative_path(img["file_name"], where)
        sizes[img["id"]] = (float(img["width"]), float(img["height"]))
    return sizes


def _check_annotation(path: Path, i: int, ann: Any, ann_ids: set, categories: set[int]) -> None:
    if not isinstance(ann, dict):
        raise UserError(f"{path}: annotation #{i} is not an object")
    missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
    if missing:
        raise UserError(f"{path}: annotation #{i} (id {ann.get('id')}) has no {', '.join(missing)}")
    where = _entry(path, "annotation", i, ann)
    if ann["id"] in ann_ids:
        raise UserError(f"{where}: annotation id {ann['id']!r} is used twice")
    ann_ids.add(ann["id"])
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise UserError(f"{where}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}")
    if ann["category_id"] not in categories:
        raise UserError(
            f"{where}: category_id {ann['category_id']!r} is not in 'categories' (ids {sorted(categories)[:10]})"
        )


def validate_coco(path: Path, data: dict[str, Any]) -> dict[str, int]:
    """Check a COCO instances dict before anything trains or scores on it.

    Errors (one line naming the file and the entry) for what cannot be right: a missing key, an id
    used twice, a size or ``bbox`` that is not numbers, a negative image size, a category id that
    ``categories`` does not list, a ``file_name`` outside the images folder. Annotations of images
    that are not listed are removed; boxes with a negative or empty side, or wholly outside their
    image, are kept in the file's index but never used as targets; boxes reaching outside their
    image are clipped to it. Those counts are returned and logged as one warning line.
    """
    categories = _check_categories(path, data)
    sizes = _check_images(path, data)
    report = {"orphans": 0, "degenerate": 0, "outside": 0, "clipped": 0}
    kept: list[dict[str, Any]] = []
    ann_ids: set = set()
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(path, i, ann, ann_ids, categories)
        if ann["image_id"] not in sizes:
            report["orphans"] += 1
            continue
        kept.append(ann)
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        if w <= 0 or h <= 0:
            report["degenerate"] += 1
        elif min(x + w, width) - max(x, 0) < 1 or min(y + h, height) - max(y, 0) < 1:
            report["outside"] += 1
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            report["clipped"] += 1
    data["annotations"] = kept
    if any(report.values()):
        log.warning(
            "%s: dropped %d annotation(s) of images that are not listed; %d box(es) with a negative or empty side and "
            "%d wholly outside their image are not used; %d box(es) reaching outside their image are clipped to it",
            path,
            report["orphans"],
            report["degenerate"],
            report["outside"],
            report["clipped"],
        )
    return report


def check_image_files(json_path: Path, images_dir: Path, file_names: Sequence[str]) -> None:
    """Every ``file_name`` (relative to ``images_dir``) is a file; one line naming the first that is not."""
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: images folder not found (given with {json_path})")
    for name in file_names:
        if not os.path.isfile(images_dir / name):
            raise UserError(f"{images_dir / name}: image file not found (referenced by {json_path})")
