"""How large the proposals are: the side distribution of raw and kept boxes, and the warning when
a filter keeps only boxes far larger than what selective search found.

A box's *side* is ``sqrt(w*h)`` of its rect as stored (official convention ``w = max_x - min_x``,
the same quantity the filters test), in pixels, or relative: divided by the image side
``sqrt(W*H)``. Raw rects are not stored unless ``--keep-raw``, so the job keeps their distribution
as fixed log-spaced histograms (:func:`side_histogram`, one per chunk, summed), from which the
quantiles are read to about 10 % (one bin).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
PX_EDGES = np.geomspace(1.0, 16384.0, 97)  # 10.5 % per bin
REL_EDGES = np.geomspace(1.0 / 1024.0, 2.0, 97)  # 8.3 % per bin

# the large-box warning: every kept box (its 5th percentile) above a quarter of the image side
# while the raw median is under a tenth of it
WARN_KEPT_Q05 = 0.25
WARN_RAW_MEDIAN = 0.10


def rect_sides(rects: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``(px, rel)`` float64 ``[N]`` sides of rects ``[N, 4]`` in an image of ``width x height``."""
    rects = np.asarray(rects).reshape(-1, 4)
    px = np.sqrt(rects[:, 2].astype(np.float64) * rects[:, 3].astype(np.float64))
    return px, px / max(np.sqrt(float(width) * float(height)), 1.0)


def side_histogram(rows: Sequence[tuple[np.ndarray, tuple[int, int]]]) -> np.ndarray:
    """int64 ``[2, 96]`` counts of the sides of ``(rects, (W, H))`` rows: row 0 over
    :data:`PX_EDGES`, row 1 over :data:`REL_EDGES` (values outside are counted in the end bins)."""
    hist = np.zeros((2, len(PX_EDGES) - 1), np.int64)
    for rects, (w, h) in rows:
        if len(rects) == 0:
            continue
        px, rel = rect_sides(rects, w, h)
        hist[0] += np.histogram(np.clip(px, PX_EDGES[0], PX_EDGES[-1]), PX_EDGES)[0]
        hist[1] += np.histogram(np.clip(rel, REL_EDGES[0], REL_EDGES[-1]), REL_EDGES)[0]
    return hist


def _hist_quantiles(counts: np.ndarray, edges: np.ndarray) -> list[float]:
    cum = np.cumsum(counts)
    centres = np.sqrt(edges[:-1] * edges[1:])
    return [float(centres[min(int(np.searchsorted(cum, q * cum[-1])), len(centres) - 1)]) for q in QUANTILES]


def _stats(px: list[float], rel: list[float], boxes: int) -> dict[str, Any]:
    return {
        "boxes": int(boxes),
        "quantiles": list(QUANTILES),
        "px": [round(v, 1) for v in px],
        "rel": [round(v, 4) for v in rel],
    }


def stats_from_histogram(hist: np.ndarray) -> dict[str, Any] | None:
    """Quantiles (:data:`QUANTILES`) of a :func:`side_histogram`; ``None`` when it is empty."""
    hist = np.asarray(hist)
    if hist.shape != (2, len(PX_EDGES) - 1) or hist[0].sum() == 0:
        return None
    return {
        # a bin centre may pass the whole image's relative side (just under 1): cap it there
        **_stats(
            _hist_quantiles(hist[0], PX_EDGES),
            [min(v, 1.0) for v in _hist_quantiles(hist[1], REL_EDGES)],
            hist[0].sum(),
        ),
        "approx": True,
    }


def stats_from_rows(rows: Sequence[tuple[np.ndarray, tuple[int, int]]]) -> dict[str, Any] | None:
    """Exact quantiles of the sides of ``(rects, (W, H))`` rows; ``None`` without any box."""
    sides = [rect_sides(r, w, h) for r, (w, h) in rows if len(r)]
    if not sides:
        return None
    px = np.concatenate([s[0] for s in sides])
    rel = np.concatenate([s[1] for s in sides])
    return _stats(np.quantile(px, QUANTILES).tolist(), np.quantile(rel, QUANTILES).tolist(), len(px))


def format_sides(sides: dict[str, Any]) -> list[str]:
    """Lines for ``{"raw": stats|None, "kept": stats|None}``."""
    q = "/".join(f"{int(round(v * 100))}" for v in QUANTILES)
    lines = [f"box side sqrt(w*h), quantiles {q} %: px | relative to the image side sqrt(W*H)"]
    for name in ("raw", "kept"):
        s = sides.get(name)
        if s is None:
            note = "not stored (compute with --keep-raw)" if name == "raw" else "no boxes"
            lines.append(f"  {name:<4}  {note}")
            continue
        px = " ".join(f"{v:6.0f}" for v in s["px"])
        rel = " ".join(f"{v:5.2f}" for v in s["rel"])
        approx = ", histogram" if s.get("approx") else ""
        lines.append(f"  {name:<4}  {px}  | {rel}   ({s['boxes']} boxes{approx})")
    return lines


def large_box_warning(sides: dict[str, Any]) -> str | None:
    """The warning text when the kept boxes are far larger than the raw ones (5th percentile of the
    kept relative sides above :data:`WARN_KEPT_Q05` while the raw median is under
    :data:`WARN_RAW_MEDIAN`), else ``None``."""
    raw, kept = sides.get("raw"), sides.get("kept")
    if raw is None or kept is None:
        return None
    kept_q05, raw_median = kept["rel"][0], raw["rel"][QUANTILES.index(0.5)]
    if kept_q05 <= WARN_KEPT_Q05 or raw_median >= WARN_RAW_MEDIAN:
        return None
    return (
        f"the kept boxes are far larger than the raw proposals: 95 % of the kept boxes are above "
        f"{kept_q05:.2f} of the image side while the raw median is {raw_median:.3f}. If your objects are small "
        "(aerial tiles, shelves, cells), the filter drops every one of them: compute with --object-size auto, "
        "--object-size N (object side in px), N% or coco:FILE.json (see docs/data.md, 'Proposals that fit the "
        "objects')"
    )


def store_sides(store: Any) -> dict[str, Any]:
    """``{"raw", "kept"}`` statistics of a :class:`~soco_det.proposals.store.ProposalStore`: kept
    exactly from its boxes; raw exactly from its raw rects (``--keep-raw``), else from the histogram
    its job recorded in ``summary.json`` (``None`` for stores written before it was recorded)."""
    ok = [int(i) for i in store.ok_indices()]
    kept = stats_from_rows([(store.boxes(i), store.size(i)) for i in ok])
    if store.meta.get("keep_raw"):
        raw = stats_from_rows([(store.raw_boxes(i), store.size(i)) for i in ok])
    else:
        hist = store.summary.get("raw_side_hist")
        raw = stats_from_histogram(np.asarray(hist)) if hist is not None else None
    return {"raw": raw, "kept": kept}


def table_sides(table: Any, raw_hist: np.ndarray | None) -> dict[str, Any]:
    """``{"raw", "kept"}`` statistics of a :class:`~soco_det.proposals.store.ProposalTable`'s images
    with status ok (0): raw exactly when the table holds raw rects, else from ``raw_hist``."""
    ok = [i for i, s in enumerate(table.status) if s == 0]
    kept = stats_from_rows([(table.boxes[i], table.sizes[i]) for i in ok])
    if table.raw_boxes is not None:
        raw = stats_from_rows([(table.raw_boxes[i], table.sizes[i]) for i in ok])
    else:
        raw = stats_from_histogram(raw_hist) if raw_hist is not None else None
    return {"raw": raw, "kept": kept}
