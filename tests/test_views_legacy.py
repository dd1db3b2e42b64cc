"""The legacy switch reproduces the official box conventions; values worked out by hand from the
formulas of docs/method.md 1.3, 1.4, 2.3, 2.4, 2.6, 2.7 (and the continuous default for contrast)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from soco_det.data import boxes as B
from soco_det.data.config import ViewsConfig
from soco_det.data.levels import assign_levels
from soco_det.data.photometric import cutout_regions
from soco_det.data.sampler import ViewSampler

RECT = np.array([[10, 20, 30, 40]], dtype=np.int32)  # x, y, w = max_x - min_x, h
CROP = (30, 5, 100, 50)  # top, left, h, w


class FixedRng:
    """Stands in for numpy's Generator where a hand-worked case needs chosen random numbers."""

    def __init__(self, random, uniform):
        # ``random``: one array returned by every call, or a list of arrays returned in turn
        self._random = list(random) if isinstance(random, list) and np.ndim(random[0]) else [np.asarray(random)]
        self._uniform = np.asarray(uniform)

    def random(self, n=None):
        return self._random.pop(0) if len(self._random) > 1 else self._random[0]

    def uniform(self, lo, hi, size=None):
        return self._uniform


def test_rect_conversion_legacy_drops_a_pixel():
    np.testing.assert_array_equal(B.rects_to_boxes(RECT, legacy=True), [[10, 20, 39, 59]])  # x2 = x + w - 1
    np.testing.assert_array_equal(B.rects_to_boxes(RECT), [[10, 20, 41, 61]])  # pixels 10..40 -> [10, 41)


def test_whole_image_fallback():
    np.testing.assert_array_equal(B.whole_image_box(64, 48, legacy=True), [[0, 0, 63, 47]])
    np.testing.assert_array_equal(B.whole_image_box(64, 48), [[0, 0, 64, 48]])


def test_clip_normalise_flip_legacy():
    box = B.rects_to_boxes(RECT, legacy=True)  # [10, 20, 39, 59]
    # crop region [5, 30, 54, 129] inclusive -> intersection [10, 30, 39, 59] -> local [5, 0, 34, 29]
    local, ids = B.clip_to_crop(box, np.array([7]), CROP, legacy=True)
    np.testing.assert_array_equal(local, [[5, 0, 34, 29]])
    assert ids.tolist() == [7]
    norm = B.normalise(local, CROP)  # x / crop_w, y / crop_h of inclusive indices
    np.testing.assert_allclose(norm, [[0.1, 0.0, 0.68, 0.29]])
    np.testing.assert_allclose(B.hflip(norm), [[0.32, 0.0, 0.9, 0.29]])  # 1 - x
    # a full-width box ends at (w - 1) / w in legacy, at 1 in the continuous convention
    full = B.normalise(B.clip_to_crop(B.whole_image_box(200, 300, True), np.array([1]), CROP, True)[0], CROP)
    np.testing.assert_allclose(full, [[0, 0, 49 / 50, 99 / 100]])
    full_c = B.normalise(B.clip_to_crop(B.whole_image_box(200, 300), np.array([1]), CROP)[0], CROP)
    np.testing.assert_allclose(full_c, [[0, 0, 1, 1]])


def test_strict_overlap_test():
    crop_legacy = B.crop_box(CROP, legacy=True)  # [5, 30, 54, 129]
    touching = np.array([[54.0, 40, 80, 60], [53.0, 40, 80, 60]])  # x1 == crop x2: no overlap (strict)
    assert B.overlaps(touching, crop_legacy).tolist() == [False, True]
    crop_cont = B.crop_box(CROP)  # [5, 30, 55, 130]
    assert B.overlaps(np.array([[55.0, 40, 80, 60], [54.0, 40, 80, 60]]), crop_cont).tolist() == [False, True]


def test_level_assignment_legacy_on_truncated_boxes():
    local = np.array([[5.0, 0, 34, 29]])
    pixel = B.view_pixel_boxes(local, CROP, 224, legacy=True)
    # 5/50*224 = 22.4 -> 22; 34/50*224 = 152.32 -> 152; 29/100*224 = 64.96 -> 64
    np.testing.assert_array_equal(pixel, [[22, 0, 152, 64]])
    size = B.box_sizes(pixel, legacy=True)  # sqrt(131 * 65) = 92.28
    np.testing.assert_allclose(size, [np.sqrt(131 * 65)])
    assert assign_levels(size, [48, 96, 192, 224]).tolist() == [1]  # P3
    # boundaries: "first level with size <= threshold"; above the last one: unassigned
    assert assign_levels(np.array([48, 48.01, 96, 192, 224, 224.5]), [48, 96, 192, 224]).tolist() == [0, 1, 1, 2, 3, -1]


def test_jitter_hand_worked():
    box = np.array([[10.0, 20, 39, 59]])
    j = [[0.1, -0.1, 0.1, -0.1]]
    # legacy: w = 30, h = 40 -> x1' = 13, y1' = 16, w' = 33, h' = 36, x2' = 13 + 33 - 1, y2' = 16 + 36 - 1
    out = B.jitter(box, FixedRng([0.2], j), prob=0.5, ratio=0.1, legacy=True)
    np.testing.assert_allclose(out, [[13, 16, 45, 51]])
    # continuous: w = 29, h = 39 -> x1' = 12.9, y1' = 16.1, x2' = 12.9 + 31.9, y2' = 16.1 + 35.1
    out = B.jitter(box, FixedRng([0.2], j), prob=0.5, ratio=0.1)
    np.testing.assert_allclose(out, [[12.9, 16.1, 44.8, 51.2]])
    # not drawn (random >= prob): unchanged
    np.testing.assert_allclose(B.jitter(box, FixedRng([0.7], j), prob=0.5, ratio=0.1), box)


def test_cutout_square_hand_worked():
    box = np.array([[10, 10, 19, 19]])  # 10 x 10 inclusive pixels -> area 100
    # ratio 0.25 -> side round(sqrt(25)) = 5, half 2; centre x = 10 + floor(0.0 * 10) = 10, y = 10 + floor(0.95*10) = 19
    rng = FixedRng([np.array([0.0]), np.array([0.0]), np.array([0.95])], [0.25])  # apply, cx, cy draws
    regions = cutout_regions(box, rng, prob=0.5, ratio=(0.25, 0.25), bound=223)
    np.testing.assert_array_equal(regions, [[8, 17, 12, 21]])


def test_cutout_bound_legacy_224_on_112_view():
    box = np.array([[100, 100, 111, 111]])
    draws = [np.array([0.0]), np.array([0.99]), np.array([0.99])]  # apply; centre (111, 111); side 12
    legacy = cutout_regions(box, FixedRng(list(draws), [1.0]), prob=1.0, ratio=(1.0, 1.0), bound=224)
    np.testing.assert_array_equal(legacy, [[105, 105, 117, 117]])  # reaches past the 112 view's last index
    default = cutout_regions(box, FixedRng(list(draws), [1.0]), prob=1.0, ratio=(1.0, 1.0), bound=111)
    np.testing.assert_array_equal(default, [[105, 105, 111, 111]])


def test_sampler_legacy_whole_image_fallback_and_levels():
    """An image without proposals: legacy V1 box is [0, 0, W-1, H-1] / (W, H), one id (1) everywhere."""
    img = Image.new("RGB", (100, 80), (120, 30, 200))
    # No jitter, so that every V1 row must be the exact fallback box (jitter is tested by hand above).
    cfg = ViewsConfig(recipe="soco_fpn", legacy=True, flip_prob=0.0, jitter_prob=0.0)
    sample = ViewSampler(cfg)(img, np.zeros((0, 4), np.int32), np.random.default_rng(0))
    for p in range(len(sample.pairs)):
        for side in (0, 1):
            assert sample.ids[p][side].tolist() == [1, 1, 1, 1]
        np.testing.assert_allclose(sample.boxes[p][0], [[0, 0, 99 / 100, 79 / 80]] * 4, rtol=1e-6)
        # V2/V3: the proposal covers the crop: whole-view box in legacy values
        top, left, h, w = sample.crops[p + 1]
        np.testing.assert_allclose(sample.boxes[p][1], [[0, 0, (w - 1) / w, (h - 1) / h]] * 4, rtol=1e-6)
