"""The view sampler: one class that makes all views of one sample, with their boxes (docs/method.md 2).

For an image and its proposals, :class:`ViewSampler` draws:

0. with ``geometry.fit_objects`` only (not in the paper, off in every recipe; docs/method.md 2.9):
   an object region around a drawn proposal, which then stands in for the whole image (V1 shows
   it, the crops are drawn inside it, the proposals are clipped to it);
1. the crops: V1 the whole image, every ``crop`` view an independent RandomResizedCrop of the
   original image; re-drawn (up to ``max_tries``) until every pair ``(0, v)`` has at least
   ``least_common`` proposals overlapping view v's crop (``least_common`` starts at
   ``max(padding_k // 2, 1)`` and halves after each failed try; the last draw is kept);
2. per pair, ``select_k`` proposals drawn without replacement from those overlapping the crop
   (all if fewer), separately for each pair;
3. per pair, V1's copy of the selected boxes jittered (``jitter_prob``, ``jitter_ratio``), then
   every box clipped to its view's crop; a view with no box gets one whole-view box with id 1;
4. padding to ``padding_k`` rows per view with duplicates (drawn with replacement, separately per
   view) of boxes whose id is in both views of the pair;
5. level assignment in each view's own pixel grid, normalisation by the crop size;
6. an independent horizontal flip per view (``flip_prob``), applied to the image and every box
   set of the view; the colour pipeline of the view; cutout inside the boxes of ``cutout_views``.

A ``down:m`` view (SoCo*'s V4, the paper's V3) is view m's resized crop downsampled before m's flip
and colour; its pair reuses pair ``(0, m)``'s boxes, ids and V1 boxes, with levels at its own size.

Box conventions are those of :mod:`soco_det.data.boxes` (continuous by default, ``legacy=True``
for the official off-by-ones). All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from soco_det.data import boxes as B
from soco_det.data import photometric
from soco_det.data.config import PixelOptions, ViewsConfig
from soco_det.data.crops import MIN_REGION_SIDE, object_region, random_resized_crop, whole_image
from soco_det.data.lazy_image import LazyImage, draft_reduction
from soco_det.data.levels import assign_levels
from soco_det.data.resize import resize_into

FLIP = Image.Transpose.FLIP_LEFT_RIGHT
# geometry.fit_objects: an object region keeps the proposals whose side is this fraction of its own
# (the paper's size filter ratio3size0308 with the region as the image; docs/method.md 1.2, 2.9).
REGION_SIZE_RANGE = (0.3, 0.8)


@dataclass
class ViewSample:
    """All views of one sample.

    ``K = padding_k``; ``pairs[p] = (0, v)``. Per pair ``p``: ``boxes[p] = (a, b)`` float32 ``[K, 4]``
    ``x1, y1, x2, y2`` normalised to the view, after flips; ``ids[p]`` int64 ``[K]`` (1-based
    proposal index in the store's order); ``levels[p]`` int64 ``[K]`` (0..P-1, -1 unassigned).
    ``images[v]`` float32 ``[3, S_v, S_v]`` normalised (``photometric="device"``: uint8
    ``[3, S_v, S_v]`` before colour, blur, normalisation and cutout, which
    :func:`soco_det.data.device_photometric.apply_device_photometric` applies from ``params`` and
    ``cutouts``). ``crops[v]`` is the ``(top, left, h, w)``
    crop of the original image the view shows (a ``down:m`` view shows m's crop), ``flips[v]``
    whether it was flipped; ``cutouts[v]`` the inclusive ``x1, y1, x2, y2`` regions zeroed.
    """

    images: list[torch.Tensor]
    pairs: list[tuple[int, int]]
    boxes: list[tuple[np.ndarray, np.ndarray]]
    ids: list[tuple[np.ndarray, np.ndarray]]
    levels: list[tuple[np.ndarray, np.ndarray]]
    crops: list[B.Crop]
    flips: list[bool]
    cutouts: list[np.ndarray]
    image_size: tuple[int, int]
    num_proposals: int
    tries: int
    padded: list[tuple[int, int]] = field(default_factory=list)  # rows added by padding, per pair
    fallback: list[bool] = field(default_factory=list)  # pair fell back to whole-view boxes (id 1)
    params: list[np.ndarray] = field(default_factory=list)  # per view float32 [NUM_PARAMS] (photometric.PARAM_NAMES)


@dataclass
class _PairBoxes:
    """Crop-local pixel boxes of one pair before normalisation: view 0's and view v's."""

    local: tuple[np.ndarray, np.ndarray]
    ids: tuple[np.ndarray, np.ndarray]
    padded: tuple[int, int]
    fallback: bool


@dataclass
class SampleGeometry:
    """Everything the geometry phase decides for one sample (per pair ``p``: ``(view 0, view v)``):
    :meth:`ViewSampler.geometry`, from the image size and the proposals alone (no pixels)."""

    image_size: tuple[int, int]
    crops: list[B.Crop]
    flips: list[bool]
    tries: int
    norm_pre: list[tuple[np.ndarray, np.ndarray]]  # normalised boxes before the flips
    norm: list[tuple[np.ndarray, np.ndarray]]  # after the flips: what the sample returns
    ids: list[tuple[np.ndarray, np.ndarray]]
    levels: list[tuple[np.ndarray, np.ndarray]]
    padded: list[tuple[int, int]]
    fallback: list[bool]
    sizes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # sqrt area in view pixels, per row
    region: B.Crop | None = None  # the object region V1 shows (geometry.fit_objects), None: the whole image


class ViewSampler:
    """Makes the views of a sample according to a (resolved) :class:`ViewsConfig`."""

    def __init__(self, cfg: ViewsConfig, pixels: PixelOptions | None = None) -> None:
        """``pixels``: how the pixels are decoded, resized and coloured (default
        ``PixelOptions()``, as ``DataConfig``'s defaults). With ``photometric="device"`` the
        views are uint8 plus the drawn parameters, from the same random draws and the same
        geometry as ``"cpu"``; ``resize_backend`` and the reducing gaps change pixels only."""
        cfg.validate()
        pixels = PixelOptions() if pixels is None else pixels.pixels
        pixels.validate()
        self.pixels = pixels
        self.cfg = cfg.resolved()
        c = self.cfg
        self.num_views = len(c.geometry.view_kinds)
        self.source = [cfg.source_view(v) for v in range(self.num_views)]
        self.pairs = [(0, v) for v in range(1, self.num_views)]
        self.thresholds = c.levels.level_thresholds if c.levels.scale_aware else None
        self.num_levels = len(c.levels.level_thresholds) if c.levels.scale_aware else 1

    # -- geometry ---------------------------------------------------------------------------
    def _draw_crops(self, width: int, height: int, props: np.ndarray, rng: np.random.Generator):
        c = self.cfg
        least_common = max(c.boxes.padding_k // 2, 1)
        crops: list[B.Crop] = []
        selected: dict[int, np.ndarray] = {}
        tries = 0
        while tries < c.boxes.max_tries:
            crops = [whole_image(width, height) if kind == "whole" else None for kind in c.geometry.view_kinds]
            for v, kind in enumerate(c.geometry.view_kinds):
                if kind == "crop":
                    crops[v] = random_resized_crop(
                        width, height, c.geometry.crop_scale, c.geometry.crop_ratio, c.geometry.crop_attempts, rng
                    )
            for v, kind in enumerate(c.geometry.view_kinds):
                if kind == "crop":
                    pool = np.flatnonzero(B.overlaps(props, B.crop_box(crops[v], c.legacy)))
                    if len(pool) > c.boxes.select_k:
                        pool = rng.choice(pool, c.boxes.select_k, replace=False)
                    selected[v] = pool
            tries += 1
            if all(len(s) >= least_common for s in selected.values()):
                break
            least_common = max(least_common // 2, 1)
        for v in range(self.num_views):
            if crops[v] is None:  # down:m shows the crop of view m
                crops[v] = crops[self.source[v]]
        return crops, selected, tries

    def _object_region(
        self, width: int, height: int, props: np.ndarray, ids: np.ndarray, rng: np.random.Generator
    ) -> tuple[B.Crop | None, int]:
        """``geometry.fit_objects``: ``(region, id of its proposal)``, the region around a proposal
        drawn uniformly among those large enough to fill ``fit_box_side`` of the smallest region
        (all when none is; docs/method.md 2.9)."""
        sides = B.box_sizes(props, self.cfg.legacy)
        pool = np.flatnonzero(sides >= MIN_REGION_SIDE * self.cfg.geometry.fit_box_side)
        i = int(pool[rng.integers(len(pool))]) if len(pool) else int(rng.integers(len(props)))
        return object_region(width, height, props[i], self.cfg.geometry.fit_box_side, rng), int(ids[i])

    def _region_proposals(
        self, props: np.ndarray, ids: np.ndarray, region: B.Crop, drawn: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The proposals of an object region, in its own pixels: clipped to it and kept when their
        side is 0.3-0.8 of the region's, the paper's filter with the region as the image
        (docs/method.md 1.2); the drawn proposal (id ``drawn``) is always kept."""
        local, ids = B.clip_to_crop(props, ids, region, self.cfg.legacy)
        rel = B.box_sizes(local, self.cfg.legacy) / np.sqrt(region[2] * region[3])
        keep = ((rel >= REGION_SIZE_RANGE[0]) & (rel <= REGION_SIZE_RANGE[1])) | (ids == drawn)
        return local[keep], ids[keep]

    def _whole_view(self, crop: B.Crop) -> np.ndarray:
        _, _, h, w = crop
        end = -1.0 if self.cfg.legacy else 0.0
        return np.array([[0.0, 0.0, w + end, h + end]])

    def _pad(self, local: np.ndarray, ids: np.ndarray, common: np.ndarray, rng: np.random.Generator):
        need = self.cfg.boxes.padding_k - len(ids)
        if need <= 0:
            return local, ids, 0
        # ids and common hold <= select_k values: a broadcast compare beats np.isin's sorting
        rows = rng.choice(np.flatnonzero((ids[:, None] == common[None, :]).any(axis=1)), need, replace=True)
        return np.concatenate([local, local[rows]]), np.concatenate([ids, ids[rows]]), need

    def _pair_boxes(self, props, prop_ids, sel, crop0, crop_v, rng) -> _PairBoxes:
        c = self.cfg
        jittered = B.jitter(props[sel], rng, c.boxes.jitter_prob, c.boxes.jitter_ratio, c.legacy)
        local0, ids0 = B.clip_to_crop(jittered, prop_ids[sel], crop0, c.legacy)
        local_v, ids_v = B.clip_to_crop(props[sel], prop_ids[sel], crop_v, c.legacy)
        common = ids_v[(ids_v[:, None] == ids0[None, :]).any(axis=1)]  # ids in both (unique: ids_v is)
        fallback = len(common) == 0
        if fallback:
            # No proposal survived in both views (no overlap after 5 tries): whole-view boxes with
            # id 1 in both, as the official clip_bboxs fallback (docs/method.md 2.4, 9.10).
            local0, local_v = self._whole_view(crop0), self._whole_view(crop_v)
            ids0 = ids_v = common = np.array([1], dtype=np.int64)
        local0, ids0, pad0 = self._pad(local0, ids0, common, rng)
        local_v, ids_v, pad_v = self._pad(local_v, ids_v, common, rng)
        return _PairBoxes((local0, local_v), (ids0.astype(np.int64), ids_v.astype(np.int64)), (pad0, pad_v), fallback)

    def _sizes(self, local: np.ndarray, crop: B.Crop, size: int) -> np.ndarray:
        """``float64 [n]`` the boxes' sqrt area in the view's pixel grid, which picks their level."""
        return B.box_sizes(B.view_pixel_boxes(local, crop, size, self.cfg.legacy), self.cfg.legacy)

    def _cutout_pixel_boxes(self, norm: np.ndarray, size: int) -> np.ndarray:
        """Inclusive integer pixel boxes a cutout centre is drawn from, for normalised boxes."""
        scaled = norm * size
        if self.cfg.legacy:
            return np.trunc(scaled).astype(np.int64)
        lo = np.floor(scaled[:, :2])
        hi = np.ceil(scaled[:, 2:]) - 1
        return np.clip(np.concatenate([lo, np.maximum(hi, lo)], axis=1), 0, size - 1).astype(np.int64)

    # -- pixels ---------------------------------------------------------------------------
    def _view_buffer(self, size: int):
        """``(out, chw)``: what a view is returned as (device path: the uint8 ``[3, S, S]`` tensor;
        CPU path: uint8 ``[S, S, 3]`` for the colour kernels) and its channel-first view to write."""
        if self.pixels.photometric == "cpu":
            out = np.empty((size, size, 3), dtype=np.uint8)
            return out, out.transpose(2, 0, 1)
        out = torch.empty((3, size, size), dtype=torch.uint8)
        return out, out.numpy()

    def _resize_numba(self, pixels, sx, sy, crops, flips, direct) -> list:
        """Every view resized (and flipped) by :func:`soco_det.data.resize.resize_into`: PIL's exact
        bilinear pixels, written straight into the buffers the sample returns."""
        c = self.cfg
        src = np.asarray(pixels, dtype=np.uint8)  # [H, W, 3]; a PIL image is copied once here
        views: list = [None] * self.num_views
        chw: list = [None] * self.num_views
        for v in direct:
            top, left, h, w = crops[v]
            views[v], chw[v] = self._view_buffer(c.geometry.view_sizes[v])
            resize_into(src, (left * sx, top * sy, (left + w) * sx, (top + h) * sy), chw[v], flips[v])
        for v, kind in enumerate(c.geometry.view_kinds):
            if kind.startswith("down:"):  # view m's resized crop before m's flip and colour
                m = self.source[v]
                src_m = chw[m].transpose(1, 2, 0)  # [S_m, S_m, 3] as stored
                if flips[m]:
                    src_m = src_m[:, ::-1]  # un-flip by indexing: m's pixels before its flip
                size_m = c.geometry.view_sizes[m]
                views[v], chw[v] = self._view_buffer(c.geometry.view_sizes[v])
                resize_into(src_m, (0.0, 0.0, float(size_m), float(size_m)), chw[v], flips[v])
        return views

    def _resize_pil(self, pixels, sx, sy, crops, flips, direct) -> list:
        """The views by PIL's ``resize``: uint8 ``[S, S, 3]`` (flipped by a strided view) for the CPU
        path, uint8 ``[3, S, S]`` tensors for the device path, as :meth:`_resize_numba`."""
        c = self.cfg
        if not isinstance(pixels, Image.Image):
            pixels = Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB")
        resized: list[Image.Image] = [None] * self.num_views  # type: ignore[list-item]
        for v in direct:
            top, left, h, w = crops[v]
            size = (c.geometry.view_sizes[v], c.geometry.view_sizes[v])
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            resized[v] = pixels.resize(
                size, Image.Resampling.BILINEAR, box=box, reducing_gap=self.pixels.resize_reducing_gap
            )
        for v, kind in enumerate(c.geometry.view_kinds):
            if kind.startswith("down:"):  # before view m's flip and colour
                resized[v] = resized[self.source[v]].resize((c.geometry.view_sizes[v],) * 2, Image.Resampling.BILINEAR)
        views = []
        for v, view in enumerate(resized):
            arr = np.asarray(view, dtype=np.uint8)
            if flips[v]:  # a horizontal flip: the same pixels as PIL's FLIP_LEFT_RIGHT
                arr = arr[:, ::-1]
            # CPU path: the colour kernels read any strides; device path: one channel-first copy
            views.append(
                arr
                if self.pixels.photometric == "cpu"
                else torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
            )
        return views

    # -- the sample -------------------------------------------------------------------------
    def __call__(self, img: Image.Image | LazyImage, rects: np.ndarray, rng: np.random.Generator) -> ViewSample:
        """Views of ``img`` (RGB PIL, or a :class:`LazyImage` decoded once the crops are known)
        with proposals ``rects`` (int ``[n, 4]`` x, y, w, h, store convention, in full-resolution
        pixels; ``n == 0`` gives the whole-image fallback).

        Three phases, in the order they draw from ``rng``: geometry (crops, boxes, levels, flips;
        from the image size alone), pixels (decode once, resize and flip every view; no draws),
        photometric (colour, blur, solarize, normalisation and cutout per view)."""
        geo = self.geometry(img.size, rects, rng)
        views = self._pixels(img, geo)
        images, cutouts, params = self._photometric(views, geo, rng)
        return ViewSample(
            images=images,
            pairs=list(self.pairs),
            boxes=[(a.astype(np.float32), b.astype(np.float32)) for a, b in geo.norm],
            ids=geo.ids,
            levels=geo.levels,
            crops=geo.crops,
            flips=geo.flips,
            cutouts=cutouts,
            image_size=geo.image_size,
            num_proposals=len(rects),
            tries=geo.tries,
            padded=geo.padded,
            fallback=geo.fallback,
            params=params,
        )

    def geometry(self, size: tuple[int, int], rects: np.ndarray, rng: np.random.Generator) -> SampleGeometry:
        """Crops, per-pair boxes (jitter, clip, padding), levels and flips: every geometric draw,
        from the image ``size`` ``(W, H)`` and ``rects`` alone (the first phase of ``__call__``,
        so the same ``rng`` state gives the geometry of the very sample ``__call__`` returns)."""
        c = self.cfg
        width, height = size
        props = B.rects_to_boxes(rects, c.legacy)
        if len(props) == 0:
            props = B.whole_image_box(width, height, c.legacy)
        prop_ids = np.arange(1, len(props) + 1, dtype=np.int64)
        region, drawn = (
            self._object_region(width, height, props, prop_ids, rng) if c.geometry.fit_objects else (None, 0)
        )
        if c.geometry.fit_objects:  # the region (or the whole image) stands in for the image from here on
            props, prop_ids = self._region_proposals(props, prop_ids, region or whole_image(width, height), drawn)
            width, height = (region[3], region[2]) if region is not None else (width, height)

        crops, selected, tries = self._draw_crops(width, height, props, rng)
        by_source: dict[int, _PairBoxes] = {
            v: self._pair_boxes(props, prop_ids, selected[v], crops[0], crops[v], rng) for v in selected
        }
        pairs = [by_source[self.source[v]] for _, v in self.pairs]
        sizes = [
            tuple(self._sizes(pb.local[s], crops[view], c.geometry.view_sizes[view]) for s, view in enumerate(pair))
            for pb, pair in zip(pairs, self.pairs)
        ]
        levels = [tuple(assign_levels(sz, self.thresholds) for sz in pair_sizes) for pair_sizes in sizes]
        flips = [bool(rng.random() < c.geometry.flip_prob) for _ in range(self.num_views)]
        norm_pre = [
            tuple(B.normalise(pb.local[s], crops[view]) for s, view in enumerate(pair))
            for pb, pair in zip(pairs, self.pairs)
        ]
        norm = [
            tuple(B.hflip(nb) if flips[view] else nb for nb, view in zip(nbs, pair))
            for nbs, pair in zip(norm_pre, self.pairs)
        ]
        if region is not None:  # crops back in original-image pixels (boxes are crop-local already)
            crops = [(top + region[0], left + region[1], h, w) for top, left, h, w in crops]
        return SampleGeometry(
            image_size=(size[0], size[1]),
            crops=crops,
            flips=flips,
            tries=tries,
            norm_pre=norm_pre,
            norm=norm,
            ids=[pb.ids for pb in pairs],
            levels=levels,
            padded=[pb.padded for pb in pairs],
            fallback=[pb.fallback for pb in pairs],
            sizes=sizes,
            region=region,
        )

    def _pixels(self, img: Image.Image | LazyImage, geo: SampleGeometry) -> list:
        """Every view's uint8 pixels, resized straight from the decoded image and flipped (decoded
        once, at a reduced JPEG scale when every crop allows it)."""
        c = self.cfg
        crops = geo.crops
        direct = [v for v, kind in enumerate(c.geometry.view_kinds) if not kind.startswith("down:")]
        if isinstance(img, LazyImage):
            reduce = 1
            if self.pixels.decode_reducing_gap:
                crop_wh = [(crops[v][3], crops[v][2]) for v in direct]
                reduce = draft_reduction(
                    crop_wh, [c.geometry.view_sizes[v] for v in direct], self.pixels.decode_reducing_gap
                )
            pixels, sx, sy = img.load(reduce)
        else:
            pixels, sx, sy = img, 1.0, 1.0
        if self.pixels.resize_reducing_gap is None and self.pixels.resize_backend == "numba":
            return self._resize_numba(pixels, sx, sy, crops, geo.flips, direct)
        return self._resize_pil(pixels, sx, sy, crops, geo.flips, direct)

    def _photometric(self, views: list, geo: SampleGeometry, rng: np.random.Generator):
        """``(images, cutouts, params)``: per view, the drawn colour parameters, applied here (CPU
        path: normalised float32) or carried for the device (uint8 kept), and the cutout regions."""
        c = self.cfg
        images, cutouts, params = [], [], []
        for v, view in enumerate(views):
            p = photometric.draw_params(
                rng,
                jitter=c.photometric.color_jitter,
                jitter_prob=c.photometric.color_jitter_prob,
                grayscale_prob=c.photometric.grayscale_prob,
                blur_prob=c.photometric.blur_prob[v],
                blur_sigma=c.photometric.blur_sigma,
                solarize_prob=c.photometric.solarize_prob[v],
                solarize_threshold=c.photometric.solarize_threshold,
            )
            if self.pixels.photometric == "cpu":  # view: uint8 [S, S, 3], flipped already
                tensor = photometric.apply_params(view, p, c.photometric.mean, c.photometric.std)
            else:  # uint8 [3, S, S]; colour, blur, normalisation and cutout happen on the device
                tensor = view
            regions = np.zeros((0, 4), dtype=np.int64)
            if v in c.photometric.cutout_views:
                p_idx = v - 1  # view v >= 1 appears in exactly one pair, (0, v)
                size = c.geometry.view_sizes[v]
                if c.photometric.cutout_mirrored:
                    # Official pre-fix placement: pre-flip integer boxes, bound hard-wired to V1's size.
                    pixel = self._cutout_pixel_boxes(geo.norm_pre[p_idx][1], size)
                    bound = c.geometry.view_sizes[0]
                else:
                    pixel = self._cutout_pixel_boxes(geo.norm[p_idx][1], size)
                    bound = size - 1
                regions = photometric.cutout_regions(
                    pixel, rng, c.photometric.cutout_prob, c.photometric.cutout_ratio, bound
                )
                if self.pixels.photometric == "cpu":
                    photometric.apply_cutout(tensor, regions)
            images.append(tensor)
            cutouts.append(regions)
            params.append(p.astype(np.float32))
        return images, cutouts, params
