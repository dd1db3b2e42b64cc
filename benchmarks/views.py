"""Throughput of the view sampler: samples/s on one core, against a naive re-implementation of the
official dataset's ``__getitem__`` (FPN-100ep, ``ImageAsymBboxAwareMultiJitter1Cutout``: PIL ops,
per-box Python loops, torchvision v1 transforms composed as the official code does) on the same
images in the same run, plus a DataLoader run (N workers, batch 64).

    python benchmarks/views.py --images DIR --proposals STORE --recipe soco_fpn --samples 200 \
        [--workers 2] [--json out.json] [--stages]

Measured in the same run, on the same images, one thread: the naive official baseline, our default
CPU path (``data.photometric: cpu``), the CPU part of the device path (``data.photometric: device``:
decode, crop/resize, flips, geometry and parameter draws; uint8 views out), and the throughput of
:func:`soco_det.data.device_photometric.apply_device_photometric` on batches of CPU tensors (and on
CUDA when available). ``--stages`` adds a per-stage time breakdown of the default CPU path.

The baseline always runs the official FPN-100ep pipeline, so the ratio compares like with like only
for ``--recipe soco_fpn``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# --- naive official baseline (written from docs/method.md 2.2-2.8; loops on purpose) -----------------
class NaiveOfficialViews:
    """The official FPN-100ep sample, step by step as the official code does it."""

    def __init__(
        self,
        size=224,
        crop=0.5,
        k=4,
        max_tries=5,
        jitter_prob=0.5,
        jitter_ratio=0.1,
        aware_range=(48, 96, 192, 224, 0),
        cutout_prob=0.5,
        cutout_ratio=(0.1, 0.3),
    ):
        from torchvision import transforms as T

        self.size, self.crop, self.k, self.max_tries = size, crop, k, max_tries
        self.jitter_prob, self.jitter_ratio, self.aware_range = jitter_prob, jitter_ratio, aware_range
        self.cutout_prob, self.cutout_ratio = cutout_prob, cutout_ratio
        normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])

        class Blur:
            def __call__(self, x):
                return x.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))

        def post(blur_p, solarize):
            ops = [
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([Blur()], p=blur_p),
            ]
            if solarize:
                ops.append(T.RandomApply([ImageOps.solarize], p=0.2))
            return T.Compose(ops + [T.ToTensor(), normalize])

        self.post1, self.post2 = post(1.0, False), post(0.1, True)

    @staticmethod
    def rrc_params(width, height, scale, ratio=(3 / 4, 4 / 3)):
        area = width * height
        for _ in range(10):
            target = random.uniform(*scale) * area
            ar = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w, height, width
        return 0, 0, height, width, height, width

    def view(self, img, size, whole):
        from torchvision.transforms import functional as F

        W, H = img.size
        p = (0, 0, H, W, H, W) if whole else self.rrc_params(W, H, (self.crop, 1.0))
        return F.resized_crop(img, p[0], p[1], p[2], p[3], (size, size), Image.BILINEAR), np.array(p)

    @staticmethod
    def overlapping(props, p):
        y1, x1, h, w = p[:4]
        region = (x1, y1, x1 + w - 1, y1 + h - 1)
        out = [b for b in props if region[0] < b[2] and b[0] < region[2] and region[1] < b[3] and b[1] < region[3]]
        return np.array(out) if out else np.zeros((0, 5))

    def select(self, props):
        if len(props) < self.k:
            return props
        return props[np.random.choice(len(props), self.k, replace=False)]

    def jitter(self, props):
        out = []
        for b in props:
            nb = b.astype(float).copy()
            if random.random() < self.jitter_prob:
                j = np.random.uniform(-self.jitter_ratio, self.jitter_ratio, 4)
                w, h = b[2] - b[0] + 1, b[3] - b[1] + 1
                nb[0], nb[1] = b[0] + j[0] * w, b[1] + j[1] * h
                nb[2], nb[3] = nb[0] + w * (1 + j[2]) - 1, nb[1] + h * (1 + j[3]) - 1
            out.append(nb)
        return np.array(out) if out else np.zeros((0, 5))

    @staticmethod
    def clip(props, p):
        top, left, h, w = p[:4]
        r = (left, top, left + w - 1, top + h - 1)
        out = []
        for b in props:
            if r[0] < b[2] and b[0] < r[2] and r[1] < b[3] and b[1] < r[3]:
                out.append(
                    [max(r[0], b[0]) - left, max(r[1], b[1]) - top, min(r[2], b[2]) - left, min(r[3], b[3]) - top, b[4]]
                )
        return np.array(out) if out else np.array([[0, 0, w - 1, h - 1, 1]])

    def pad(self, boxes, common):
        need = self.k - len(boxes)
        if need <= 0:
            return boxes
        pool = boxes[np.isin(boxes[:, 4], common)]
        return np.concatenate([boxes, pool[np.random.choice(len(pool), need)]])

    def levels(self, boxes, p, size, sentinel):
        resized = boxes.astype(float).copy()
        resized[:, [0, 2]] = resized[:, [0, 2]] / p[3] * size
        resized[:, [1, 3]] = resized[:, [1, 3]] / p[2] * size
        resized = resized.astype(int)
        out = np.ones((4, len(resized))) * sentinel
        for i, b in enumerate(resized):
            s = math.sqrt((b[2] - b[0] + 1) * (b[3] - b[1] + 1))
            for j in range(4):
                if s <= self.aware_range[j]:
                    out[j, i] = b[4]
                    break
        return out.reshape(-1), resized

    @staticmethod
    def corr(a, b):
        n = len(a)
        return torch.Tensor((np.tile(a.reshape(n, 1), (1, n)) == np.tile(b.reshape(1, n), (n, 1))).astype(float))

    @staticmethod
    def to_tensor(boxes, p):
        b = boxes.astype(float).copy()
        b[:, [0, 2]] /= p[3]
        b[:, [1, 3]] /= p[2]
        return torch.Tensor(b)

    @staticmethod
    def flip(img, box_sets):
        from torchvision.transforms import functional as F

        if random.random() < 0.5:
            out = []
            for b in box_sets:
                nb = b.clone()
                nb[:, 0], nb[:, 2] = 1.0 - b[:, 2], 1.0 - b[:, 0]
                out.append(nb)
            return F.hflip(img), out
        return img, box_sets

    def cutout(self, img, boxes, size):
        out = img.clone()
        for b in boxes:
            if random.random() < self.cutout_prob:
                x1, y1, x2, y2 = (int(b[0] * size), int(b[1] * size), int(b[2] * size), int(b[3] * size))
                s = int(round(math.sqrt(random.uniform(*self.cutout_ratio) * (x2 - x1 + 1) * (y2 - y1 + 1))))
                cx, cy = random.randint(x1, x2), random.randint(y1, y2)
                out[
                    :,
                    max(cy - s // 2, 0) : min(cy + s // 2, self.size) + 1,
                    max(cx - s // 2, 0) : min(cx + s // 2, self.size) + 1,
                ] = 0.0
        return out

    def __call__(self, path, rects):
        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        props = [[r[0], r[1], r[0] + r[2] - 1, r[1] + r[3] - 1] for r in rects]
        if not props:
            props = [[0, 0, image.size[0] - 1, image.size[1] - 1]]
        props = np.array([p + [i + 1] for i, p in enumerate(props)])
        least, tries = max(self.k // 2, 1), 0
        while tries < self.max_tries:
            img1, p1 = self.view(image, self.size, True)
            img2, p2 = self.view(image, self.size, False)
            img3, p3 = self.view(image, self.size // 2, False)
            s12, s13 = self.select(self.overlapping(props, p2)), self.select(self.overlapping(props, p3))
            if len(s12) >= least and len(s13) >= least:
                break
            least, tries = max(least // 2, 1), tries + 1
        b1_12, b1_13 = self.clip(self.jitter(s12), p1), self.clip(self.jitter(s13), p1)
        b2, b3 = self.clip(s12, p2), self.clip(s13, p3)
        c12, c13 = b1_12[np.isin(b1_12[:, 4], b2[:, 4])][:, 4], b1_13[np.isin(b1_13[:, 4], b3[:, 4])][:, 4]
        b1_12, b1_13, b2, b3 = self.pad(b1_12, c12), self.pad(b1_13, c13), self.pad(b2, c12), self.pad(b3, c13)
        a1_12, _ = self.levels(b1_12, p1, self.size, -1)
        a1_13, _ = self.levels(b1_13, p1, self.size, -1)
        a2, _ = self.levels(b2, p2, self.size, -2)
        a3, _ = self.levels(b3, p3, self.size // 2, -3)
        corr12, corr13 = self.corr(a1_12, a2), self.corr(a1_13, a3)
        t1_12, t1_13 = self.to_tensor(b1_12, p1), self.to_tensor(b1_13, p1)
        t2, t3 = self.to_tensor(b2, p2), self.to_tensor(b3, p3)
        img1, (t1_12, t1_13) = self.flip(img1, [t1_12, t1_13])
        img2, (t2,) = self.flip(img2, [t2])
        img3, (t3,) = self.flip(img3, [t3])
        x1, x2, x3 = self.post1(img1), self.post2(img2), self.post2(img3)
        x2, x3 = self.cutout(x2, t2, self.size), self.cutout(x3, t3, self.size // 2)
        return x1, x2, x3, t1_12, t1_13, t2, t3, corr12, corr13


# --- per-stage profile --------------------------------------------------------------------------
def stage_times(ds, n: int) -> dict:
    """Milliseconds per sample of the CPU path's stages, on the views the sampler draws, with the
    dataset's own resize backend (``resize``) and, for comparison, the other one (``resize_other``)."""
    from PIL import Image as PILImage

    from soco_det.data import photometric as ph
    from soco_det.data.lazy_image import LazyImage
    from soco_det.data.resize import resize_into

    c = ds.sampler.cfg
    items = [ds.items[i % len(ds)].path for i in range(n)]
    store = ds.store
    # the dataset skips the header read when the store records the size (LazyImage(size=...))
    known = [tuple(store.size(int(ds.store_indices[i % len(ds)]))) if store is not None else None for i in range(n)]

    def pil_resize(img, sample):
        return [
            np.asarray(
                img.resize(
                    (c.geometry.view_sizes[v],) * 2, PILImage.Resampling.BILINEAR, box=(left, top, left + w, top + h)
                )
            )
            for v, (top, left, h, w) in enumerate(sample.crops)
        ]

    def numba_resize(img, sample):
        src, views = np.asarray(img), []
        for v, (top, left, h, w) in enumerate(sample.crops):
            out = np.empty((3, c.geometry.view_sizes[v], c.geometry.view_sizes[v]), np.uint8)
            resize_into(src, (left, top, left + w, top + h), out, sample.flips[v])
            views.append(out.transpose(1, 2, 0))
        return views

    own, other = (
        (numba_resize, pil_resize) if ds.sampler.pixels.resize_backend == "numba" else (pil_resize, numba_resize)
    )
    spent = {"header": 0.0, "decode": 0.0, "resize": 0.0, "photometric": 0.0}
    other_resize = total = 0.0
    for i, path in enumerate(items):
        t0 = time.process_time()
        sample = ds.views(i % len(ds), epoch=i // len(ds))[0]
        total += time.process_time() - t0
        t0 = time.process_time()
        lazy = LazyImage(path, size=known[i] if known[i] and known[i] != (0, 0) else None)
        t1 = time.process_time()
        img, _, _ = lazy.load()
        t2 = time.process_time()
        views = own(img, sample)
        t3 = time.process_time()
        for v, view in enumerate(views):
            ph.apply_params(np.ascontiguousarray(view), sample.params[v].astype(np.float64), c.mean, c.std)
        t4 = time.process_time()
        other(img, sample)
        other_resize += time.process_time() - t4
        for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            spent[key] += dt
    out = {k: round(v / n * 1e3, 3) for k, v in spent.items()}
    out["total"] = round(total / n * 1e3, 3)
    out["geometry_and_rest"] = round(out["total"] - sum(out[k] for k in spent), 3)
    out["resize_backend"] = ds.sampler.pixels.resize_backend
    out["resize_other_backend"] = round(other_resize / n * 1e3, 3)
    return out


def device_rate(ds_device, batch_size: int, device: str, repeats: int = 5) -> float:
    """Samples/s of apply_device_photometric on ``device`` (batches made by the device-path loader)."""
    from soco_det.data.dataset import collate_views
    from soco_det.data.device_photometric import apply_device_photometric

    n = len(ds_device)
    batch = collate_views([ds_device[(i // n, i % n)] for i in range(batch_size)])
    moved = {
        k: ([t.to(device) for t in v] if k in ("images", "photometric", "cutout") else v) for k, v in batch.items()
    }
    moved["norm"] = batch["norm"].to(device)
    apply_device_photometric(moved)  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        apply_device_photometric(moved)
    sync()
    return repeats * batch_size / (time.perf_counter() - t0)


# --- measurements ------------------------------------------------------------------------------
def rates(fns, n: int, chunk: int = 10) -> list[float]:
    """Samples per CPU-second of this process (one thread) for each of ``fns``, measured in
    interleaved chunks so that other jobs sharing the cores affect every candidate alike."""
    for fn in fns:
        for i in range(10):  # warm-up (imports, caches, compiled kernels)
            fn(i)
    spent = [0.0] * len(fns)
    for start in range(0, n, chunk):
        for k, fn in enumerate(fns):
            t0 = time.process_time()
            for i in range(start, min(start + chunk, n)):
                fn(i + 10)
            spent[k] += time.process_time() - t0
    return [n / s for s in spent]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--proposals", required=True)
    ap.add_argument("--recipe", default="soco_fpn")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--stages", action="store_true", help="also print a per-stage breakdown of the CPU path")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    from soco_det.data.config import DataConfig, ViewsConfig
    from soco_det.data.dataset import build_pretrain_dataset, collate_views

    # Our variants, each measured against the same naive baseline in the same interleaved run.
    variants = {
        "cpu path (default)": {},
        "cpu path, PIL resize": {"resize_backend": "pil"},
        "device path, CPU part": {"photometric": "device"},
        "device path, CPU part, PIL resize": {"photometric": "device", "resize_backend": "pil"},
        "device path, CPU part, PIL resize_reducing_gap=1": {
            "photometric": "device",
            "resize_backend": "pil",
            "resize_reducing_gap": 1.0,
        },
    }
    datasets = {
        name: build_pretrain_dataset(
            DataConfig(images=args.images, proposals=args.proposals, views=ViewsConfig(recipe=args.recipe), **kw),
            seed=0,
        )
        for name, kw in variants.items()
    }
    ds, ds_dev = datasets["cpu path (default)"], datasets["device path, CPU part"]
    n_img = len(ds)
    naive = NaiveOfficialViews()
    store = ds.store
    rects = [store.boxes(int(j)) if j >= 0 else np.zeros((0, 4), np.int32) for j in ds.store_indices]
    random.seed(0)
    np.random.seed(0)

    def sample_fn(dataset):
        return lambda i: dataset[(i // n_img, i % n_img)]

    *ours_rates, baseline = rates(
        [*(sample_fn(d) for d in datasets.values()), lambda i: naive(ds.items[i % n_img].path, rects[i % n_img])],
        args.samples,
    )
    ours_by_name = dict(zip(variants, ours_rates))
    ours = ours_by_name["cpu path (default)"]
    dev_cpu = device_rate(ds_dev, min(args.batch_size, 64), "cpu")
    dev_cuda = device_rate(ds_dev, args.batch_size, "cuda") if torch.cuda.is_available() else None
    stages = stage_times(ds, min(args.samples, 100)) if args.stages else None

    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, [i % n_img for i in range(max(args.batch_size * 4, args.samples))]),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=collate_views,
        drop_last=True,
    )
    it = iter(loader)
    next(it)  # worker start-up and first batch excluded
    t0, seen = time.perf_counter(), 0
    for batch in it:
        seen += batch["index"].shape[0]
    loader_rate = seen / (time.perf_counter() - t0) if seen else float("nan")

    result = {
        "recipe": args.recipe,
        "images": n_img,
        "samples": args.samples,
        "samples_per_s_per_core": round(ours, 2),
        "naive_official_samples_per_s_per_core": round(baseline, 2),
        "ratio_vs_naive_official": round(ours / baseline, 2),
        "variants": {
            name: {"samples_per_s_per_core": round(r, 2), "ratio_vs_naive_official": round(r / baseline, 2)}
            for name, r in ours_by_name.items()
        },
        "device_photometric_cpu_tensors_samples_per_s": round(dev_cpu, 1),
        "device_photometric_cuda_samples_per_s": None if dev_cuda is None else round(dev_cuda, 1),
        "cpu_path_stage_ms": stages,
        "dataloader_workers": args.workers,
        "dataloader_batch_size": args.batch_size,
        "dataloader_samples_per_s": round(loader_rate, 2),
        "cpu_count": os.cpu_count(),
    }
    print(f"views recipe {args.recipe} on {n_img} images ({args.samples} samples, 1 thread):")
    print(f"  {'naive official (FPN)':<48}: {baseline:8.1f} samples/s per core")
    for name, r in ours_by_name.items():
        print(f"  {name:<48}: {r:8.1f} samples/s per core ({r / baseline:.2f}x)")
    print(f"  apply_device_photometric on CPU tensors (1 thread): {dev_cpu:8.1f} samples/s")
    if dev_cuda is not None:
        print(f"  apply_device_photometric on CUDA: {dev_cuda:8.1f} samples/s")
    else:
        print("  apply_device_photometric on CUDA: not measured (no CUDA device)")
    if stages:
        print("  CPU path per-stage ms/sample: " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    print(f"  DataLoader ({args.workers} workers, batch {args.batch_size}): {loader_rate:8.1f} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
