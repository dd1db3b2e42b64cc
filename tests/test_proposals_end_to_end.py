"""`soco-det proposals IMAGES -o STORE` with its defaults stores exactly what the official pipeline
gives: the slow reference selective search (PyPI selectivesearch 0.4 + SoCo's change, scale 300,
sigma 0.9, min_size 100, full resolution) on ``Image.open(path).convert("RGB")``, then the
``ratio3size0308post`` filter written out here rule by rule from docs/method.md 1.2-1.3."""

from __future__ import annotations

from math import sqrt
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from soco_det.commands.main import main
from soco_det.proposals.reference import reference_selective_search
from soco_det.proposals.store import ProposalStore


def official_post_filter(rects: np.ndarray, width: int, height: int) -> list[list[int]]:
    """ratio3size0308, and for an image it leaves empty: ratio3 alone, then min side alone."""

    def min_side(w, h):
        return w >= 32 and h >= 32

    def ratio(w, h):
        return min_side(w, h) and 1 / 3 <= w / h <= 3

    def ratio_size(w, h):
        return ratio(w, h) and 0.3 <= sqrt(w * h) / sqrt(width * height) <= 0.8

    for keep in (ratio_size, ratio, min_side):
        kept = [[int(v) for v in r] for r in rects if keep(int(r[2]), int(r[3]))]
        if kept:
            return kept
    return []


def write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    photos = {
        "cat.jpg": skimage.data.chelsea(),
        "coffee.png": skimage.data.coffee(),
        "rocket.jpg": skimage.data.rocket(),
    }
    for name, array in photos.items():
        img = Image.fromarray(array)
        img = img.resize((img.width * 150 // img.height, 150), Image.Resampling.BILINEAR)
        img.save(folder / name, quality=90) if name.endswith(".jpg") else img.save(folder / name)
    # One flat image: a single region covering it all, too large for the main filter (size ratio
    # ~1 > 0.8), so the post fallback (aspect ratio only) keeps it.
    Image.new("RGB", (90, 70), (40, 120, 200)).save(folder / "flat.png")
    return sorted(["cat.jpg", "coffee.png", "rocket.jpg", "flat.png"])


def test_store_built_with_paper_settings_equals_the_filtered_reference(tmp_path):
    pytest.importorskip("selectivesearch")
    images = tmp_path / "images"
    names = write_images(images)
    # the paper's settings (the CLI's default is --object-size auto)
    assert main(["proposals", str(images), "-o", str(tmp_path / "store"), "--object-size", "paper"]) == 0
    store = ProposalStore.open(tmp_path / "store")
    assert sorted(store.paths) == names
    stages = {}
    for name in names:
        i = store.index(name)
        assert store.status(i) == "ok"
        image = np.asarray(Image.open(images / name).convert("RGB"))
        h, w = image.shape[:2]
        assert store.size(i) == (w, h)
        expected = official_post_filter(reference_selective_search(image, scale=300, sigma=0.9, min_size=100), w, h)
        assert store.boxes(i).dtype == np.int32
        assert store.boxes(i).tolist() == expected, name  # same rects, same order
        stages[name] = store.stage(i)
    assert stages["flat.png"] == "ratio" and stages["cat.jpg"] == "main"
