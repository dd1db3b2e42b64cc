"""Proposals that fit the objects: selective-search settings and a size filter from an object size.

The paper's settings (scale 300, sigma 0.9, min_size 100, filter ``ratio3size0308post``; docs/method.md
1.1-1.3) were made for ImageNet, one large object per photo: in a 400-px aerial tile of 36-px tree
crowns the filter keeps boxes of several crowns, and scale 300 merges the crowns before they are
boxes. ``--object-size`` says how large the objects are, and :func:`fit_settings` turns that into
settings:

* ``paper``: the official settings and filter, untouched (the paper recipes; parity with the
  official proposals);
* ``N`` / ``N%``: the objects' side ``sqrt(w*h)`` is about N px, or N % of the image side
  ``sqrt(W*H)``;
* ``coco:FILE.json``: the median side of the boxes of a COCO file (a few labelled images);
* ``auto``: estimated from the images: selective search at a fine scale on up to
  :data:`AUTO_SAMPLE` images spread over the listing, the object side taken as the median
  (:data:`AUTO_QUANTILE`) of the raw box sides: fine-scale selective search finds the parts of
  objects and every merge above them, so its median says where the small objects start.

The rule for an object side ``s`` px (at the resolution the method runs at) — Felzenszwalb's
``scale`` and ``min_size`` shrink with the objects so that one object is not merged with its
neighbours before it is a region, ``sigma`` stays 0.9:

* ``scale = clip(1.4 s, 16, 300)``, ``min_size = clip(s^2 / 40, 8, 100)`` (s = 36 px: 50 and 32,
  the settings that gave 0.60 raw recall on the aerial tiles of issue 16 against 0.19 for the
  paper's; s >= 215 px: the paper's 300 and 100);
* kept range ``s / 3 .. 3 s`` (``size:`` filter with the paper's aspect ratio 3 and ``post``
  fallback); for ``auto``, whose estimate says where the small objects start but not how large the
  large ones are, ``s / 2`` (:data:`AUTO_MIN_FACTOR`: objects are often smaller than that median;
  on the real nuclei tiles ``s`` itself kept 0.32 of the objects, ``s / 2`` 0.76) up to the paper's
  upper bound, 80 % of the image side.

An explicit ``--filter`` or ``--param`` wins over the fitted one. For methods other than selective
search only the filter is fitted. This rule is ours, not the paper's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from soco_det.errors import ImageError, UserError
from soco_det.imageio import load_rgb
from soco_det.logs import get_logger
from soco_det.proposals.methods import run_method

log = get_logger(__name__)

PAPER_FILTER = "ratio3size0308post"
PAPER_PARAMS = {"scale": 300.0, "sigma": 0.9, "min_size": 100}
SS_METHODS = ("selective_search", "reference")
AUTO_SAMPLE = 16  # images selective search runs on for ``auto``
AUTO_MAX_SIDE = 512  # ... on a copy with at most this longer side
AUTO_PARAMS = {"scale": 50.0, "sigma": 0.9, "min_size": 20}  # the fine scale of the estimate
AUTO_QUANTILE = 0.5
AUTO_MAX_REL = 0.8  # auto's upper bound of the kept range (the paper's)
AUTO_MIN_FACTOR = 0.5  # auto's lower bound: this times the estimated side (the estimate is a median)
KEEP_RANGE = (1 / 3, 3.0)  # kept range around an object side given by a hint
MIN_OBJECT_PX = 8.0


@dataclass(frozen=True)
class Fit:
    """The fitted settings: ``params`` of the method (``{}``: its defaults), ``filter`` (a strategy
    string of :func:`soco_det.proposals.filters.parse_filter`), the object side in px (``None`` for
    ``paper`` and ``N%`` without images), and why, in words."""

    hint: str
    params: dict[str, Any]
    filter: str
    object_side_px: float | None = None
    image_side_px: float | None = None
    sample_images: int = 0
    reason: str = ""
    raw_sides: dict[str, Any] | None = field(default=None, compare=False)

    def record(self) -> dict[str, Any]:
        """What goes into the store's ``meta.json`` (``fit``) and ``proposals info``."""
        return {
            "hint": self.hint,
            "object_side_px": None if self.object_side_px is None else round(self.object_side_px, 1),
            "image_side_px": None if self.image_side_px is None else round(self.image_side_px, 1),
            "sample_images": self.sample_images,
            "params": self.params,
            "filter": self.filter,
            "reason": self.reason,
        }


def parse_hint(hint: str) -> tuple[str, Any]:
    """``paper`` / ``auto`` / ``N`` (px) / ``N%`` / ``coco:FILE`` -> ``(kind, value)``."""
    text = str(hint).strip()
    low = text.lower()
    if low in ("paper", "auto"):
        return low, None
    if low.startswith("coco:"):
        if not text[5:]:
            raise UserError("--object-size coco:FILE: give the COCO json after 'coco:'")
        return "coco", text[5:]
    number = low[:-1] if low.endswith("%") else low
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value <= 0 or (low.endswith("%") and value > 100):
        raise UserError(
            f"--object-size {hint!r}: expected paper, auto, N (object side in px, e.g. 36), N% (of the image "
            "side, e.g. 8%) or coco:FILE.json (the median box of a COCO file)"
        )
    return ("percent", value / 100.0) if low.endswith("%") else ("px", value)


def params_for_side(side_px: float) -> dict[str, Any]:
    """Selective-search settings for objects of side ``side_px`` at the resolution it runs at."""
    scale = float(np.clip(round(1.4 * side_px), 16, 300))
    min_size = int(np.clip(round(side_px * side_px / 40.0), 8, 100))
    return {"scale": scale, "sigma": 0.9, "min_size": min_size}


def coco_median_side(path: str | Path) -> float:
    """Median ``sqrt(w*h)`` (px) of the non-crowd boxes of a COCO json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--object-size coco:{path}: cannot read the COCO json ({exc})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise UserError(f"--object-size coco:{path}: no 'annotations' list (not a COCO json?)")
    sides = []
    for a in anns:
        box = a.get("bbox") if isinstance(a, dict) else None
        if a.get("iscrowd") if isinstance(a, dict) else False:
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise UserError(f"--object-size coco:{path}: annotation {a!r:.80} has no [x, y, w, h] bbox")
        if box[2] > 0 and box[3] > 0:
            sides.append(float(np.sqrt(box[2] * box[3])))
    if not sides:
        raise UserError(f"--object-size coco:{path}: no boxes with a positive width and height")
    return float(np.median(sides))


def _sample(keys: Sequence[str], n: int) -> list[str]:
    """Up to ``n`` keys spread evenly over the sorted listing (the same for every shard)."""
    if len(keys) <= n:
        return list(keys)
    return [keys[int(i)] for i in np.linspace(0, len(keys) - 1, n).round().astype(int)]


def _load_sample(root: str | Path, keys: Sequence[str], exif_transpose: bool, max_pixels: int | None) -> list:
    images = []
    for key in keys:
        try:
            images.append(np.asarray(load_rgb(Path(root) / key, exif_transpose=exif_transpose, max_pixels=max_pixels)))
        except (ImageError, MemoryError):
            continue  # the job records it as a failed image; the fit uses the others
    return images


def _auto_side(images: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
    """Object side (px, full resolution) from fine-scale selective search on ``images``."""
    from soco_det.proposals.sizes import stats_from_rows

    rows = []
    for image in images:
        h, w = image.shape[:2]
        rows.append((run_method("selective_search", image, AUTO_PARAMS, AUTO_MAX_SIDE), (w, h)))
    stats = stats_from_rows(rows)
    if stats is None:
        raise UserError("--object-size auto: selective search found no box in the sample images; give N or N%")
    sides = np.concatenate([np.sqrt(r[:, 2].astype(float) * r[:, 3]) for r, _ in rows if len(r)])
    return float(np.quantile(sides, AUTO_QUANTILE)), stats


def _object_side(kind: str, value: Any, images: list[np.ndarray], image_side: float) -> tuple[float, str, Any]:
    if kind == "px":
        return value, f"object side {value:g} px as given", None
    if kind == "percent":
        side = value * image_side
        return side, f"object side {value * 100:g} % of the median image side {image_side:.0f} px = {side:.0f} px", None
    if kind == "coco":
        side = coco_median_side(value)
        return side, f"object side {side:.0f} px: the median box side of {value}", None
    side, stats = _auto_side(images)
    why = (
        f"object side {side:.0f} px: the {AUTO_QUANTILE:g} quantile of the sides of {stats['boxes']} fine-scale "
        f"selective-search boxes (scale {AUTO_PARAMS['scale']:g}) on {len(images)} sample images"
    )
    return side, why, stats


def _fitted_filter(kind: str, value: Any, side: float) -> str:
    lo, hi = KEEP_RANGE
    if kind == "percent":
        return f"size:{value * 100 * lo:.3g}%-{value * 100 * hi:.3g}%post"
    if kind == "auto":
        return f"size:{side * AUTO_MIN_FACTOR:.0f}-{AUTO_MAX_REL * 100:g}%post"
    return f"size:{side * lo:.0f}-{side * hi:.0f}post"


def _paper(method: str) -> tuple[dict[str, Any], str]:
    return (dict(PAPER_PARAMS) if method in SS_METHODS else {}), PAPER_FILTER


def fit_settings(
    hint: str,
    root: str | Path,
    keys: Sequence[str],
    method: str = "selective_search",
    max_side: int | None = None,
    exif_transpose: bool = False,
    max_pixels: int | None = None,
) -> Fit:
    """The settings for ``hint`` (``--object-size``) on the images ``root/keys`` (sorted listing).

    ``paper`` reads no image. The others read up to :data:`AUTO_SAMPLE` images for the image side
    (and, for ``auto``, run selective search on them); with ``max_side`` the object side is scaled
    to the copy the method runs on."""
    kind, value = parse_hint(hint)
    if kind == "paper":
        return Fit("paper", *_paper(method), reason="the paper's settings (--object-size paper)")
    images = _load_sample(root, _sample(keys, AUTO_SAMPLE), exif_transpose, max_pixels)
    if not images:
        log.warning("--object-size %s: none of the sample images could be read: the paper's settings", hint)
        return Fit(str(hint), *_paper(method), reason="no sample image could be read: the paper's settings")
    image_side = float(np.median([np.sqrt(im.shape[0] * im.shape[1]) for im in images]))
    side, why, raw_stats = _object_side(kind, value, images, image_side)
    side = max(side, MIN_OBJECT_PX)
    factor = 1.0
    if max_side:
        factor = float(np.median([min(1.0, max_side / max(im.shape[:2])) for im in images]))
    params: dict[str, Any] = {}
    if method in SS_METHODS:
        params = params_for_side(side * factor)
        run_at = f" (at --max-side {max_side}: {side * factor:.0f} px)" if factor < 1 else ""
        why += f"; selective search scale {params['scale']:g}, min_size {params['min_size']} for it{run_at}"
    else:
        why += f"; method {method}: only the filter is fitted"
    filt = _fitted_filter(kind, value, side)
    why += f"; filter {filt}"
    return Fit(str(hint), params, filt, side, image_side, len(images), why, raw_stats)
