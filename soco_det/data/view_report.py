"""Where the boxes land in each view: the FPN level histogram, the median box side and the share
of tiny boxes per view, from the real sampler's geometry (docs/method.md 2.7, 2.9).

The paper's views were made for photographs with one large object: the official sampler puts V1's
boxes on P3/P4, V2's mostly on P4 and V3's on P2-P3 (:data:`PAPER_LEVELS`). Small objects, or small
views such as ``tiny_cpu``'s 64/64/32 px, shrink boxes to a few pixels, where RoIAlign sees almost
nothing. :func:`dataset_view_report` measures it for a dataset as it would be trained (same seeds,
same geometry as the training samples; no pixel is decoded), :func:`warn_tiny_boxes` logs a warning
when most boxes of a view fall under :data:`TINY_SIDE` pixels, and ``soco-det views report`` prints
the table.

Counted are the box rows of each view that come from a proposal: padded duplicates and the
whole-view fallback boxes of a pair without a common proposal are left out. V1 has one box set per
pair; both count as V1's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from soco_det.data.sampler import SampleGeometry, ViewSampler
from soco_det.logs import get_logger, get_rank

log = get_logger(__name__)

TINY_SIDE = 8.0  # px: a box under this side in a view is "tiny" (under two cells of P2's stride 4)
TINY_SHARE = 0.5  # warn when more than this share of a view's boxes are tiny
CHECK_IMAGES = 32  # images the start-up check samples

# The official sampler on photographs (ImageNet-like, paper filter, soco_fpn at 224/224/112), in % of
# each view's boxes per level (issue 16 of this project; docs/method.md 2.9).
PAPER_LEVELS: dict[str, dict[str, float]] = {
    "V1": {"P3": 47.0, "P4": 53.0},
    "V2": {"P2": 2.0, "P3": 24.0, "P4": 71.0, "P5": 3.0},
    "V3": {"P2": 25.0, "P3": 72.0, "P4": 3.0},
}

_WARNED: set[str] = set()  # messages already logged in this process


def _number(x: float) -> float | None:
    """JSON has no NaN: a median of no boxes is null."""
    return None if np.isnan(x) else float(x)


@dataclass
class ViewStats:
    """One view's boxes: ``counts[p]`` boxes on level ``p`` (``P2 + p``; the last entry: above the
    last threshold, unassigned), the median box side (sqrt area, view pixels) and the tiny boxes."""

    view: int  # 0-based (V1 is 0)
    size: int  # view side in pixels
    counts: np.ndarray  # int64 [P + 1]
    median_side: float
    tiny: int

    @property
    def boxes(self) -> int:
        return int(self.counts.sum())

    @property
    def percent(self) -> np.ndarray:
        """float64 ``[P + 1]``: ``counts`` in % of the view's boxes (sums to 100; zeros without boxes)."""
        return 100.0 * self.counts / max(self.boxes, 1)

    @property
    def tiny_share(self) -> float:
        return self.tiny / max(self.boxes, 1)


@dataclass
class ViewReport:
    """Per view :class:`ViewStats` of ``samples`` samples (one per image and epoch); ``proposal_side``: the median side of the
    sampled images' kept proposals in original-image pixels (nan without any)."""

    recipe: str
    view_sizes: list[int]
    thresholds: list[float] | None
    fit_objects: bool
    samples: int
    views: list[ViewStats]
    fallbacks: int = 0  # pairs that fell back to whole-view boxes (left out of the counts)
    proposal_side: float = float("nan")
    level_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "view_sizes": self.view_sizes,
            "level_thresholds": self.thresholds,
            "fit_objects": self.fit_objects,
            "samples": self.samples,
            "fallback_pairs": self.fallbacks,
            "proposal_median_side": _number(self.proposal_side),
            "views": [
                {
                    "view": f"V{s.view + 1}",
                    "size": s.size,
                    "boxes": s.boxes,
                    "levels_percent": dict(zip(self.level_names, [round(float(x), 2) for x in s.percent])),
                    "median_side": _number(s.median_side),
                    "tiny_share": s.tiny_share,
                }
                for s in self.views
            ],
        }

    def format(self, reference: bool = True) -> str:
        """The table: one row per view (levels in %, median side, share under 8 px), then the paper's rows."""
        names = self.level_names
        fit = ", fit_objects" if self.fit_objects else ""
        lines = [
            f"views {self.recipe}{fit}: sizes {'/'.join(map(str, self.view_sizes))} px, level thresholds "
            f"{'/'.join(f'{t:g}' for t in self.thresholds) if self.thresholds else 'none (one level)'}; "
            f"{self.samples} samples, kept proposals' median side {self.proposal_side:.0f} px (image pixels)",
            f"{'view':<6}{'size':>5}{'boxes':>7}" + "".join(f"{n:>7}" for n in names) + f"{'median':>9}{'< 8 px':>9}",
        ]
        for s in self.views:
            cells = "".join(f"{p:>6.1f}%" for p in s.percent)
            lines.append(
                f"V{s.view + 1:<5}{s.size:>5}{s.boxes:>7}{cells}{s.median_side:>7.1f}px{100 * s.tiny_share:>8.1f}%"
            )
        if self.fallbacks:
            lines.append(f"({self.fallbacks} pairs fell back to whole-view boxes; not counted)")
        if reference and self.thresholds:
            lines.append("paper: the official sampler on photographs (soco_fpn, 224/224/112 px), % per level")
            for view, levels in PAPER_LEVELS.items():
                lines.append(f"{view:<18}" + "".join(f"{levels.get(n, 0.0):>6.0f}%" for n in ("P2", "P3", "P4", "P5")))
        return "\n".join(lines)


def _view_rows(geo: SampleGeometry, pairs: list[tuple[int, int]]) -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
    """``(view, sizes, levels)`` of the proposal rows of every view set of a sample."""
    for p, pair in enumerate(pairs):
        if geo.fallback[p]:
            continue
        for side, view in enumerate(pair):
            real = len(geo.sizes[p][side]) - geo.padded[p][side]
            yield view, geo.sizes[p][side][:real], geo.levels[p][side][:real]


def view_report(
    sampler: ViewSampler, samples: Iterable[tuple[tuple[int, int], np.ndarray, np.random.Generator]]
) -> ViewReport:
    """The report of ``samples``: ``(image size (W, H), rects int [n, 4] x, y, w, h, rng)`` each, drawn
    with ``sampler.geometry`` (the rng as the dataset seeds it gives the training sample's geometry)."""
    c = sampler.cfg
    n_levels = sampler.num_levels
    sizes: list[list[np.ndarray]] = [[] for _ in range(sampler.num_views)]
    levels: list[list[np.ndarray]] = [[] for _ in range(sampler.num_views)]
    proposal_sides, count, fallbacks = [], 0, 0
    for size, rects, rng in samples:
        geo = sampler.geometry(size, rects, rng)
        count += 1
        fallbacks += sum(geo.fallback)
        rects = np.asarray(rects, np.float64).reshape(-1, 4)
        proposal_sides.append(np.sqrt((rects[:, 2] + 1) * (rects[:, 3] + 1)))
        for view, s, lv in _view_rows(geo, sampler.pairs):
            sizes[view].append(s)
            levels[view].append(lv)
    stats = []
    for v in range(sampler.num_views):
        s = np.concatenate(sizes[v]) if sizes[v] else np.zeros(0)
        lv = np.concatenate(levels[v]) if levels[v] else np.zeros(0, np.int64)
        counts = np.bincount(np.where(lv < 0, n_levels, lv), minlength=n_levels + 1)[: n_levels + 1]
        median = float(np.median(s)) if len(s) else float("nan")
        stats.append(
            ViewStats(v, c.geometry.view_sizes[v], counts.astype(np.int64), median, int((s < TINY_SIDE).sum()))
        )
    sides = np.concatenate(proposal_sides) if proposal_sides else np.zeros(0)
    return ViewReport(
        recipe=c.recipe,
        view_sizes=list(c.geometry.view_sizes),
        thresholds=list(sampler.thresholds) if sampler.thresholds else None,
        fit_objects=bool(c.geometry.fit_objects),
        samples=count,
        views=stats,
        fallbacks=fallbacks,
        proposal_side=float(np.median(sides)) if len(sides) else float("nan"),
        level_names=[f"P{2 + p}" for p in range(n_levels)] + ["none"] if sampler.thresholds else ["P", "none"],
    )


def dataset_view_report(dataset: Any, num_images: int = 64, epoch: int = 0, epochs: int = 1) -> ViewReport:
    """The report of up to ``num_images`` images of a :class:`~soco_det.data.dataset.PretrainDataset`,
    evenly spaced over it, with the geometry their training samples of epochs ``epoch`` ..
    ``epoch + epochs - 1`` have (images whose size or proposals cannot be read are left out)."""
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).round().astype(np.int64))

    def samples():
        for index in picks:
            inputs = dataset.geometry_inputs(int(index))
            for e in range(epoch, epoch + epochs) if inputs is not None else ():
                yield (*inputs, np.random.default_rng([dataset.seed, e, int(index)]))

    return view_report(dataset.sampler, samples())


def tiny_box_warnings(report: ViewReport, share: float = TINY_SHARE, where: str = "") -> list[str]:
    """One message per view where more than ``share`` of the boxes are under :data:`TINY_SIDE` px;
    ``where`` (e.g. the proposal store) starts each message."""
    remedy = "use larger views (data.views.geometry.view_sizes)"
    if not report.fit_objects:
        remedy = "fit the views to the objects (data.views.geometry.fit_objects=true) or " + remedy
    out = []
    for s in report.views:
        if s.boxes and s.tiny_share > share:
            out.append(
                f"{where}view V{s.view + 1} ({s.size} px): {100 * s.tiny_share:.0f} % of its boxes are under "
                f"{TINY_SIDE:g} px (median {s.median_side:.1f} px), too small for RoIAlign to see the object; "
                f"{remedy}; `soco-det views report` shows the levels per view"
            )
    return out


def warn_tiny_boxes(dataset: Any, num_images: int = CHECK_IMAGES) -> list[str]:
    """Log (on rank 0, once per process and message) :func:`tiny_box_warnings` for a sample of
    ``dataset``; returns the messages. Cheap: the geometry of ``num_images`` samples, no pixels."""
    store = getattr(dataset, "store_path", None)
    messages = tiny_box_warnings(dataset_view_report(dataset, num_images), where=f"{store}: " if store else "")
    for message in messages:
        if message not in _WARNED and get_rank() == 0:
            _WARNED.add(message)
            log.warning("%s", message)
    return messages
