"""Proposal filters: the official ``ratio3size0308`` rule and its ``post`` fallback chain.

All filters work on rects ``[x, y, w, h]`` int32 in the official selective-search convention
(``w = max_x - min_x``, so the true extent is ``w + 1`` pixels) and compare ``w`` and ``h`` *as
stored*, exactly as the official code does (docs/method.md 1.2-1.3). They are vectorised: one numpy
expression over all rects of an image, in float64 like the official ``math.sqrt`` / ``w / h``, so
boundary cases (``w/h == 3``, size ratio exactly 0.3 or 0.8) are decided identically.

Strategy strings are parsed like the official scripts:

* ``ratio3size0308``: min side 32, ``1/3 <= w/h <= 3`` and ``0.3 <= sqrt(w*h)/sqrt(W*H) <= 0.8``;
* ``ratio3size0308post``: the same, and an image left empty falls back to the aspect-ratio-only
  filter (min side 32, no size limits), then to the min-side-only filter, then stays empty (the
  whole-image box is added at load time by the data loader, never stored);
* ``ratio3``: aspect ratio and min side only; ``none``: min side only (the official ``filter_none``);
* ``raw``: keep every rect (no filtering at all);
* ``size:MIN-MAX`` (``post`` may follow, e.g. ``size:16-96post``): keep rects whose side
  ``sqrt(w*h)`` is in ``[MIN, MAX]``, each bound in pixels (``16``) or in percent of the image side
  ``sqrt(W*H)`` (``2%``), either bound may be left out (``size:16-``, ``size:-30%``); aspect ratio
  ``1/3..3`` as the paper's, and a min side of ``max(4, MIN/2)`` px for a pixel MIN (4 px
  otherwise) instead of the paper's 32 px, which would drop every object under 32 px.
  ``post`` is the paper's fallback chain with that min side (ratio only, then min side only).
  This is not in the paper (docs/method.md 1.2 has the paper's filters); ``soco_det.proposals.fit``
  picks it from an object size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from soco_det.errors import UserError

MIN_SIDE = 32
SIZE_MIN_SIDE = 4  # the min side of a size: filter: max(SIZE_MIN_SIDE, MIN px / 2)

# Which filter produced an image's boxes. Stored per image (int8) in the proposal store.
STAGE_MAIN = 0  # the main filter kept at least one rect
STAGE_RATIO = 1  # post fallback 1: aspect ratio + min side, no size limits
STAGE_MIN_SIDE = 2  # post fallback 2: min side only
STAGE_EMPTY = 3  # nothing survived any stage: no stored boxes (whole-image box at load time)
STAGE_NONE = -1  # not filtered (failed image, imported boxes)
STAGE_NAMES = {
    STAGE_MAIN: "main",
    STAGE_RATIO: "ratio",
    STAGE_MIN_SIDE: "min_side",
    STAGE_EMPTY: "empty",
    STAGE_NONE: "n/a",
}

_STRATEGY = re.compile(r"^ratio(?P<ratio>\d+)(?:size(?P<lo>\d\d)(?P<hi>\d\d))?(?P<post>post)?$")
_SIZE = re.compile(r"^size:(?P<lo>[0-9.]+%?)?-(?P<hi>[0-9.]+%?)?(?P<post>post)?$")
_BOUND = re.compile(r"^(?P<value>\d+(?:\.\d*)?|\.\d+)(?P<pct>%?)$")


@dataclass(frozen=True)
class FilterSpec:
    """A parameterised filter.

    ``ratio``: keep ``1/ratio <= w/h <= ratio`` (``None``: no aspect limit);
    ``min_size`` / ``max_size``: keep ``min_size <= sqrt(w*h)/sqrt(W*H) <= max_size`` (``None``: no
    limit); ``min_side``: keep ``w >= min_side and h >= min_side`` (0 disables it);
    ``post``: apply the official fallback chain to images the main filter leaves empty;
    ``min_px`` / ``max_px``: keep ``min_px <= sqrt(w*h) <= max_px`` in pixels (``None``: no limit;
    the ``size:`` filters).
    """

    ratio: float | None = 3.0
    min_size: float | None = 0.3
    max_size: float | None = 0.8
    min_side: int = MIN_SIDE
    post: bool = True
    name: str = "ratio3size0308post"
    min_px: float | None = None
    max_px: float | None = None

    def mask(self, rects: np.ndarray, width: int, height: int) -> np.ndarray:
        """Boolean ``[N]`` mask of the rects ``[N, 4]`` (official convention) this filter keeps,
        for an image of ``width x height`` pixels."""
        keep = rect_mask(rects, width, height, self.ratio, self.min_size, self.max_size, self.min_side)
        if self.min_px is not None or self.max_px is not None:
            rects = np.asarray(rects).reshape(-1, 4)
            side = np.sqrt(rects[:, 2].astype(np.float64) * rects[:, 3].astype(np.float64))
            if self.min_px is not None:
                keep &= side >= self.min_px
            if self.max_px is not None:
                keep &= side <= self.max_px
        return keep

    def apply(self, rects: np.ndarray, width: int, height: int) -> tuple[np.ndarray, int]:
        """``(kept int32 [n, 4], stage)``; ``stage`` is one of the ``STAGE_*`` constants."""
        rects = np.asarray(rects, dtype=np.int32).reshape(-1, 4)
        kept = rects[self.mask(rects, width, height)]
        if len(kept):
            return kept, STAGE_MAIN
        if not self.post:
            return kept, STAGE_EMPTY
        # The official post step (filter_ss_proposals_json_post_no_prop.py): aspect ratio with the
        # min side and no size limit, then the min side alone.
        for stage, ratio in ((STAGE_RATIO, self.ratio), (STAGE_MIN_SIDE, None)):
            kept = rects[rect_mask(rects, width, height, ratio, None, None, self.min_side)]
            if len(kept):
                return kept, stage
        return kept, STAGE_EMPTY


def rect_mask(
    rects: np.ndarray,
    width: int,
    height: int,
    ratio: float | None,
    min_size: float | None,
    max_size: float | None,
    min_side: int = MIN_SIDE,
) -> np.ndarray:
    """Vectorised official filter test over rects ``[N, 4]`` ``(x, y, w, h)``; returns bool ``[N]``.

    ``w`` and ``h`` are compared as stored (``max - min``), like the official code.
    """
    rects = np.asarray(rects).reshape(-1, 4)
    w = rects[:, 2].astype(np.float64)
    h = rects[:, 3].astype(np.float64)
    keep = (w >= min_side) & (h >= min_side)
    if ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = w / h  # h == 0 only when min_side == 0: inf / nan fail the test below
        keep &= (aspect >= 1.0 / ratio) & (aspect <= ratio)
    if min_size is not None or max_size is not None:
        rel = np.sqrt(w * h) / np.sqrt(float(width) * float(height))
        if min_size is not None:
            keep &= rel >= min_size
        if max_size is not None:
            keep &= rel <= max_size
    return keep


def parse_filter(strategy: str | FilterSpec) -> FilterSpec:
    """Parse an official strategy string (``ratio3size0308``, ``ratio3size0308post``, ``ratio3``,
    ``none``, ``raw``) into a :class:`FilterSpec`.

    As in the official scripts the size digits are tenths: ``size0308`` = [0.3, 0.8].
    """
    if isinstance(strategy, FilterSpec):
        return strategy
    s = strategy.strip().lower()
    if s.startswith("size:"):
        return parse_size_filter(strategy, s)
    if s == "none":
        return FilterSpec(ratio=None, min_size=None, max_size=None, min_side=MIN_SIDE, post=False, name="none")
    if s == "raw":
        return FilterSpec(ratio=None, min_size=None, max_size=None, min_side=0, post=False, name="raw")
    m = _STRATEGY.match(s)
    if m is None:
        raise UserError(
            f"unknown proposal filter {strategy!r}: expected e.g. 'ratio3size0308post' (official default), "
            "'ratio3size0308', 'ratio3', 'none' (min side 32 only), 'raw' (keep everything) or "
            "'size:MIN-MAX' (object size in px or % of the image side, e.g. 'size:16-96post', 'size:2%-30%')"
        )
    ratio = float(m["ratio"])
    if ratio < 1:
        raise UserError(f"proposal filter {strategy!r}: the aspect ratio limit must be >= 1")
    lo = int(m["lo"]) / 10 if m["lo"] else None
    hi = int(m["hi"]) / 10 if m["hi"] else None
    if lo is not None and hi is not None and lo > hi:
        raise UserError(f"proposal filter {strategy!r}: size range {lo}..{hi} is empty")
    return FilterSpec(ratio=ratio, min_size=lo, max_size=hi, min_side=MIN_SIDE, post=bool(m["post"]), name=s)


def _size_bound(strategy: str, text: str | None) -> tuple[float | None, bool]:
    """``"16"`` -> ``(16.0, False)`` (pixels), ``"2%"`` -> ``(0.02, True)`` (of the image side)."""
    if not text:
        return None, False
    m = _BOUND.match(text)
    if m is None:
        raise UserError(f"proposal filter {strategy!r}: bound {text!r} is not a number of pixels or a percentage")
    value = float(m["value"])
    if m["pct"]:
        return value / 100.0, True
    return value, False


def parse_size_filter(strategy: str, s: str) -> FilterSpec:
    """``size:MIN-MAX[post]`` (see the module docstring) -> :class:`FilterSpec`."""
    m = _SIZE.match(s)
    if m is None:
        raise UserError(
            f"proposal filter {strategy!r}: expected size:MIN-MAX with MIN and MAX in pixels (size:16-96) or in "
            "percent of the image side (size:2%-30%), either one may be left out (size:16-), 'post' may follow "
            "(size:16-96post)"
        )
    lo, lo_rel = _size_bound(strategy, m["lo"])
    hi, hi_rel = _size_bound(strategy, m["hi"])
    if lo is None and hi is None:
        raise UserError(f"proposal filter {strategy!r}: give at least one bound (e.g. size:16- or size:-96)")
    if hi is not None and hi <= 0:
        raise UserError(f"proposal filter {strategy!r}: the upper bound must be above 0")
    if lo is not None and hi is not None and lo_rel == hi_rel and lo > hi:
        raise UserError(f"proposal filter {strategy!r}: size range {m['lo']}..{m['hi']} is empty")
    min_side = max(SIZE_MIN_SIDE, int(lo // 2)) if lo is not None and not lo_rel else SIZE_MIN_SIDE
    return FilterSpec(
        ratio=3.0,
        min_size=lo if lo_rel else None,
        max_size=hi if hi_rel else None,
        min_side=min_side,
        post=bool(m["post"]),
        name=s,
        min_px=None if lo_rel else lo,
        max_px=None if hi_rel else hi,
    )
