"""Fast selective search that returns exactly the official SoCo proposals.

The official SoCo code runs a slightly modified copy of AlpacaDB's ``selectivesearch`` 0.4
(docs/method.md 1.1; the slow original is :mod:`soco_det.proposals.reference`). This module computes the
*same rect list in the same order*, quirks included, one to two orders of magnitude faster:

* segmentation: Felzenszwalb on ``img_as_float(image)``, via
  :func:`soco_det.proposals.felzenszwalb.felzenszwalb` (label-for-label identical to scikit-image's);
* one pass over the pixels gives every segment's bounding box, size and histograms:

  - colour: 25 bins per HSV channel over ``(0, 255)``. scikit-image's hue and saturation lie in
    ``[0, 1]``, below the first bin edge (10.2), so those two histograms are always
    ``[1, 0, ..., 0]``; value is ``max(R, G, B)`` of the 0..255 pixels.
  - texture: the 8-point, radius-1 LBP code of each RGB channel (bit-exact copy of
    ``skimage.feature.local_binary_pattern(channel, 8, 1.0)``), 10 bins per channel over
    ``(0, 255)`` (the SoCo change to 0.4);

  bins follow ``np.histogram``'s edges exactly (lookup tables built with ``np.histogram``);
* neighbours: the package's corner test -- a pair ``(a, b)``, ``a`` before ``b`` in region order, is
  adjacent when a corner of ``b``'s box lies strictly inside ``a``'s box (one direction only);
* greedy grouping with a heap: the package takes the pair of highest similarity, ties going to the
  pair inserted last, merges it into a new region (size-weighted histogram average), drops every
  pair touching the two parts and pairs the new region with each of their former partners, in the
  order those pairs had been inserted. Similarities are computed with the same float64 operations
  in the same order, so they are bit-identical and the merge sequence is the package's.

Region order, as in the package: the Felzenszwalb segments in raster order of first appearance,
then one region per merge. There is no de-duplication, and the ``size = len(masked_pixels / 4)``
line of the package is simply the pixel count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from soco_det.proposals._jit import njit
from soco_det.proposals.felzenszwalb import felzenszwalb

__all__ = [
    "SelectiveSearchRegions",
    "group_regions",
    "segment",
    "selective_search",
    "selective_search_regions",
    "warm_up",
]

COLOUR_BINS = 25
TEXTURE_BINS = 10
LBP_POINTS = 8
LBP_RADIUS = 1.0


class SelectiveSearchRegions(NamedTuple):
    """Every region of one selective-search run, in region order.

    rects: ``[N, 4]`` int32 ``(x, y, w, h)``, ``w = max_x - min_x``, ``h = max_y - min_y`` (inclusive
        pixel indices: the region spans ``w + 1`` columns).
    sizes: ``[N]`` int64 pixel counts.
    num_segments: number of Felzenszwalb segments (the first ``num_segments`` rows).
    labels: ``[H, W]`` int64 segment index of each pixel (row of ``rects``), raster order.
    """

    rects: np.ndarray
    sizes: np.ndarray
    num_segments: int
    labels: np.ndarray


@functools.lru_cache(maxsize=None)
def _bin_lut(bins: int) -> np.ndarray:
    """Bin index of each integer value 0..255 under ``np.histogram(v, bins, (0.0, 255.0))``."""
    lut = np.empty(256, dtype=np.int64)
    for value in range(256):
        lut[value] = int(np.argmax(np.histogram([float(value)], bins, (0.0, 255.0))[0]))
    return lut


@functools.lru_cache(maxsize=None)
def _lbp_offsets() -> tuple[np.ndarray, np.ndarray]:
    """Sampling offsets (rows, cols) of scikit-image's LBP: the circle rounded to 5 decimals."""
    angles = 2 * np.pi * np.arange(LBP_POINTS, dtype=np.float64) / LBP_POINTS
    return np.round(-LBP_RADIUS * np.sin(angles), 5), np.round(LBP_RADIUS * np.cos(angles), 5)


def _lbp_weights(length: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer floor and fractional part of ``i + offset`` for ``i = 0..length-1``.

    scikit-image computes the position ``i + offset`` in float64 and interpolates with
    ``d = position - floor(position)``; ``d`` depends (in its last bits) on ``i``, so it is
    tabulated per row / column rather than taken as ``offset - floor(offset)``.
    """
    position = np.arange(length, dtype=np.int64) + offset
    low = np.floor(position)
    return low.astype(np.int64), position - low


@njit
def _lbp_planes_kernel(padded, col_shift, col_frac, col_whole, row_low, row_frac, exact):
    """LBP codes of the zero-padded channels ``padded`` ``[C, H+2, W+2]`` float64, as ``[C, H, W]`` uint8.

    Sample ``i`` of pixel (r, c) lies at padded row ``row_low[i, r] + 1`` (+ 1 more with weight
    ``row_frac[i, r]``) and padded column ``c + col_shift[i] + 1`` (+ 1 more with weight
    ``col_frac[i, c]``, never 0 unless ``col_whole[i]``). ``exact[i]`` marks samples at integer
    offsets, read directly: that is what scikit-image's interpolation gives for zero weights,
    ``(1 - 0) * a + 0 * b == a``.
    """
    channels = padded.shape[0]
    height = padded.shape[1] - 2
    width = padded.shape[2] - 2
    out = np.zeros((channels, height, width), dtype=np.uint8)
    for ch in range(channels):
        img = padded[ch]
        codes = out[ch]
        for i in range(row_low.shape[0]):
            bit = np.uint8(1 << i)
            shift = col_shift[i] + 1
            for r in range(height):
                centre = img[r + 1, 1:]
                row = codes[r]
                r0 = row_low[i, r] + 1
                if exact[i]:
                    src = img[r0, shift:]
                    for c in range(width):
                        row[c] |= bit * np.uint8(src[c] - centre[c] >= 0)
                else:
                    dr = row_frac[i, r]
                    r1 = r0 + (1 if dr != 0 else 0)  # ceil(): the same row when the position is whole
                    dcs = col_frac[i]
                    # ceil() of the column: the next one, or the same where the position is whole.
                    step = 1 if col_whole[i] == 0 else 0
                    top_left = img[r0, shift:]
                    top_right = img[r0, shift + step :]
                    bottom_left = img[r1, shift:]
                    bottom_right = img[r1, shift + step :]
                    for c in range(width):
                        dc = dcs[c]
                        top = (1 - dc) * top_left[c] + dc * top_right[c]
                        bottom = (1 - dc) * bottom_left[c] + dc * bottom_right[c]
                        row[c] |= bit * np.uint8((1 - dr) * top + dr * bottom - centre[c] >= 0)
    return out


def _lbp_planes(image: np.ndarray) -> np.ndarray:
    """:func:`lbp_codes` as ``[C, H, W]`` uint8 planes."""
    height, width = image.shape[:2]
    rp, cp = _lbp_offsets()
    rows = [_lbp_weights(height, offset) for offset in rp]
    cols = [_lbp_weights(width, offset) for offset in cp]
    col_shift = np.array([low[0] for low, _ in cols], dtype=np.int64)
    # floor(c + offset) - c, and whether c + offset is whole, are the same for every column of any
    # image we can hold in memory; the kernel relies on it.
    assert all(np.array_equal(low - np.arange(width), np.full(width, low[0])) for low, _ in cols)
    col_whole = np.array([np.all(frac == 0) for _, frac in cols])
    assert all(whole or np.all(frac != 0) for whole, (_, frac) in zip(col_whole, cols))
    padded = np.zeros((image.shape[2], height + 2, width + 2), dtype=np.float64)
    padded[:, 1:-1, 1:-1] = np.moveaxis(image, 2, 0)
    return _lbp_planes_kernel(
        padded,
        col_shift,
        np.stack([frac for _, frac in cols]),
        col_whole,
        np.stack([low for low, _ in rows]),
        np.stack([frac for _, frac in rows]),
        np.array([r == np.round(r) and c == np.round(c) for r, c in zip(rp, cp)]),
    )


def lbp_codes(image: np.ndarray) -> np.ndarray:
    """``skimage.feature.local_binary_pattern(image[..., ch], 8, 1.0)`` per channel, bit-exact.

    Args:
        image: ``[H, W, C]`` uint8.

    Returns:
        ``[H, W, C]`` uint8 LBP codes (method ``'default'``; outside pixels read as 0 like scikit-image's
        constant mode). The diagonal samples are bilinearly interpolated with scikit-image's float
        operations, so ties with the centre value resolve identically.
    """
    return np.moveaxis(_lbp_planes(image), 0, 2)


@njit
def _region_stats(labels, image, lbp, colour_lut, texture_lut, n_colour, n_texture):
    """Boxes, sizes and histograms of each segment, segments renumbered in raster order.

    Returns ``(position [n_labels], min_x, min_y, max_x, max_y, size, hist_c, hist_t)``; rows follow
    the raster order of first appearance; ``hist_c`` is ``[n, 3 * n_colour]`` and ``hist_t``
    ``[n, 3 * n_texture]`` float64, each channel's block L1-normalised as in the package.
    """
    height, width = labels.shape
    n_labels = labels.max() + 1
    position = np.full(n_labels, -1, dtype=np.int64)
    min_x = np.empty(n_labels, dtype=np.int64)
    min_y = np.empty(n_labels, dtype=np.int64)
    max_x = np.empty(n_labels, dtype=np.int64)
    max_y = np.empty(n_labels, dtype=np.int64)
    size = np.zeros(n_labels, dtype=np.int64)
    count_v = np.zeros((n_labels, n_colour), dtype=np.int64)
    count_t = np.zeros((n_labels, 3 * n_texture), dtype=np.int64)
    n = 0
    for y in range(height):
        for x in range(width):
            label = labels[y, x]
            k = position[label]
            if k < 0:
                k = n
                position[label] = k
                min_x[k] = x
                min_y[k] = y
                max_x[k] = x
                max_y[k] = y
                n += 1
            else:
                min_x[k] = min(min_x[k], x)
                max_x[k] = max(max_x[k], x)
                max_y[k] = y  # rows are visited in increasing order
            size[k] += 1
            # HSV value = max(R, G, B); 0..255 and the LBP codes all lie inside (0, 255).
            count_v[k, colour_lut[max(image[y, x, 0], image[y, x, 1], image[y, x, 2])]] += 1
            for ch in range(3):
                count_t[k, ch * n_texture + texture_lut[lbp[ch, y, x]]] += 1
    hist_c = np.zeros((n, 3 * n_colour), dtype=np.float64)
    hist_t = np.zeros((n, 3 * n_texture), dtype=np.float64)
    for k in range(n):
        # Hue and saturation (in [0, 1]) all fall into the first bin of (0, 255).
        hist_c[k, 0] = size[k] / size[k]
        hist_c[k, n_colour] = size[k] / size[k]
        for b in range(n_colour):
            hist_c[k, 2 * n_colour + b] = count_v[k, b] / size[k]
        for b in range(3 * n_texture):
            hist_t[k, b] = count_t[k, b] / size[k]
    return position, min_x[:n], min_y[:n], max_x[:n], max_y[:n], size[:n], hist_c, hist_t


@njit
def _similarity(p, q, min_x, min_y, max_x, max_y, size, hist_c, hist_t, imsize):
    """The package's ``_calc_sim``: same operands, same left-to-right float64 sums."""
    colour = 0.0
    for k in range(hist_c.shape[1]):
        colour += min(hist_c[p, k], hist_c[q, k])
    texture = 0.0
    for k in range(hist_t.shape[1]):
        texture += min(hist_t[p, k], hist_t[q, k])
    sim_size = 1.0 - (size[p] + size[q]) / imsize
    bbsize = (max(max_x[p], max_x[q]) - min(min_x[p], min_x[q])) * (max(max_y[p], max_y[q]) - min(min_y[p], min_y[q]))
    sim_fill = 1.0 - (bbsize - size[p] - size[q]) / imsize
    return colour + texture + sim_size + sim_fill


@njit
def _corner_inside(a, b, min_x, min_y, max_x, max_y):
    """The package's neighbour test: a corner of ``b``'s box strictly inside ``a``'s box."""
    in_x_min = min_x[a] < min_x[b] < max_x[a]
    in_x_max = min_x[a] < max_x[b] < max_x[a]
    in_y_min = min_y[a] < min_y[b] < max_y[a]
    in_y_max = min_y[a] < max_y[b] < max_y[a]
    return (in_x_min and in_y_min) or (in_x_max and in_y_max) or (in_x_min and in_y_max) or (in_x_max and in_y_min)


@njit
def _before(e, f, sim):
    """Heap order: higher similarity first; among equal ones the later-inserted pair (the package's
    stable sort puts it last, and it takes the last)."""
    return sim[e] > sim[f] or (sim[e] == sim[f] and e > f)


@njit
def _heap_push(heap, n_heap, e, sim):
    i = n_heap
    heap[i] = e
    while i > 0:
        parent = (i - 1) // 2
        if not _before(heap[i], heap[parent], sim):
            break
        heap[i], heap[parent] = heap[parent], heap[i]
        i = parent
    return n_heap + 1


@njit
def _heap_pop(heap, n_heap, sim):
    top = heap[0]
    n_heap -= 1
    heap[0] = heap[n_heap]
    i = 0
    while True:
        best = i
        for child in (2 * i + 1, 2 * i + 2):
            if child < n_heap and _before(heap[child], heap[best], sim):
                best = child
        if best == i:
            break
        heap[i], heap[best] = heap[best], heap[i]
        i = best
    return top, n_heap


@njit
def _grown(array, capacity):
    """``array`` (1-D) copied into a longer one."""
    out = np.empty(capacity, dtype=array.dtype)
    for i in range(array.size):  # a loop compiles much faster than slice assignment
        out[i] = array[i]
    return out


@njit
def _group(min_x0, min_y0, max_x0, max_y0, size0, hist_c0, hist_t0, imsize):
    """The package's hierarchical grouping; returns ``(min_x, min_y, max_x, max_y, size)`` of all regions.

    Pairs ("entries") are numbered in insertion order. The package's dict of similarities is the set
    of entries whose two regions are both alive, in entry order; each region keeps the list of its
    entries (in entry order, linked through ``next_of_first`` / ``next_of_second``) to rebuild its
    neighbourhood on merging.
    """
    n = size0.size
    cap = max(2 * n - 1, 1)
    min_x = _grown(min_x0, cap)
    min_y = _grown(min_y0, cap)
    max_x = _grown(max_x0, cap)
    max_y = _grown(max_y0, cap)
    size = _grown(size0, cap)
    hist_c = np.empty((cap, hist_c0.shape[1]))
    hist_t = np.empty((cap, hist_t0.shape[1]))
    for r in range(n):  # loops: they compile much faster than slice assignments
        for q in range(hist_c.shape[1]):
            hist_c[r, q] = hist_c0[r, q]
        for q in range(hist_t.shape[1]):
            hist_t[r, q] = hist_t0[r, q]
    alive = np.zeros(cap, dtype=np.bool_)
    head = np.empty(cap, dtype=np.int64)  # first / last entry of each region, -1: none yet
    tail = np.empty(cap, dtype=np.int64)
    seen = np.empty(cap, dtype=np.int64)  # last new region that region was paired with
    for r in range(cap):
        alive[r] = r < n
        head[r] = -1
        tail[r] = -1
        seen[r] = -1

    e_cap = 64
    first = np.empty(e_cap, dtype=np.int64)
    second = np.empty(e_cap, dtype=np.int64)
    sim = np.empty(e_cap, dtype=np.float64)
    # Next entry in the list of the entry's first / second region.
    next_of_first = np.empty(e_cap, dtype=np.int64)
    next_of_second = np.empty(e_cap, dtype=np.int64)
    heap = np.empty(e_cap, dtype=np.int64)
    n_entries = 0
    n_heap = 0

    # Initial pairs in the package's enumeration order, then the merge loop; one code path adds
    # entries for both (``todo`` holds the partners of the region ``a`` being paired).
    todo = np.empty(cap, dtype=np.int64)
    n_regions = n
    a = 0
    while True:
        n_todo = 0
        if a < n - 1:  # initial neighbours of segment a
            pair_first = a
            for b in range(a + 1, n):
                if _corner_inside(a, b, min_x, min_y, max_x, max_y):
                    todo[n_todo] = b
                    n_todo += 1
            a += 1
        else:  # merge the best pair into a new region
            found = False
            while n_heap > 0:
                e, n_heap = _heap_pop(heap, n_heap, sim)
                if alive[first[e]] and alive[second[e]]:
                    found = True
                    break
            if not found:
                break
            i, j = first[e], second[e]
            t = n_regions
            n_regions += 1
            min_x[t] = min(min_x[i], min_x[j])
            min_y[t] = min(min_y[i], min_y[j])
            max_x[t] = max(max_x[i], max_x[j])
            max_y[t] = max(max_y[i], max_y[j])
            size[t] = size[i] + size[j]
            for k in range(hist_c.shape[1]):
                hist_c[t, k] = (hist_c[i, k] * size[i] + hist_c[j, k] * size[j]) / size[t]
            for k in range(hist_t.shape[1]):
                hist_t[t, k] = (hist_t[i, k] * size[i] + hist_t[j, k] * size[j]) / size[t]
            alive[i] = False
            alive[j] = False
            alive[t] = True
            # Former partners of i and j, walking both entry lists in entry (= dict) order.
            ei, ej = head[i], head[j]
            while ei != -1 or ej != -1:
                if ej == -1 or (ei != -1 and ei < ej):
                    cur, owner = ei, i
                    ei = next_of_first[ei] if first[ei] == i else next_of_second[ei]
                else:
                    cur, owner = ej, j
                    ej = next_of_first[ej] if first[ej] == j else next_of_second[ej]
                other = second[cur] if first[cur] == owner else first[cur]
                if alive[other] and seen[other] != t:  # dead partners (incl. i, j) left the dict
                    seen[other] = t
                    todo[n_todo] = other
                    n_todo += 1
            pair_first = t
        # Add entries (pair_first, todo[...]) in order.
        if n_entries + n_todo > e_cap:
            e_cap = max(2 * e_cap, n_entries + n_todo)
            first = _grown(first, e_cap)
            second = _grown(second, e_cap)
            sim = _grown(sim, e_cap)
            next_of_first = _grown(next_of_first, e_cap)
            next_of_second = _grown(next_of_second, e_cap)
            heap = _grown(heap, e_cap)
        for q in range(n_todo):
            e = n_entries
            n_entries += 1
            p, other = pair_first, todo[q]
            first[e] = p
            second[e] = other
            sim[e] = _similarity(p, other, min_x, min_y, max_x, max_y, size, hist_c, hist_t, imsize)
            next_of_first[e] = -1
            next_of_second[e] = -1
            for r in (p, other):
                last = tail[r]
                if last == -1:
                    head[r] = e
                elif first[last] == r:
                    next_of_first[last] = e
                else:
                    next_of_second[last] = e
                tail[r] = e
            n_heap = _heap_push(heap, n_heap, e, sim)
    return min_x[:n_regions], min_y[:n_regions], max_x[:n_regions], max_y[:n_regions], size[:n_regions]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"selective search expects an [H, W, 3] uint8 RGB image, got shape {image.shape} dtype {image.dtype}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"selective search got an empty image of shape {image.shape}")
    return np.ascontiguousarray(image)


def segment(image: np.ndarray, scale: float = 300.0, sigma: float = 0.9, min_size: int = 100) -> np.ndarray:
    """The package's initial segmentation: Felzenszwalb on ``img_as_float(image)``.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.

    Returns:
        ``[H, W]`` int64 labels ``0..n-1`` in raster order of first appearance.
    """
    from skimage.util import img_as_float

    image = _check_image(image)
    return felzenszwalb(img_as_float(image), scale=scale, sigma=sigma, min_size=min_size)


def group_regions(image: np.ndarray, labels: np.ndarray) -> SelectiveSearchRegions:
    """Hierarchical grouping of the segments ``labels`` (``[H, W]`` ints) of ``image`` (``[H, W, 3]`` uint8)."""
    image = _check_image(image)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match image shape {image.shape[:2]}")
    lbp = _lbp_planes(image)
    position, *stats = _region_stats(
        labels, image, lbp, _bin_lut(COLOUR_BINS), _bin_lut(TEXTURE_BINS), COLOUR_BINS, TEXTURE_BINS
    )
    num_segments = stats[0].size
    imsize = image.shape[0] * image.shape[1]
    min_x, min_y, max_x, max_y, size = _group(*stats, imsize)
    rects = np.stack([min_x, min_y, max_x - min_x, max_y - min_y], axis=1).astype(np.int32)
    return SelectiveSearchRegions(rects, size.astype(np.int64), num_segments, position[labels])


def selective_search_regions(
    image: np.ndarray, scale: float = 300.0, sigma: float = 0.9, min_size: int = 100
) -> SelectiveSearchRegions:
    """Selective search with every region's rect and size, the segment count and the label map.

    See :func:`selective_search` for the arguments.
    """
    return group_regions(image, segment(image, scale=scale, sigma=sigma, min_size=min_size))


def selective_search(image: np.ndarray, scale: float = 300.0, sigma: float = 0.9, min_size: int = 100) -> np.ndarray:
    """SoCo's selective search (docs/method.md 1.1), identical output to the official code, fast.

    Args:
        image: ``[H, W, 3]`` uint8 RGB image, full resolution (the official proposals were computed
            on the original images without resizing).
        scale, sigma, min_size: Felzenszwalb parameters. The defaults (300, 0.9, 100) are those SoCo
            used, not the ``selectivesearch`` package's own (1.0, 0.8, 50).

    Returns:
        ``[N, 4]`` int32 rects ``(x, y, w, h)`` with ``w = max_x - min_x`` and ``h = max_y - min_y``
        (inclusive pixel indices: the true extent is ``w + 1`` pixels), unfiltered, in the official
        order: Felzenszwalb segments in raster order of first appearance, then merged regions in
        merge order. ``N = 2 * num_segments - 1`` when every segment ends up grouped; duplicates are
        kept.
    """
    return selective_search_regions(image, scale=scale, sigma=sigma, min_size=min_size).rects


def warm_up() -> None:
    """Compile (first run after install, ~10-20 s) or load from numba's cache (~1 s) every kernel.

    Call it once in a parent process before starting workers, so that a fresh install does not
    compile in every worker at the same time.
    """
    selective_search(np.zeros((8, 8, 3), dtype=np.uint8), min_size=1)
