"""Write a ready-made data set (images + COCO JSON per split) into a folder; nothing is downloaded.

Example: ``soco-det prepare nuclei -o nuclei --tile 128`` writes ``nuclei/images/{unlabeled,train,val}/``
and ``nuclei/{unlabeled,train,val}.json`` from the fluorescence image of cell nuclei that the PyPI
package stardist ships (``pip install stardist``); ``soco-det prepare scenes -o scenes`` writes the
sample scenes at the CPU benchmark's sizes. Prints the images per split, objects per image and the
median object side.
"""

from __future__ import annotations

import argparse

# option -> (the data sets that take it, help)
OPTIONS = {
    "tile": ("nuclei", "side of the square tiles in px (nuclei; default 128)"),
    "stride": ("nuclei", "distance between tiles in px, < --tile for overlapping tiles (nuclei; default: --tile)"),
    "seed": ("scenes", "seed of the scenes (scenes; default 0)"),
    "workers": ("scenes", "processes rendering scenes (scenes; does not change the output)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from soco_det.datasets import NAMES

    parser.add_argument("name", choices=NAMES, help="the data set")
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder (created if missing)")
    for option, (_, help_text) in OPTIONS.items():
        parser.add_argument(f"--{option}", type=int, default=None, help=help_text)


def run(args: argparse.Namespace) -> int:
    from soco_det import api
    from soco_det.datasets.summary import format_summary
    from soco_det.errors import UserError
    from soco_det.logs import get_logger

    options = {}
    for option, (names, _) in OPTIONS.items():
        value = getattr(args, option)
        if value is not None and args.name not in names.split(","):
            raise UserError(f"--{option} applies to the data set {names}, not to {args.name}")
        if value is not None:
            options[option] = value
    result = api.prepare(args.name, args.out, **options)
    log = get_logger(__name__)
    for key in ("images", "unlabeled", "train", "val"):
        log.info("%s: %s", key, getattr(result, key))
    for line in format_summary(result.summary):
        print(line)
    return 0
