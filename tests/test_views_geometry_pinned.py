"""The view sampler's geometry and random draws are pinned: for fixed image sizes, proposal sets and
seeds, every recipe (and the legacy conventions, the mirrored cutout, the whole-image fallback) gives
exactly the crops, flips, boxes, ids, levels, padding, cutout regions and
photometric parameters recorded in ``tests/data/views_geometry_pinned.npz``.

The recording was made with the sampler as it was before its speed work (commit e4f2822's
``soco_det/data``), so speed changes cannot silently change a sample. Regenerate it only for an
intended change of semantics: ``python tests/test_views_geometry_pinned.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soco_det.data.config import PixelOptions, ViewsConfig
from soco_det.data.sampler import ViewSampler

DATA = Path(__file__).parent / "data" / "views_geometry_pinned.npz"
SEEDS = range(5)
CASES = {
    "fpn": dict(recipe="soco_fpn"),
    "fpn_legacy": dict(recipe="soco_fpn", legacy=True),
    "fpn_mirrored": dict(recipe="soco_fpn", cutout_mirrored=True, legacy=True),
    "star": dict(recipe="soco_star"),
    "c4": dict(recipe="soco_c4"),
    "paper": dict(recipe="paper"),
    "fpn_400_k8": dict(recipe="soco_fpn_400", padding_k=8, select_k=6),
}
SIZES = {"wide": (500, 375), "tall": (203, 311)}


def _rect_sets(width: int, height: int) -> dict[str, np.ndarray]:
    """Store-convention rects ``int32 [n, 4]`` (x, y, w, h): many, two small ones, none."""
    g = np.random.default_rng([width, height])
    x = g.integers(0, width - 8, 60)
    y = g.integers(0, height - 8, 60)
    w = np.minimum(g.integers(4, width // 2, 60), width - 1 - x)
    h = np.minimum(g.integers(4, height // 2, 60), height - 1 - y)
    many = np.stack([x, y, w, h], axis=1).astype(np.int32)
    few = np.array([[2, 3, 10, 12], [width - 20, height - 15, 15, 10]], dtype=np.int32)
    return {"many": many, "few": few, "none": np.zeros((0, 4), np.int32)}


def _flatten(sample) -> np.ndarray:
    """Every geometric output of a sample as one float64 vector (ints and float32 are exact)."""
    parts: list[np.ndarray] = [np.asarray(sample.crops, np.float64).ravel(), np.asarray(sample.flips, np.float64)]
    for p in range(len(sample.pairs)):
        (ba, bb), (ia, ib), (la, lb) = sample.boxes[p], sample.ids[p], sample.levels[p]
        # corr is a function of ids and levels alone (collate_views), so pinning those pins it
        parts += [np.asarray(a, np.float64).ravel() for a in (ba, bb, ia, ib, la, lb)]
        parts.append(np.asarray(sample.padded[p], np.float64))
        parts.append(np.asarray([sample.fallback[p]], np.float64))
    for v in range(len(sample.images)):
        parts.append(np.asarray(sample.cutouts[v], np.float64).ravel())
        parts.append(np.asarray(sample.params[v], np.float64).ravel())
        parts.append(np.asarray(sample.images[v].shape, np.float64))
    parts.append(np.asarray([sample.tries, sample.num_proposals, *sample.image_size], np.float64))
    return np.concatenate(parts)


def compute(case: str, size: str, rects: str, photometric: str = "device") -> np.ndarray:
    """All samples of one case as one float64 vector, each prefixed by its length."""
    width, height = SIZES[size]
    cfg = ViewsConfig(**CASES[case])
    sampler = ViewSampler(cfg, PixelOptions(photometric=photometric))
    img = Image.new("RGB", (width, height), (90, 140, 200))
    out = []
    for seed in SEEDS:
        vec = _flatten(sampler(img, _rect_sets(width, height)[rects], np.random.default_rng([seed, 7])))
        out += [np.array([len(vec)], np.float64), vec]
    return np.concatenate(out)


def _keys():
    return [(c, s, r) for c in CASES for s in SIZES for r in ("many", "few", "none")]


@pytest.fixture(scope="module")
def pinned():
    with np.load(DATA) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("case", list(CASES))
def test_geometry_equals_pinned_recording(pinned, case):
    for c, s, r in _keys():
        if c == case:
            np.testing.assert_array_equal(compute(c, s, r), pinned[f"{c}/{s}/{r}"], err_msg=f"{c}/{s}/{r}")


def test_cpu_path_draws_the_same_geometry(pinned):
    """The CPU photometric path consumes the generator exactly like the device path."""
    np.testing.assert_array_equal(compute("fpn", "wide", "many", photometric="cpu"), pinned["fpn/wide/many"])


if __name__ == "__main__":
    DATA.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(DATA, **{f"{c}/{s}/{r}": compute(c, s, r) for c, s, r in _keys()})
    print(f"wrote {DATA} ({DATA.stat().st_size} bytes)")
    sys.exit(0)
