"""Speed of the fast selective search against the official (reference) implementation, one core.

Usage: ``.venv/bin/python benchmarks/selective_search.py [--images DIR] [--repeat 3] [--json FILE]``

Both run SoCo's parameters (scale=300, sigma=0.9, min_size=100) on the same images: scikit-image's
bundled photos (astronaut, coffee, chelsea, rocket, camera) resized to a 500-px long side
(~500x333, a typical ImageNet photo) and at full size (up to 512x640), or the images of ``--images``
at their own size. For each set it prints images/s by wall clock and by CPU time (a busy shared
machine disturbs CPU time less), the speed ratio measured in this run, whether the rects are
identical, and where the time goes: Felzenszwalb segmentation vs. everything else ("grouping":
LBP, histograms, neighbours, merging) for both implementations. Each image is timed ``--repeat``
times and the fastest run counts. Threads are limited to one before numpy is imported, and the
process is pinned to one CPU where the OS allows it.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def bundled_photos(long_side: int | None) -> dict[str, np.ndarray]:
    import skimage.data
    import skimage.transform
    import skimage.util

    out = {}
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        image = image[..., :3]
        if long_side is not None:
            factor = long_side / max(image.shape[:2])
            shape = (round(image.shape[0] * factor), round(image.shape[1] * factor))
            image = skimage.util.img_as_ubyte(skimage.transform.resize(image, shape, anti_aliasing=True))
        out[name] = np.ascontiguousarray(image)
    return out


def folder_images(root: Path) -> dict[str, np.ndarray]:
    from soco_det.imageio import list_images, load_rgb

    return {rel: np.asarray(load_rgb(root / rel)) for rel in list_images(root)}


def best_time(fn, repeat: int) -> tuple[float, float, object]:
    """Fastest (wall, cpu) seconds of ``repeat`` calls, and the last result."""
    wall = cpu = float("inf")
    result = None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu, result


def bench_set(images: dict[str, np.ndarray], repeat: int) -> dict:
    import skimage.segmentation
    import skimage.util

    from soco_det.proposals.reference import reference_selective_search
    from soco_det.proposals.selective_search import group_regions, segment, selective_search

    params = dict(scale=300, sigma=0.9, min_size=100)
    totals = {
        key: 0.0
        for key in ("ref_wall", "ref_cpu", "ref_felz_cpu", "fast_wall", "fast_cpu", "fast_felz_cpu", "fast_group_cpu")
    }
    identical = 0
    rows = []
    for name, image in images.items():
        ref_wall, ref_cpu, ref_rects = best_time(lambda: reference_selective_search(image, **params), repeat)
        ref_felz = best_time(
            lambda: skimage.segmentation.felzenszwalb(skimage.util.img_as_float(image), **params), repeat
        )[1]
        fast_wall, fast_cpu, fast_rects = best_time(lambda: selective_search(image, **params), repeat)
        _, felz_cpu, labels = best_time(lambda: segment(image, **params), repeat)
        group_cpu = best_time(lambda: group_regions(image, labels), repeat)[1]
        same = bool(np.array_equal(ref_rects, fast_rects))
        identical += same
        for key, value in zip(totals, (ref_wall, ref_cpu, ref_felz, fast_wall, fast_cpu, felz_cpu, group_cpu)):
            totals[key] += value
        rows.append(
            {
                "image": name,
                "height": image.shape[0],
                "width": image.shape[1],
                "regions": len(fast_rects),
                "identical": same,
                "ref_cpu_s": ref_cpu,
                "fast_cpu_s": fast_cpu,
            }
        )
        print(
            f"  {name:<28} {image.shape[1]:>4}x{image.shape[0]:<4} regions {len(fast_rects):>4}  "
            f"reference {ref_cpu * 1e3:7.1f} ms  fast {fast_cpu * 1e3:6.1f} ms  "
            f"x{ref_cpu / fast_cpu:5.1f}  {'identical' if same else 'DIFFERENT'}",
            flush=True,
        )
    n = len(images)
    summary = {
        "images": n,
        "identical": identical,
        "reference_images_per_s_wall": n / totals["ref_wall"],
        "reference_images_per_s_cpu": n / totals["ref_cpu"],
        "fast_images_per_s_wall": n / totals["fast_wall"],
        "fast_images_per_s_cpu": n / totals["fast_cpu"],
        "ratio_wall": totals["ref_wall"] / totals["fast_wall"],
        "ratio_cpu": totals["ref_cpu"] / totals["fast_cpu"],
        "reference_felzenszwalb_share": totals["ref_felz_cpu"] / totals["ref_cpu"],
        "fast_felzenszwalb_share": totals["fast_felz_cpu"] / (totals["fast_felz_cpu"] + totals["fast_group_cpu"]),
        "felzenszwalb_ratio_cpu": totals["ref_felz_cpu"] / totals["fast_felz_cpu"],
        "rows": rows,
    }
    print(
        f"  reference: {summary['reference_images_per_s_wall']:6.2f} img/s wall, "
        f"{summary['reference_images_per_s_cpu']:6.2f} img/s cpu; Felzenszwalb "
        f"{100 * summary['reference_felzenszwalb_share']:.0f}% of its time"
    )
    print(
        f"  fast:      {summary['fast_images_per_s_wall']:6.2f} img/s wall, "
        f"{summary['fast_images_per_s_cpu']:6.2f} img/s cpu; Felzenszwalb "
        f"{100 * summary['fast_felzenszwalb_share']:.0f}%, grouping "
        f"{100 * (1 - summary['fast_felzenszwalb_share']):.0f}% of its time "
        f"(Felzenszwalb alone x{summary['felzenszwalb_ratio_cpu']:.1f} faster than scikit-image's)"
    )
    print(
        f"  speed ratio fast/reference: x{summary['ratio_wall']:.1f} wall, x{summary['ratio_cpu']:.1f} cpu; "
        f"identical rects on {identical}/{n} images",
        flush=True,
    )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of images (default: scikit-image's bundled photos)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per image; the fastest counts (default 3)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        except OSError:
            pass
    warnings.simplefilter("ignore", UserWarning)  # the reference runs LBP on float images

    from soco_det.proposals.selective_search import warm_up

    t0 = time.perf_counter()
    warm_up()  # load (or compile) the numba kernels
    print(f"numba kernels ready in {time.perf_counter() - t0:.1f} s (first run compiles; later runs load the cache)")

    if args.images:
        sets = {str(args.images): folder_images(args.images)}
    else:
        sets = {"bundled photos, long side 500": bundled_photos(500), "bundled photos, full size": bundled_photos(None)}
    results = {}
    for title, images in sets.items():
        print(f"{title} ({len(images)} images, repeat {args.repeat}):")
        results[title] = bench_set(images, args.repeat)
    if args.json:
        from soco_det.atomic import atomic_write_json

        atomic_write_json(args.json, results, indent=2)
    return 0 if all(r["identical"] == r["images"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
