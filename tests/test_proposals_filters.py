"""The official proposal filters (docs/method.md 1.2-1.3) on hand-made rects and against a naive loop."""

from math import sqrt

import numpy as np
import pytest

from soco_det.errors import UserError
from soco_det.proposals.filters import (
    STAGE_EMPTY,
    STAGE_MAIN,
    STAGE_MIN_SIDE,
    STAGE_RATIO,
    FilterSpec,
    parse_filter,
    rect_mask,
)

OFFICIAL = parse_filter("ratio3size0308")
POST = parse_filter("ratio3size0308post")


def naive_ratio_size(rects, width, height, r=3, lo=0.3, hi=0.8):
    """The official filter_ratio_size, one rect at a time (the reference for the vectorised one)."""
    img = sqrt(width * height)
    return [
        bool(w >= 32 and h >= 32 and (1.0 / r) <= (w / h) <= r and lo <= (sqrt(w * h) / img) <= hi)
        for _, _, w, h in rects
    ]


def test_parse_official_strings():
    assert (OFFICIAL.ratio, OFFICIAL.min_size, OFFICIAL.max_size, OFFICIAL.min_side, OFFICIAL.post) == (
        3.0,
        0.3,
        0.8,
        32,
        False,
    )
    assert POST.post and POST.min_size == 0.3 and POST.max_size == 0.8
    other = parse_filter("ratio2size0110")
    assert (other.ratio, other.min_size, other.max_size) == (2.0, 0.1, 1.0)
    assert parse_filter("none") == FilterSpec(None, None, None, 32, False, "none")
    assert parse_filter("raw").min_side == 0
    for bad in ("ratio3size08", "ratio3size0803", "size0308", "nonsense", "ratio0size0308"):
        with pytest.raises(UserError):
            parse_filter(bad)


@pytest.mark.parametrize("w,h,kept", [(31, 64, False), (32, 64, True), (64, 31, False), (64, 32, True)])
def test_min_side_as_stored(w, h, kept):
    # w is max - min as stored: w = 32 passes although the rect spans 33 pixels.
    assert bool(rect_mask(np.array([[0, 0, w, h]]), 1000, 1000, ratio=3, min_size=None, max_size=None)[0]) is kept


@pytest.mark.parametrize("w,h,kept", [(96, 32, True), (97, 32, False), (32, 96, True), (32, 97, False), (64, 64, True)])
def test_aspect_ratio_boundary_is_inclusive(w, h, kept):
    assert bool(rect_mask(np.array([[0, 0, w, h]]), 10_000, 10_000, ratio=3, min_size=None, max_size=None)[0]) is kept


@pytest.mark.parametrize("side,kept", [(59, False), (60, True), (100, True), (160, True), (161, False)])
def test_size_boundaries_are_inclusive(side, kept):
    # 200 x 200 image: sqrt(60*60)/200 == 0.3 and sqrt(160*160)/200 == 0.8 exactly.
    rects = np.array([[0, 0, side, side]], np.int32)
    assert bool(OFFICIAL.mask(rects, 200, 200)[0]) is kept
    assert naive_ratio_size(rects.tolist(), 200, 200) == [kept]


def test_vectorised_equals_naive_official_loop():
    rng = np.random.default_rng(0)
    for width, height in [(200, 150), (500, 375), (64, 640)]:
        rects = np.stack(
            [
                rng.integers(0, 50, 400),
                rng.integers(0, 50, 400),
                rng.integers(0, width, 400),
                rng.integers(0, height, 400),
            ],
            1,
        ).astype(np.int32)
        assert OFFICIAL.mask(rects, width, height).tolist() == naive_ratio_size(rects.tolist(), width, height)


def test_apply_keeps_order_and_dtype():
    rects = np.array([[5, 5, 100, 100], [0, 0, 10, 10], [1, 2, 90, 80]], np.int32)
    kept, stage = POST.apply(rects, 200, 200)
    assert stage == STAGE_MAIN and kept.dtype == np.int32
    np.testing.assert_array_equal(kept, rects[[0, 2]])


def test_post_chain_stages():
    big = (2000, 2000)  # 40 px boxes are far below 0.3 of this image: the main filter keeps nothing
    ratio_ok = np.array([[0, 0, 40, 40], [0, 0, 200, 40], [0, 0, 10, 10]], np.int32)
    kept, stage = POST.apply(ratio_ok, *big)
    assert stage == STAGE_RATIO
    np.testing.assert_array_equal(kept, ratio_ok[:1])  # aspect 5 is dropped, min side still applies

    elongated = np.array([[0, 0, 200, 40], [0, 0, 10, 10]], np.int32)
    kept, stage = POST.apply(elongated, *big)
    assert stage == STAGE_MIN_SIDE
    np.testing.assert_array_equal(kept, elongated[:1])

    tiny = np.array([[0, 0, 31, 300], [0, 0, 10, 10]], np.int32)
    kept, stage = POST.apply(tiny, *big)
    assert stage == STAGE_EMPTY and kept.shape == (0, 4)  # no whole-image box: that is added at load time

    # Without 'post' an empty main result stays empty.
    kept, stage = OFFICIAL.apply(ratio_ok, *big)
    assert stage == STAGE_EMPTY and len(kept) == 0


def test_no_rects_and_zero_height_are_handled():
    kept, stage = POST.apply(np.zeros((0, 4), np.int32), 100, 100)
    assert kept.shape == (0, 4) and stage == STAGE_EMPTY
    raw = parse_filter("raw")
    rects = np.array([[0, 0, 5, 0], [0, 0, 0, 0]], np.int32)
    np.testing.assert_array_equal(raw.apply(rects, 10, 10)[0], rects)
    assert not rect_mask(rects, 10, 10, ratio=3, min_size=None, max_size=None, min_side=0).any()
