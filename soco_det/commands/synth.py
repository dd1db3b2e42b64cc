"""Generate the seeded sample-scene dataset: images/<split>/NNNNNN.jpg and COCO <split>.json.

Example: ``soco-det synth -o scenes --unlabeled 200 --train 50 --val 50 --size 256 --seed 0``
writes ``scenes/images/{unlabeled,train,val}/`` and ``scenes/{unlabeled,train,val}.json``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--unlabeled", type=int, default=200, help="scenes in the unlabeled split (pretraining)")
    parser.add_argument("--train", type=int, default=50, help="scenes in the labeled train split (fine-tuning)")
    parser.add_argument("--val", type=int, default=50, help="scenes in the labeled val split (evaluation)")
    parser.add_argument(
        "--size",
        type=int,
        default=256,
        help="short side of every scene in pixels (>= 64); the long side follows a random aspect in 3:4..4:3",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed -> same bytes")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes rendering scenes (does not change the output)"
    )


def run(args: argparse.Namespace) -> int:
    from soco_det import api
    from soco_det.logs import get_logger

    scenes = api.synth(
        args.out,
        unlabeled=args.unlabeled,
        train=args.train,
        val=args.val,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
    )
    log = get_logger(__name__)
    for key in ("images", "unlabeled", "train", "val"):
        log.info("%s: %s", key, getattr(scenes, key))
    return 0
