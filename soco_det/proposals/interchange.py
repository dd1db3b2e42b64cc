"""Proposal import / export: the official JSON and a COCO-style JSON.

* **Official JSON** (the released ``train_ratio3size0308post.json``):
  ``{image basename without extension: [[x, y, w, h], ...]}``, rects in the official convention
  (``w = max_x - min_x``). Import matches the basenames to the images under ``--images DIR`` and
  reports both sides' unmatched names; export then import gives identical boxes.
* **COCO-style JSON** (for tools that read COCO detections): ``images`` (``file_name`` = the
  store's relative path, ``width``, ``height``), one ``category`` ``{"id": 1, "name": "proposal"}``
  and one ``annotation`` per filtered proposal whose ``bbox`` is COCO's continuous
  ``[x, y, width, height]`` **with width = w + 1 and height = h + 1**: the official rect covers the
  pixels ``x..x+w`` inclusive, i.e. the continuous box ``[x, y, x+w+1, y+h+1]`` of
  ``docs/architecture.md``. ``area`` is ``(w+1)*(h+1)``; ``proposal_index`` is the rect's row in the
  store. Images that failed to decode are left out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from soco_det.atomic import atomic_write_json
from soco_det.errors import UserError
from soco_det.imageio import DEFAULT_MAX_PIXELS, list_images, pillow_limit
from soco_det.logs import get_logger
from soco_det.runlock import output_file
from soco_det.proposals.filters import STAGE_NONE
from soco_det.proposals.methods import clip_rects
from soco_det.proposals.store import (
    STATUS_FAILED,
    STATUS_MISSING,
    STATUS_OK,
    ProposalStore,
    ProposalTable,
    check_new_output,
    format_summary,
    write_new_store,
)

log = get_logger(__name__)

_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _stem(relpath: str) -> str:
    return Path(relpath).stem


def _header_size(path: Path, exif_transpose: bool, max_pixels: int | None) -> tuple[int, int]:
    """Decoded ``(W, H)`` from the header only (no pixel decoding); raises OSError / ValueError."""
    with pillow_limit(max_pixels), Image.open(path) as img:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ValueError(f"image is {w}x{h} pixels, above the limit of {max_pixels}")
        if exif_transpose and img.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS:
            w, h = h, w
    return w, h


def _read_official_json(json_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(json_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{json_file}: cannot read proposals JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{json_file}: expected a JSON object {{basename: [[x, y, w, h], ...]}}")
    return data


def _images_by_stem(root: Path, data: dict[str, Any], json_file: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The images under ``root`` and their basenames (what the official JSON is keyed by); a basename
    of the file that matches several images is an error."""
    relpaths = list_images(root)
    by_stem: dict[str, list[str]] = defaultdict(list)
    for p in relpaths:
        by_stem[_stem(p)].append(p)
    ambiguous = {s: ps for s, ps in by_stem.items() if len(ps) > 1 and s in data}
    if ambiguous:
        s, ps = next(iter(ambiguous.items()))
        raise UserError(
            f"{root}: {len(ambiguous)} basename(s) of {json_file.name} match several images, "
            f"e.g. {s!r} -> {ps[:3]}; the official JSON is keyed by basename only"
        )
    return relpaths, by_stem


def _imported_table(
    root: Path, relpaths: list[str], data: dict[str, Any], json_file: Path, exif_transpose: bool, max_pixels: int | None
) -> tuple[ProposalTable, int, int]:
    """``(table, clipped, dropped)``: every image with its checked rects, ``missing`` without an entry,
    ``failed`` when its header cannot be read."""
    table = ProposalTable()
    clipped = dropped = 0
    for relpath in relpaths:
        key = _stem(relpath)
        try:
            size = _header_size(root / relpath, exif_transpose, max_pixels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            table.append(relpath, (0, 0), STATUS_FAILED, f"unreadable image: {exc}", STAGE_NONE, -1, np.zeros((0, 4)))
            continue
        if key not in data:
            table.append(
                relpath, size, STATUS_MISSING, f"no entry in {json_file.name}", STAGE_NONE, -1, np.zeros((0, 4))
            )
            continue
        boxes = _parse_rects(data[key], f"{json_file}: entry {key!r}")
        boxes, n_clipped, n_dropped = clip_rects(boxes, *size)
        clipped += n_clipped
        dropped += n_dropped
        table.append(relpath, size, STATUS_OK, "", STAGE_NONE, -1, boxes)
    return table, clipped, dropped


def _warn_import(json_file: Path, root: Path, n_images: int, n_entries: int, unmatched: list, missing: int) -> None:
    if unmatched:
        log.warning(
            "%d of %d entries of %s match no image under %s, e.g. %s",
            len(unmatched),
            n_entries,
            json_file.name,
            root,
            unmatched[:5],
        )
    if missing:
        log.warning(
            "%d of %d images under %s have no entry in %s (stored without proposals, status 'missing')",
            missing,
            n_images,
            root,
            json_file.name,
        )


def import_official_json(
    json_file: str | Path,
    images: str | Path,
    out: str | Path,
    exif_transpose: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    overwrite: bool = False,
) -> Path:
    """Build a store from an official proposals JSON for the images under ``images``.

    Boxes are stored as they are in the file (already filtered by the official pipeline), after
    checks: an entry that is not a list of ``[x, y, w, h]`` whole numbers is an error naming it;
    rects that reach outside their image are clipped to it, and rects with a negative side (or
    wholly outside) are dropped; both are counted in the log and in ``summary.json``
    (``import_clipped``, ``import_dropped``). Images without an entry get status ``missing`` (no
    boxes); entries that match no image are reported. An existing store at ``out`` is moved
    aside only with ``overwrite`` (:func:`soco_det.proposals.store.write_new_store`).
    """
    json_file, root = Path(json_file), Path(images).resolve()
    check_new_output(out, overwrite)
    if not root.is_dir():
        raise UserError(f"{root}: images folder not found")
    max_pixels = max_pixels or None  # 0 means no limit, as for compute_store
    data = _read_official_json(json_file)
    relpaths, by_stem = _images_by_stem(root, data, json_file)
    table, clipped, dropped = _imported_table(root, relpaths, data, json_file, exif_transpose, max_pixels)
    unmatched = sorted(set(data) - set(by_stem))
    _warn_import(json_file, root, len(relpaths), len(data), unmatched, table.status.count(STATUS_MISSING))
    meta = {
        "method": "imported",
        "params": {"source": str(json_file.resolve())},
        "filter": "imported",
        "max_side": None,
        "exif_transpose": bool(exif_transpose),
        "keep_raw": False,
        "max_pixels": int(max_pixels) if max_pixels else None,
        "root": str(root),
        "shard": None,
    }
    if clipped or dropped:
        log.warning(
            "%s: clipped %d rect(s) that reached outside their image, dropped %d with a negative side or "
            "wholly outside it",
            json_file.name,
            clipped,
            dropped,
        )
    extra = {
        "unmatched_entries": len(unmatched),
        "unmatched_examples": unmatched[:20],
        "import_clipped": clipped,
        "import_dropped": dropped,
    }
    write_new_store(out, table, meta, extra, overwrite=overwrite)
    log.info(
        "imported %s into %s\n%s", json_file, out, format_summary(json.loads((Path(out) / "summary.json").read_text()))
    )
    return Path(out)


def _parse_rects(entry: Any, where: str) -> np.ndarray:
    """``int32 [n, 4]`` from a JSON list of ``[x, y, w, h]`` whole numbers; anything else is an error."""
    if not isinstance(entry, list) or not all(isinstance(r, list) and len(r) == 4 for r in entry):
        raise UserError(f"{where} is not a list of [x, y, w, h] rects")
    values = [v for r in entry for v in r]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{where} holds a value that is not a number")
    array = np.asarray(values, dtype=np.float64).reshape(-1, 4)
    if len(array) and not np.isfinite(array).all():
        raise UserError(f"{where} holds a non-finite value")
    if len(array) and (np.abs(array).max() > np.iinfo(np.int32).max):
        raise UserError(f"{where} has coordinates outside int32")
    if not np.array_equal(array, np.round(array)):
        raise UserError(f"{where} holds a coordinate that is not a whole number (rects are pixel indices)")
    return array.astype(np.int32)


def export_official_json(store: str | Path | ProposalStore, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``{basename without extension: [[x, y, w, h], ...]}`` for every image of the store
    (an existing file ``out`` is moved aside only with ``overwrite``)."""
    with output_file(out, overwrite, "proposals JSON") as out:
        st = store if isinstance(store, ProposalStore) else ProposalStore.open(store, upgrade=False)
        result: dict[str, list] = {}
        for i, relpath in enumerate(st.paths):
            key = _stem(relpath)
            if key in result:
                raise UserError(
                    f"{st.path}: two images share the basename {key!r}, which the official JSON cannot "
                    "tell apart; use --format coco"
                )
            result[key] = st.boxes(i).tolist()
        atomic_write_json(out, result)
    return out


def export_coco(store: str | Path | ProposalStore, out: str | Path, overwrite: bool = False) -> Path:
    """Write a COCO-style JSON of the filtered proposals (conventions in the module docstring;
    an existing file ``out`` is moved aside only with ``overwrite``)."""
    with output_file(out, overwrite, "proposals JSON") as out:
        st = store if isinstance(store, ProposalStore) else ProposalStore.open(store, upgrade=False)
        _write_coco(st, out)
    return out


def _write_coco(st: ProposalStore, out: Path) -> None:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, relpath in enumerate(st.paths):
        if st.status(i) != "ok":
            continue
        w_img, h_img = st.size(i)
        image_id = i + 1
        images.append({"id": image_id, "file_name": relpath, "width": w_img, "height": h_img})
        for j, (x, y, w, h) in enumerate(st.boxes(i).tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x, y, w + 1, h + 1],
                    "area": (w + 1) * (h + 1),
                    "iscrowd": 0,
                    "proposal_index": j,
                }
            )
    coco = {
        "info": {
            "description": f"soco-det proposals from {st.path}",
            "box_convention": "bbox = [x, y, w + 1, h + 1] of the official rect (x, y, w = max_x - min_x, h = max_y - min_y)",
            **{k: v for k, v in st.settings().items()},
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "proposal", "supercategory": "proposal"}],
    }
    atomic_write_json(out, coco)


__all__ = ["import_official_json", "export_official_json", "export_coco"]
