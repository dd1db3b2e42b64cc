"""Proposals that fit the objects: GT recall and precision of each ``--object-size`` setting.

Usage::

    .venv/bin/python benchmarks/proposal_fit.py [--scenes 40] [--workers 2]
    .venv/bin/python benchmarks/proposal_fit.py --coco val.json --images DIR [--hint-coco train.json]

On the sample scenes (``soco_det.synth.generate``: ``--scenes`` val scenes, the hint from the train
split's boxes) or on a COCO dataset (``--coco FILE --images DIR``: the images the file names, matched
by basename; the ``coco:`` hint from ``--hint-coco``, default the file itself), it computes a store
per setting with ``compute_store`` (raw rects kept) and prints, for each: raw recall and kept recall
of the GT boxes at IoU 0.5, kept precision (fraction of kept boxes with IoU >= 0.5 to a GT box),
kept boxes per image and seconds (the fit included). Settings: ``paper`` (scale 300, min_size 100,
``ratio3size0308post``); ``paper+size`` (the paper's selective search with the size filter ``auto``
picks); ``auto``; ``coco:FILE``; and ``N`` px hints given with ``--px``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from soco_det.logs import setup_logging
from soco_det.proposals import ProposalStore, compute_store
from soco_det.proposals.fit import PAPER_PARAMS, fit_settings
from soco_det.proposals.recall import store_recall


def _images_of(coco: Path, images: Path, work: Path) -> Path:
    """A folder of links to the images ``coco`` names (basenames), so the stores hold only them."""
    names = [Path(im["file_name"]).name for im in json.loads(coco.read_text())["images"]]
    found = {p.name: p for p in images.rglob("*") if p.is_file()}
    out = work / "images"
    out.mkdir(parents=True)
    for name in names:
        if name in found:
            (out / name).symlink_to(found[name].resolve())
    return out


def _settings(images: Path, hint_coco: Path, px: list[float]) -> list[tuple[str, dict]]:
    from soco_det.imageio import list_sources

    listing = list_sources(images)
    auto = fit_settings("auto", listing.root, listing.keys)
    rows = [
        ("paper", {"object_size": "paper"}),
        (f"paper+{auto.filter}", {"object_size": "paper", "filter": auto.filter, "params": dict(PAPER_PARAMS)}),
        ("auto", {"object_size": "auto"}),
        (f"coco:{hint_coco.name}", {"object_size": f"coco:{hint_coco}"}),
    ]
    return rows + [(f"{v:g}", {"object_size": f"{v:g}"}) for v in px]


def run(images: Path, coco: Path, hint_coco: Path, px: list[float], workers: int, work: Path) -> list[dict]:
    results = []
    for i, (name, kwargs) in enumerate(_settings(images, hint_coco, px)):
        t0 = time.perf_counter()
        out = compute_store(images, work / f"store{i}", workers=workers, keep_raw=True, **kwargs)
        seconds = time.perf_counter() - t0
        store = ProposalStore.open(out)
        rec = store_recall(store, coco)
        fit = store.meta.get("fit") or {}
        results.append(
            {
                "setting": name,
                "params": store.meta["params"],
                "filter": store.meta["filter"],
                "object_side_px": fit.get("object_side_px"),
                "raw_recall": round(rec.raw, 3),
                "kept_recall": round(rec.kept, 3),
                "kept_precision": round(rec.kept_precision, 3),
                "kept_per_image": round(store.summary["boxes_per_image"]["mean"], 1),
                "seconds": round(seconds, 1),
            }
        )
    return results


def print_table(results: list[dict], title: str) -> None:
    print(f"\n{title}\n")
    print("| setting | scale / min_size | filter | raw recall | kept recall | kept precision | kept / image | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r["params"]
        print(
            f"| {r['setting']} | {p.get('scale', '-'):g} / {p.get('min_size', '-')} | `{r['filter']}` | "
            f"{r['raw_recall']:.3f} | {r['kept_recall']:.3f} | {r['kept_precision']:.3f} | "
            f"{r['kept_per_image']:.1f} | {r['seconds']:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=40, help="val scenes to generate (without --coco)")
    ap.add_argument("--coco", type=Path, default=None, help="COCO json of a labelled set (with --images)")
    ap.add_argument("--images", type=Path, default=None, help="the images of --coco")
    ap.add_argument("--hint-coco", type=Path, default=None, help="COCO json for the coco: hint (default --coco)")
    ap.add_argument("--px", type=float, nargs="*", default=[], help="also these N px object-size hints")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    setup_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="proposal_fit_"))
    try:
        if args.coco is not None:
            if args.images is None:
                ap.error("--coco needs --images")
            images, coco, hint = _images_of(args.coco, args.images, work), args.coco, args.hint_coco or args.coco
            title = f"{args.coco} ({len(json.loads(args.coco.read_text())['images'])} images)"
        else:
            from soco_det.synth import generate

            paths = generate(work / "scenes", n_unlabeled=0, n_train=20, n_val=args.scenes)
            images, coco, hint = paths["images"] / "val", paths["val"], args.hint_coco or paths["train"]
            title = (
                f"sample scenes: {args.scenes} val scenes (seed 0, short side 256 px), coco hint from 20 train scenes"
            )
        results = run(images, coco, hint, args.px, args.workers, work)
        print_table(results, title)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
