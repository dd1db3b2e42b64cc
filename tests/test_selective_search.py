"""The fast selective search returns exactly the official (SoCo-modified selectivesearch 0.4) rects.

Parity is checked rect by rect and in order against :mod:`soco_det.proposals.reference` (the PyPI
package plus SoCo's one change), on scikit-image's bundled photos, on generated sample scenes, on
flat-colour scenes full of exact ties, with several parameter sets and on degenerate images. The
two building blocks that re-implement scikit-image (Felzenszwalb, LBP) are also compared with
scikit-image directly.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import skimage.data
import skimage.feature
import skimage.segmentation
import skimage.transform
import skimage.util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soco_det.proposals import felzenszwalb as fz
from soco_det.proposals.reference import reference_selective_search
from soco_det.proposals.selective_search import (
    _bin_lut,
    lbp_codes,
    segment,
    selective_search,
    selective_search_regions,
)


def photo(name: str, short_side: int | None) -> np.ndarray:
    """A bundled scikit-image photo as ``[H, W, 3]`` uint8 RGB, resized to ``short_side`` if given."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    if short_side is not None:
        h, w = image.shape[:2]
        factor = short_side / min(h, w)
        image = skimage.transform.resize(image, (round(h * factor), round(w * factor)), anti_aliasing=True)
        image = skimage.util.img_as_ubyte(image)
    return np.ascontiguousarray(image)


def flat_blobs(seed: int, height: int = 72, width: int = 96, n: int = 12, levels: int = 4) -> np.ndarray:
    """Flat-colour ellipses and rectangles on a flat background: many exactly equal edge costs."""
    rng = np.random.default_rng(seed)
    palette = (rng.integers(0, levels, (n + 1, 3)) * (255 // (levels - 1))).astype(np.uint8)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = palette[0]
    yy, xx = np.mgrid[:height, :width]
    for i in range(1, n + 1):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ry, rx = rng.integers(3, height // 3), rng.integers(3, width // 3)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        image[mask] = palette[i]
    return image


def assert_same_rects(image: np.ndarray, **params) -> np.ndarray:
    # The reference needs PyPI's selectivesearch (a test dependency: pip install -e .[test]); it is
    # imported only when a parity test calls it, so without it those tests skip here and the tests
    # of the building blocks (Felzenszwalb, LBP, tables) still run.
    pytest.importorskip("selectivesearch")
    expected = reference_selective_search(image, **params)
    got = selective_search(image, **params)
    assert got.dtype == np.int32 and got.shape[1:] == (4,)
    np.testing.assert_array_equal(got, expected)  # same rects, same order
    return got


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "camera"])
def test_parity_on_photos(name):
    rects = assert_same_rects(photo(name, 150), scale=300, sigma=0.9, min_size=100)
    assert len(rects) > 5  # a real hierarchy, not a single region


def test_parity_at_default_parameters_300px():
    image = photo("coffee", 300)
    rects = assert_same_rects(image)
    regions = selective_search_regions(image)
    # Every segment is grouped into one final region covering the whole image.
    assert len(rects) == 2 * regions.num_segments - 1
    np.testing.assert_array_equal(rects[-1], [0, 0, image.shape[1] - 1, image.shape[0] - 1])
    assert regions.sizes[-1] == image.shape[0] * image.shape[1]


@pytest.mark.parametrize(
    ("scale", "sigma", "min_size"),
    [(100, 0.8, 50), (500, 0.5, 30), (1.0, 0.8, 50), (300, 1.5, 200)],
)
def test_parity_with_other_parameters(scale, sigma, min_size):
    assert_same_rects(photo("chelsea", 110), scale=scale, sigma=sigma, min_size=min_size)


def test_parity_on_sample_scenes(tmp_path):
    from soco_det.imageio import list_images, load_rgb
    from soco_det.synth import generate

    paths = generate(tmp_path, n_unlabeled=3, n_train=0, n_val=0, short_side=96, seed=3)
    images = list_images(paths["images"])
    assert len(images) == 3
    for path in images:
        assert_same_rects(np.asarray(load_rgb(paths["images"] / path)), scale=300, sigma=0.9, min_size=50)


@pytest.mark.parametrize("seed", range(4))
def test_parity_on_flat_colour_scenes(seed):
    # Flat colours give many exactly equal costs, similarities and histograms: tie-breaking matters.
    assert_same_rects(flat_blobs(seed), scale=100, sigma=0.5, min_size=20)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    levels=st.sampled_from([2, 3, 256]),
    scale=st.sampled_from([10.0, 100.0, 300.0]),
    min_size=st.integers(1, 30),
)
def test_parity_on_random_small_images(seed, height, width, levels, scale, min_size):
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, levels, (height, width, 3)) * (255 // (levels - 1))).astype(np.uint8)
    assert_same_rects(image, scale=scale, sigma=0.8, min_size=min_size)


@pytest.mark.parametrize("shape", [(8, 8), (1, 40), (40, 1), (1, 1)])
def test_degenerate_sizes(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
    assert_same_rects(image, scale=300, sigma=0.9, min_size=100)
    assert_same_rects(image, scale=1, sigma=0.0, min_size=1)


def test_constant_image_is_one_region():
    image = np.full((30, 50, 3), 128, dtype=np.uint8)
    rects = assert_same_rects(image)
    # One segment and nothing to merge; the official w = max_x - min_x convention.
    np.testing.assert_array_equal(rects, [[0, 0, 49, 29]])


def test_felzenszwalb_matches_scikit_image_labels():
    images = [photo("astronaut", 200), photo("camera", 160), flat_blobs(7)]
    for image in images:
        floats = skimage.util.img_as_float(image)
        for scale, sigma, min_size in [(300, 0.9, 100), (1, 0.8, 20), (50, 0.0, 5)]:
            expected = skimage.segmentation.felzenszwalb(floats, scale=scale, sigma=sigma, min_size=min_size)
            np.testing.assert_array_equal(fz.felzenszwalb(floats, scale, sigma, min_size), expected)
    np.testing.assert_array_equal(
        segment(images[0]),
        skimage.segmentation.felzenszwalb(skimage.util.img_as_float(images[0]), scale=300, sigma=0.9, min_size=100),
    )


def edges_of(image: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(costs, slots, slot_costs)`` of a float image, in scikit-image's edge order."""
    smooth = np.ascontiguousarray(fz.smoothed_image(image, sigma))
    height, width = smooth.shape[:2]
    slots = np.empty(4 * height * width - 3 * (height + width) + 2, dtype=np.uint32)
    costs, slot_costs = fz._edges(smooth, slots, fz._FIRST_DY, fz._FIRST_DX, fz._SECOND_DX)
    return costs, slots, slot_costs


def test_edge_costs_equal_numpy_expressions():
    image = skimage.util.img_as_float(photo("chelsea", 60))
    smooth = fz.smoothed_image(image, 0.9)

    def cost(a, b):
        return np.sqrt(np.sum((a - b) * (a - b), axis=-1)).ravel()

    expected = np.hstack(
        [
            cost(smooth[:, 1:], smooth[:, :-1]),  # right
            cost(smooth[1:], smooth[:-1]),  # down
            cost(smooth[1:, 1:], smooth[:-1, :-1]),  # down-right
            cost(smooth[1:, :-1], smooth[:-1, 1:]),  # up-right
        ]
    )
    costs, slots, slot_costs = edges_of(image, 0.9)
    np.testing.assert_array_equal(costs, expected)  # bit for bit
    np.testing.assert_array_equal(slot_costs[slots], costs)
    # Each slot's two ends are 8-neighbours.
    width = image.shape[1]
    first = slots.astype(np.int64) >> 2
    second = first + np.array([1, width, width + 1, width - 1])[slots & 3]
    assert np.all(np.abs(first // width - second // width) <= 1) and np.all(np.abs(first % width - second % width) <= 1)


def test_felzenszwalb_exact_order_fallback_matches_scikit_image():
    # The np.argsort path (taken when equal-cost edges could be order-sensitive) on its own.
    image = skimage.util.img_as_float(flat_blobs(11))
    height, width = image.shape[:2]
    costs, slots, _ = edges_of(image, 0.5)
    order = np.argsort(costs)
    labels, ok = fz._segment(slots[order], costs[order], height, width, 100 / 255, 20, False)
    assert ok
    expected = skimage.segmentation.felzenszwalb(image, scale=100, sigma=0.5, min_size=20)
    np.testing.assert_array_equal(labels.reshape(height, width), expected)


def test_felzenszwalb_detects_order_sensitive_ties():
    # A small segment between two large ones, joined to them by equal-cost edges: which one it
    # joins depends on the order of equal-cost edges, so the fast order must not be trusted.
    image = np.zeros((9, 9, 3))
    image[:, 5:] = 1.0
    image[4, 4] = 0.5  # equidistant from both sides
    costs, slots, slot_costs = edges_of(image, 0.0)
    ordered_slots, ordered_costs = fz._sort_slots(costs.astype(np.float32).view(np.uint32), slots, slot_costs)
    assert np.all(np.diff(ordered_costs) >= 0)
    _, ok = fz._segment(ordered_slots, ordered_costs, 9, 9, 0.01 / 255, 3, True)
    assert not ok
    expected = skimage.segmentation.felzenszwalb(image, scale=0.01, sigma=0.0, min_size=3)
    np.testing.assert_array_equal(fz.felzenszwalb(image, 0.01, 0.0, 3), expected)


def test_lbp_matches_scikit_image_bit_for_bit():
    for image in [photo("astronaut", 120), photo("rocket", 100), flat_blobs(2, 40, 50), np.zeros((3, 4, 3), np.uint8)]:
        floats = image.astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # LBP on floats, as the package does
            expected = np.stack(
                [skimage.feature.local_binary_pattern(floats[..., c], 8, 1.0) for c in range(3)], axis=-1
            )
        np.testing.assert_array_equal(lbp_codes(image), expected)


@pytest.mark.parametrize("bins", [10, 25])
def test_bin_tables_follow_numpy_histogram(bins):
    lut = _bin_lut(bins)
    for value in range(256):
        hist = np.histogram([float(value)], bins, (0.0, 255.0))[0]
        assert hist[lut[value]] == 1
    assert lut[0] == 0 and lut[255] == bins - 1


def test_region_details_are_consistent():
    image = photo("rocket", 120)
    regions = selective_search_regions(image)
    n = regions.num_segments
    assert regions.labels.shape == image.shape[:2]
    np.testing.assert_array_equal(np.bincount(regions.labels.ravel()), regions.sizes[:n])
    ys, xs = np.nonzero(regions.labels == 0)  # segment 0 starts at the first pixel
    assert (ys[0], xs[0]) == (0, 0)
    np.testing.assert_array_equal(regions.rects[0], [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()])


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        np.zeros((0, 10, 3), np.uint8),
    ],
)
def test_bad_input_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="selective search"):
        selective_search(bad)


def test_jit_falls_back_when_the_cache_is_unusable(monkeypatch):
    import numba

    from soco_det.proposals import _jit

    real_njit = numba.njit

    def njit_without_cache(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(_jit.numba, "njit", njit_without_cache)

    def add_one(x):
        return x + 1

    with pytest.warns(RuntimeWarning, match="cache unavailable"):
        compiled = _jit.njit(add_one)
    assert compiled(41) == 42
