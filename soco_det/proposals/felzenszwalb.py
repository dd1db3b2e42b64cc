"""Felzenszwalb-Huttenlocher segmentation, label-for-label identical to ``skimage.segmentation.felzenszwalb``.

Selective search spends most of its time here, so this is a faster re-implementation of
scikit-image's ``_felzenszwalb_cython`` (as of scikit-image 0.26; the tests compare the two) that
returns the *same label map*. It keeps scikit-image's Gaussian smoothing call and reproduces the rest exactly:

* edge costs: Euclidean RGB distance of the smoothed image over 8-connectivity, in scikit-image's
  edge order (right, down, down-right, up-right), computed with the same float operations;
* the greedy merge over edges sorted by cost, with scikit-image's threshold
  ``cost < min(float32(int_a + k/|a|), float32(int_b + k/|b|))`` (its inner costs are C ``float``),
  ``k = scale / 255``;
* the ``min_size`` post-pass over the same sorted edges;
* labels numbered by the smallest pixel index of each segment (scikit-image's union-find roots),
  i.e. in raster order of first appearance.

The only freedom is the order among *equal-cost* edges: scikit-image takes whatever ``np.argsort``
(an unstable sort) gives, we use a radix sort. That order provably cannot change the result while

1. every segment created while processing a group of equal-cost edges ``c`` keeps a threshold
   above ``c`` (true unless ``k/|segment|`` drowns in float32 rounding: images of tens of
   megapixels), and
2. in the ``min_size`` pass, the equal-cost edges that can still join something touch disjoint
   pairs of segments.

Both conditions are checked as the loops run; when one fails we redo the segmentation in
``np.argsort`` order, which is exactly scikit-image's computation.
"""

from __future__ import annotations

import numpy as np

from soco_det.proposals._jit import njit

__all__ = ["felzenszwalb"]


# An edge is identified by its "slot" ``4 * p + kind``: ``kind`` 0..3 = right, down, down-right,
# up-right (scikit-image's order), ``p`` the flat index of one end, the other end being
# ``p + (1, W, W + 1, W - 1)[kind]``. Per kind: offsets (dy, dx) of the pixel whose value comes
# first in scikit-image's difference, and of the second one, which is ``p``.
_FIRST_DY = np.array([0, 1, 1, 1])
_FIRST_DX = np.array([1, 0, 1, 0])
_SECOND_DX = np.array([0, 0, 0, 1])


@njit
def _edges(image, slots, first_dy, first_dx, second_dx):
    """Costs of the 8-connectivity edges of ``image`` ``[H, W, C]`` float64, in scikit-image's order.

    Also fills ``slots`` (``[E]`` uint32 or int64) with each edge's slot. Returns
    ``(costs [E] float64, slot_costs [4 * H * W] float64)``, the second indexed by slot (entries of
    border slots that are not edges stay 0 and are never read).
    """
    height, width, channels = image.shape
    slot_costs = np.zeros(4 * height * width, dtype=np.float64)
    costs = np.empty(slots.size, dtype=np.float64)
    k = 0
    for kind in range(4):
        dy1, dx1, dx2 = first_dy[kind], first_dx[kind], second_dx[kind]
        for y in range(height - (kind != 0)):
            for x in range(width - (kind != 1)):
                # numpy sums the squared differences over channels left to right; so do we.
                s = 0.0
                for ch in range(channels):
                    d = image[y + dy1, x + dx1, ch] - image[y, x + dx2, ch]
                    s += d * d
                cost = np.sqrt(s)
                slot = 4 * (y * width + x + dx2) + kind
                costs[k] = cost
                slots[k] = slot
                slot_costs[slot] = cost
                k += 1
    return costs, slot_costs


@njit
def _radix_sort32(keys, payload):
    """Sort uint32 ``keys`` ascending carrying ``payload``; LSD radix sort, two 16-bit passes."""
    n = keys.size
    counts = np.zeros((2, 65537), dtype=np.int64)
    for i in range(n):
        counts[0, (keys[i] & 0xFFFF) + 1] += 1
        counts[1, (keys[i] >> 16) + 1] += 1
    cur_keys = keys.copy()
    cur_payload = payload.copy()
    tmp_keys = np.empty_like(cur_keys)
    tmp_payload = np.empty_like(cur_payload)
    for p in range(2):
        count = counts[p]
        if count.max() == n:  # every key has the same digit here: the pass would change nothing
            continue
        for d in range(65536):
            count[d + 1] += count[d]
        shift = 16 * p
        for i in range(n):
            d = (cur_keys[i] >> shift) & 0xFFFF
            pos = count[d]
            count[d] = pos + 1
            tmp_keys[pos] = cur_keys[i]
            tmp_payload[pos] = cur_payload[i]
        cur_keys, tmp_keys = tmp_keys, cur_keys
        cur_payload, tmp_payload = tmp_payload, cur_payload
    return cur_keys, cur_payload


@njit
def _shell_sort(costs, payload, start, stop):
    """Sort ``costs[start:stop]`` ascending in place, moving ``payload`` along (Ciura gaps)."""
    for gap in (701, 301, 132, 57, 23, 10, 4, 1):
        for a in range(start + gap, stop):
            c, p = costs[a], payload[a]
            b = a
            while b - gap >= start and costs[b - gap] > c:
                costs[b] = costs[b - gap]
                payload[b] = payload[b - gap]
                b -= gap
            costs[b] = c
            payload[b] = p


@njit
def _sort_slots(keys, slots, slot_costs):
    """Slots ordered by non-decreasing cost, and their costs (ties in arbitrary order).

    ``keys`` are the bits of the float32 rounding of each slot's cost. Rounding is monotone, so
    after radix-sorting on them only runs of equal keys can be out of order; each such run is then
    sorted by the exact float64 cost.
    """
    n = slots.size
    sorted_keys, order = _radix_sort32(keys, slots)
    costs = np.empty(n, dtype=np.float64)
    for i in range(n):
        costs[i] = slot_costs[order[i]]
    i = 0
    while i < n:
        j = i + 1
        while j < n and sorted_keys[j] == sorted_keys[i]:
            j += 1
        if j - i > 1:
            in_order = True
            for a in range(i + 1, j):
                if costs[a] < costs[a - 1]:
                    in_order = False
                    break
            if not in_order:  # (a long run of zero costs is in order)
                _shell_sort(costs, order, i, j)
        i = j
    return order, costs


@njit
def _find(parent, p):
    """Root of ``p``, halving the path on the way (roots, the segment minima, never change)."""
    while parent[p] != p:
        grandparent = parent[parent[p]]
        parent[p] = grandparent
        p = grandparent
    return p


@njit
def _segment(slots, costs, height, width, k, min_size, check_ties):
    """Both greedy passes over the edges ``slots`` (see :func:`_edges`) of costs ``costs`` (sorted).

    Returns ``(labels [H*W] int64, ok)``; ``ok`` is False when ``check_ties`` found equal-cost edges
    whose order might matter (see the module docstring), in which case ``labels`` is meaningless.
    """
    n_pix = height * width
    parent = np.arange(n_pix)  # parent[p] <= p always: the smaller root wins every union
    size = np.ones(n_pix, dtype=np.int64)
    inner = np.zeros(n_pix, dtype=np.float64)
    n_edges = costs.size
    step = np.array([1, width, width + 1, width - 1], dtype=np.int64)

    # Edges that join nothing here and still separate two segments: the only ones the min_size
    # pass can act on (the others lie inside a segment for good), in the same sorted order.
    rejected = np.empty(n_edges, dtype=np.int64)
    n_rejected = 0
    for i in range(n_edges):
        p = np.int64(slots[i] >> 2)
        ra = _find(parent, p)
        rb = _find(parent, p + step[slots[i] & 3])
        if ra == rb:
            continue
        c = costs[i]
        # scikit-image stores the two thresholds in C floats (float32).
        t_a = np.float32(inner[ra] + k / size[ra])
        t_b = np.float32(inner[rb] + k / size[rb])
        if c < np.float64(min(t_a, t_b)):
            root, other = min(ra, rb), max(ra, rb)
            parent[other] = root
            size[root] = size[ra] + size[rb]
            inner[root] = c
            if check_ties and not (c < np.float64(np.float32(c + k / size[root]))):
                return parent, False
        else:
            rejected[n_rejected] = i
            n_rejected += 1

    # min_size pass over those edges, one group of equal costs at a time.
    n_small = 0
    for p in range(n_pix):
        if parent[p] == p and size[p] < min_size:
            n_small += 1
    mark = np.zeros(n_pix, dtype=np.int64)
    partner = np.zeros(n_pix, dtype=np.int64)
    a = 0
    while a < n_rejected and n_small > 0:  # joins only grow segments: none small, none to join
        b = a + 1
        c = costs[rejected[a]]
        while b < n_rejected and costs[rejected[b]] == c:
            b += 1
        if check_ties and b - a > 1:
            # Equal-cost edges that may join (one side small) must touch disjoint segment pairs.
            for q in range(a, b):
                e = rejected[q]
                p = np.int64(slots[e] >> 2)
                ra = _find(parent, p)
                rb = _find(parent, p + step[slots[e] & 3])
                if ra == rb or (size[ra] >= min_size and size[rb] >= min_size):
                    continue
                lo, hi = min(ra, rb), max(ra, rb)
                for r, other in ((lo, hi), (hi, lo)):
                    if mark[r] == a + 1:
                        if partner[r] != other:
                            return parent, False
                    else:
                        mark[r] = a + 1
                        partner[r] = other
        for q in range(a, b):
            e = rejected[q]
            p = np.int64(slots[e] >> 2)
            ra = _find(parent, p)
            rb = _find(parent, p + step[slots[e] & 3])
            if ra == rb:
                continue
            small_a = size[ra] < min_size
            small_b = size[rb] < min_size
            if small_a or small_b:
                root, other = min(ra, rb), max(ra, rb)
                parent[other] = root
                size[root] = size[ra] + size[rb]
                n_small -= small_a + small_b
                n_small += size[root] < min_size
        a = b

    # Number segments by their smallest pixel index (= raster order of first appearance).
    labels = np.empty(n_pix, dtype=np.int64)
    n_labels = 0
    for p in range(n_pix):
        root = _find(parent, p)
        if root == p:
            labels[p] = n_labels
            n_labels += 1
        else:
            labels[p] = labels[root]
    return labels, True


def smoothed_image(image: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's pre-smoothing: per-channel Gaussian, ``mode='reflect'``, on float64."""
    from skimage.filters import gaussian
    from skimage.util import img_as_float64

    image = img_as_float64(image)
    return gaussian(image, sigma=[sigma, sigma, 0], mode="reflect", channel_axis=-1)


def felzenszwalb(image: np.ndarray, scale: float = 1, sigma: float = 0.8, min_size: int = 20) -> np.ndarray:
    """Drop-in for ``skimage.segmentation.felzenszwalb(image, scale, sigma, min_size)`` (channels last).

    Args:
        image: ``[H, W, C]`` or ``[H, W]`` image; converted with ``img_as_float64`` like scikit-image.
        scale: higher means larger segments.
        sigma: Gaussian pre-smoothing width (pixels).
        min_size: minimum segment size, enforced by a post-pass.

    Returns:
        ``[H, W]`` int64 labels ``0..n-1``, numbered in raster order of first appearance;
        identical to scikit-image's output.
    """
    image = np.atleast_3d(np.asarray(image))
    smooth = np.ascontiguousarray(smoothed_image(image, sigma), dtype=np.float64)
    height, width = smooth.shape[:2]
    k = float(scale) / 255.0
    n_edges = 4 * height * width - 3 * (height + width) + 2
    slots = np.empty(n_edges, dtype=np.uint32 if 4 * height * width < 2**32 else np.int64)
    costs, slot_costs = _edges(smooth, slots, _FIRST_DY, _FIRST_DX, _SECOND_DX)
    # Costs are >= +0.0, so the bit patterns of their float32 roundings sort like the values.
    keys = costs.astype(np.float32).view(np.uint32)
    ordered_slots, ordered_costs = _sort_slots(keys, slots, slot_costs)
    labels, ok = _segment(ordered_slots, ordered_costs, height, width, k, int(min_size), True)
    if not ok:
        # Equal-cost edges whose order matters: follow scikit-image's own (np.argsort) order.
        order = np.argsort(costs)
        labels, _ = _segment(slots[order], costs[order], height, width, k, int(min_size), False)
    return labels.reshape(height, width)
