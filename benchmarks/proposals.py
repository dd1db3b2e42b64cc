"""Proposal methods compared: speed, box counts, store size and recall on the sample scenes.

Usage: ``.venv/bin/python benchmarks/proposals.py [--scenes 40] [--max-side 128] [--workers 2] [--reference-images 3]``

On ``soco_det.synth.generate(out, n_unlabeled=0, n_train=0, n_val=N)`` scenes, for each method
(faithful selective search at full resolution and with ``--max-side``, OpenCV fast, random boxes)
it runs ``compute_store`` with one worker and with ``--workers`` workers and prints images/s (for
the pool also without its start-up cost, measured on tiny images),
boxes per image before and after the official ``ratio3size0308post`` filter, store bytes per image,
and the recall of the ground-truth boxes at IoU >= 0.5 by the filtered (and by the raw) proposals.
Last, in the same run, the faithful implementation's speed against the slow reference
(``soco_det.proposals.reference``) on a few images: the ratio is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from PIL import Image

from soco_det.imageio import load_rgb
from soco_det.proposals import ProposalStore, compute_store
from soco_det.proposals.methods import resolve_params, run_method
from soco_det.proposals.recall import iou_matrix, rects_to_boxes
from soco_det.synth import generate


def recall(store: ProposalStore, gt: dict[str, np.ndarray], raw: bool) -> float:
    hit = total = 0
    for relpath, gt_boxes in gt.items():
        i = store.index(relpath)
        rects = store.raw_boxes(i) if raw else store.boxes(i)
        total += len(gt_boxes)
        if len(rects) and len(gt_boxes):
            hit += int((iou_matrix(gt_boxes, rects_to_boxes(rects)).max(1) >= 0.5).sum())
    return hit / max(total, 1)


def load_ground_truth(coco_json: Path, split: str) -> dict[str, np.ndarray]:
    """``{path relative to images/<split>: continuous boxes [n, 4]}`` from the COCO file."""
    coco = json.loads(coco_json.read_text())
    boxes: dict[int, list] = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes[ann["image_id"]].append([x, y, x + w, y + h])
    return {
        im["file_name"].removeprefix(f"{split}/"): np.asarray(boxes[im["id"]], np.float64).reshape(-1, 4)
        for im in coco["images"]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=40)
    ap.add_argument("--max-side", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reference-images", type=int, default=3)
    ap.add_argument("--keep", default=None, help="keep the scenes and stores in this folder")
    args = ap.parse_args()

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="soco_bench_props_"))
    paths = generate(work / "scenes", n_unlabeled=0, n_train=0, n_val=args.scenes)
    images = Path(paths["images"]) / "val"
    gt = load_ground_truth(Path(paths["val"]), "val")
    n = len(gt)
    print(f"{n} sample scenes in {images}; GT boxes: {sum(len(b) for b in gt.values())}")

    tiny = work / "tiny"
    tiny.mkdir(exist_ok=True)
    for k in range(args.workers):  # 40 px: below the min side, no method call; only the pool start-up
        Image.fromarray(np.full((40, 40, 3), 127, np.uint8)).save(tiny / f"{k}.png")
    runs = [("selective_search", None), ("selective_search", args.max_side), ("opencv-fast", None), ("random", None)]
    header = (
        f"{'method':<32} {'img/s 1 core':>12} {'img/s x' + str(args.workers):>12} {'w/o start':>9} {'raw/img':>8} {'kept/img':>8} "
        f"{'med kept':>8} {'bytes/img':>9} {'recall@.5':>9} {'raw rec':>8}"
    )
    print(header)
    print("-" * len(header))
    for method, max_side in runs:
        label = method + (f" --max-side {max_side}" if max_side else "")
        rates = []
        for workers in (1, args.workers):
            out = work / f"{method}_{max_side}_{workers}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            compute_store(images, out, method=method, workers=workers, max_side=max_side, keep_raw=workers == 1)
            rates.append(n / (time.perf_counter() - t0))
        # Starting a pool (spawn, imports, loading compiled kernels) is a fixed cost that a few dozen
        # scenes cannot hide: measure it on as many tiny images as workers and report both rates.
        t0 = time.perf_counter()
        compute_store(tiny, work / f"start_{method}_{max_side}", method=method, workers=args.workers, max_side=max_side)
        start_s = time.perf_counter() - t0
        rates.append(n / max(n / rates[1] - start_s, 1e-9))
        store = ProposalStore.open(work / f"{method}_{max_side}_1")
        s = store.summary
        # bytes per image of the store a user gets (without --keep-raw)
        lean = ProposalStore.open(work / f"{method}_{max_side}_{args.workers}").summary["bytes_per_image"]
        print(
            f"{label:<32} {rates[0]:>12.2f} {rates[1]:>12.2f} {rates[2]:>9.2f} {s['raw_boxes_per_image']['mean']:>8.1f} "
            f"{s['boxes_per_image']['mean']:>8.1f} {s['boxes_per_image']['median']:>8.1f} {lean:>9.1f} "
            f"{recall(store, gt, raw=False):>9.3f} {recall(store, gt, raw=True):>8.3f}"
        )
        print(f"{'':<32} filter stages: {s['stages']}")

    # Faithful vs reference, same images, same process.
    ss_params = resolve_params("selective_search")
    picks = sorted(gt)[: args.reference_images]
    arrays = [np.asarray(load_rgb(images / p)) for p in picks]
    run_method("selective_search", arrays[0], ss_params)  # warm-up (JIT compilation, imports)
    t_fast = t_ref = 0.0
    same = True
    for a in arrays:
        t0 = time.perf_counter()
        fast = run_method("selective_search", a, ss_params)
        t_fast += time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = run_method("reference", a, ss_params)
        t_ref += time.perf_counter() - t0
        same &= np.array_equal(np.sort(fast, axis=0), np.sort(ref, axis=0))
    print(
        f"\nfaithful vs reference on {len(arrays)} images ({arrays[0].shape[1]}x{arrays[0].shape[0]}): "
        f"{t_fast / len(arrays):.3f} s vs {t_ref / len(arrays):.3f} s per image -> speed-up x{t_ref / t_fast:.1f}; "
        f"same rects: {same}"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
