"""Real photographs (scikit-image's bundled photos, saved as JPEG) with real selective-search
proposals in a real proposal store, built once per test process (~2 s at 200 px)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def save_photos(root: Path, side: int = 200) -> list[str]:
    """Write the photos under ``root`` (half of them in a sub-folder); returns relative paths."""
    import skimage.data
    from PIL import Image

    rels = []
    for i, name in enumerate(PHOTOS):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        scale = side / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.Resampling.BILINEAR)
        rel = f"sub/{name}.jpg" if i % 2 else f"{name}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / rel, quality=90)
        rels.append(rel)
    return rels


@functools.lru_cache(maxsize=1)
def photo_store() -> tuple[Path, Path]:
    """``(images_dir, store_dir)``: the photos and their proposal store (selective search)."""
    from soco_det.proposals import compute_store

    tmp = Path(tempfile.mkdtemp(prefix="soco_views_"))
    atexit.register(shutil.rmtree, tmp, True)
    save_photos(tmp / "images")
    compute_store(tmp / "images", tmp / "store", workers=1)
    return tmp / "images", tmp / "store"
