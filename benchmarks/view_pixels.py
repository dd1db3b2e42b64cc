"""How far our views' pixels are from the official crop-then-resize, and what each shortcut adds.

The official dataset (torchvision v1 ``RandomResizedCrop``) decodes the whole image, crops it and
resizes the crop: ``img.crop(box).resize(size, BILINEAR)``. Our sampler resizes straight from the
decoded image (``Image.resize(size, BILINEAR, box=box)``, or the numba kernel with PIL's
arithmetic), so the bilinear filter at a view's border reads the pixels just outside the crop
instead of repeating the crop's edge; and with ``data.decode_reducing_gap=2.0`` (default) a JPEG
much larger than its views is decoded at 1/2..1/8 scale. This script draws the same crops and flips
for every variant (same seeds) and compares the uint8 views (before any colour change)::

    python benchmarks/view_pixels.py [--samples 20] [--sizes 1 2]

``--sizes``: scale factors of the bundled scikit-image photos (1: ~300-640 px, ImageNet-like;
2: ~600-1280 px, where reduced decoding starts to apply). Prints, per comparison, the mean absolute
difference in uint8 levels, the share of differing values, the 99.9th percentile, the maximum, and
the maximum inside the views' outermost 1-px ring.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soco_det.data.config import PixelOptions, ViewsConfig  # noqa: E402
from soco_det.data.lazy_image import LazyImage  # noqa: E402
from soco_det.data.sampler import ViewSampler  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def official_views(img: Image.Image, sample, cfg: ViewsConfig) -> list[np.ndarray]:
    """crop, then resize, then flip (``down:m``: view m's resized crop resized again)."""
    c = cfg.resolved()
    resized = []
    for v, kind in enumerate(c.geometry.view_kinds):
        size = (c.geometry.view_sizes[v],) * 2
        if kind.startswith("down:"):
            resized.append(resized[int(kind.split(":")[1])].resize(size, Image.Resampling.BILINEAR))
            continue
        top, left, h, w = sample.crops[v]
        resized.append(img.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BILINEAR))
    out = []
    for v, view in enumerate(resized):
        arr = np.asarray(view)
        out.append(arr[:, ::-1] if sample.flips[v] else arr)
    return out


def as_hwc(view) -> np.ndarray:
    return view.numpy().transpose(1, 2, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20, help="samples per photo")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.0], help="photo scale factors")
    parser.add_argument("--recipe", default="soco_fpn")
    args = parser.parse_args(argv)
    cfg = ViewsConfig(recipe=args.recipe)
    variants = {  # name: (decode_reducing_gap, resize_backend)
        "resize(box=), PIL, full decode": (None, "pil"),
        "resize(box=), numba, full decode": (None, "numba"),
        "default: numba, decode_reducing_gap=2": (2.0, "numba"),
    }
    samplers = {
        name: ViewSampler(cfg, PixelOptions(decode_reducing_gap=gap, photometric="device", resize_backend=backend))
        for name, (gap, backend) in variants.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.sizes:
            diffs: dict[str, list[np.ndarray]] = {name: [] for name in variants}
            inner: dict[str, list[int]] = {name: [] for name in variants}  # max |diff| inside the 1-px border
            reduced = 0
            for p, name in enumerate(PHOTOS):
                photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
                photo = photo.resize(
                    (round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS
                )
                path = Path(tmp) / f"{name}_{scale}.jpg"
                photo.save(path, quality=90)
                full = Image.open(path).convert("RGB")
                w, h = full.size
                g = np.random.default_rng(p)
                rects = np.stack(
                    [
                        g.integers(0, w // 2, 30),
                        g.integers(0, h // 2, 30),
                        g.integers(16, w // 2, 30),
                        g.integers(16, h // 2, 30),
                    ],
                    1,
                ).astype(np.int32)
                for s in range(args.samples):
                    outs = {
                        n: smp(LazyImage(path), rects, np.random.default_rng([p, s])) for n, smp in samplers.items()
                    }
                    first = next(iter(outs.values()))
                    assert all(o.crops == first.crops and o.flips == first.flips for o in outs.values())
                    ref = official_views(full, first, cfg)
                    for n, o in outs.items():
                        d = [np.abs(as_hwc(a).astype(np.int16) - b.astype(np.int16)) for a, b in zip(o.images, ref)]
                        diffs[n] += [x.ravel() for x in d]
                        inner[n] += [int(x[1:-1, 1:-1].max()) for x in d]
                    mean_default = np.mean(
                        [
                            np.abs(as_hwc(a).astype(np.int16) - as_hwc(b).astype(np.int16)).mean()
                            for a, b in zip(
                                outs["default: numba, decode_reducing_gap=2"].images,
                                outs["resize(box=), numba, full decode"].images,
                            )
                        ]
                    )
                    reduced += bool(mean_default > 0)
            total = len(PHOTOS) * args.samples
            print(f"\nphotos x{scale:g} ({args.recipe}, {total} samples; reduced decoding used in {reduced}):")
            print(
                "  against the official crop-then-resize | mean |diff| | share differing | p99.9 | max | max inside the border"
            )
            for n, d in diffs.items():
                d = np.concatenate(d)
                print(
                    f"  {n:38s} | {d.mean():.3f} | {(d > 0).mean():.3f} | {np.percentile(d, 99.9):.0f} | {d.max()}"
                    f" | {max(inner[n])}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
