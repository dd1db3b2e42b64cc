"""Pictures to check each stage by eye: ``soco-det viz scenes|proposals|views|predictions ...``.

The drawing lives with each stage (:func:`soco_det.synth.viz.render_scenes`,
:func:`soco_det.proposals.viz.draw_proposals`, :func:`soco_det.data.viz.render_views`,
:func:`soco_det.transfer.viz.render_predictions`); this module parses the options of each kind and
calls it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from soco_det.commands.main import HelpFormatter


# ---------------------------------------------------------------------- viz scenes
def add_scenes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="a `soco-det synth` output folder, or a COCO JSON file")
    parser.add_argument(
        "--split",
        default="train",
        choices=["unlabeled", "train", "val"],
        help="split to draw when DATA is a synth folder",
    )
    parser.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="images folder the JSON's file_name values are relative to "
        "(default: DATA/images, or the JSON's folder/images)",
    )
    parser.add_argument("-n", "--num", type=int, default=6, help="number of scenes to draw")
    parser.add_argument("-o", "--out", default="scenes.png", metavar="PNG", help="output picture")


def run_scenes(args: argparse.Namespace) -> int:
    from soco_det.logs import get_logger
    from soco_det.synth.viz import render_scenes

    data = Path(args.data)
    if data.is_dir():
        coco_json, default_images = data / f"{args.split}.json", data / "images"
    else:
        coco_json, default_images = data, data.parent / "images"
    images_dir = Path(args.images) if args.images else default_images
    out = render_scenes(coco_json, images_dir, args.out, n=args.num)
    get_logger(__name__).info("wrote %s", out)
    return 0


# ---------------------------------------------------------------------- viz proposals
def add_proposals_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="proposal store folder")
    parser.add_argument(
        "--image",
        required=True,
        metavar="IMAGE",
        help="the image file (absolute or relative to the working folder), its path relative to the store's "
        "images root, a basename (with or without extension) or an index",
    )
    parser.add_argument("-o", "--output", required=True, metavar="PNG", help="picture to write")
    parser.add_argument("--raw", action="store_true", help="draw the unfiltered rects (store computed with --keep-raw)")
    parser.add_argument("--max-boxes", type=int, default=200, help="draw at most this many rects")
    parser.add_argument("--root", default=None, help="images root, if the images moved since the store was computed")


def run_proposals(args: argparse.Namespace) -> int:
    from soco_det.imageio import load_rgb
    from soco_det.logs import get_logger
    from soco_det.proposals.store import ProposalStore
    from soco_det.proposals.viz import draw_proposals, find_image

    store = ProposalStore.open(args.store, root=args.root)
    i = find_image(store, args.image)
    rects = store.raw_boxes(i) if args.raw else store.boxes(i)
    image = load_rgb(
        Path(store.root) / store.paths[i], exif_transpose=store.exif_transpose, max_pixels=store.meta.get("max_pixels")
    )
    out = draw_proposals(image, rects[: args.max_boxes])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.output)
    get_logger(__name__).info(
        "%s: %d %s proposals (stage %s) -> %s",
        store.paths[i],
        len(rects),
        "raw" if args.raw else "filtered",
        store.stage(i),
        args.output,
    )
    return 0


# ---------------------------------------------------------------------- viz views
def add_views_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="images root folder")
    parser.add_argument("--proposals", default=None, help="proposal store folder (default: whole-image boxes)")
    parser.add_argument("-o", "--out", required=True, help="output PNG path")
    parser.add_argument(
        "--recipe", default="soco_fpn", help="views recipe: soco_fpn|soco_fpn_400|soco_star|soco_c4|paper"
    )
    parser.add_argument("--samples", type=int, default=4, help="number of samples (rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--legacy", action="store_true", help="official box conventions")


def run_views(args: argparse.Namespace) -> int:
    from soco_det.data.config import DataConfig, ViewsConfig
    from soco_det.data.dataset import build_pretrain_dataset
    from soco_det.data.viz import render_views
    from soco_det.errors import UserError
    from soco_det.logs import get_logger

    cfg = DataConfig(
        images=args.images, proposals=args.proposals, views=ViewsConfig(recipe=args.recipe, legacy=args.legacy)
    )
    try:
        cfg.validate()
    except ValueError as exc:
        raise UserError(f"viz views: {exc}") from exc
    dataset = build_pretrain_dataset(cfg, seed=args.seed)
    out = render_views(dataset, args.out, samples=max(1, args.samples), epoch=args.epoch)
    get_logger(__name__).info("wrote %s", out)
    return 0


# ---------------------------------------------------------------------- viz predictions
def add_predictions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a `soco-det finetune` run folder or checkpoint")
    parser.add_argument(
        "--images",
        required=True,
        metavar="PATH",
        help="an image, a folder of images (searched recursively), or with --json the folder its "
        "file_name values are relative to",
    )
    parser.add_argument(
        "--json", default=None, metavar="COCO", help="COCO file of the images: draws their ground truth beside"
    )
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for one PNG per image")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    parser.add_argument("-n", "--num", type=int, default=8, help="draw the first N images (0: all)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")


def run_predictions(args: argparse.Namespace) -> int:
    from soco_det.errors import UserError
    from soco_det.logs import get_logger
    from soco_det.transfer.viz import render_predictions

    if args.num < 0:
        raise UserError(f"--num: must be >= 0 (0: all images), got {args.num}")
    written = render_predictions(
        args.run,
        args.images,
        args.out,
        coco_json=args.json,
        score_thresh=args.score_thresh,
        max_images=args.num,
        device=args.device,
    )
    get_logger(__name__).info("wrote %d pictures to %s", len(written), args.out)
    return 0


# kind -> (add_arguments, run, help)
KINDS: dict[str, tuple[Callable, Callable, str]] = {
    "scenes": (add_scenes_arguments, run_scenes, "sample scenes with their ground-truth boxes"),
    "proposals": (add_proposals_arguments, run_proposals, "one image with its filtered proposals"),
    "views": (
        add_views_arguments,
        run_views,
        "a grid of SoCo views with boxes coloured by proposal id and labelled by level",
    ),
    "predictions": (
        add_predictions_arguments,
        run_predictions,
        "a fine-tuned detector's boxes and masks on images, beside the ground truth with --json",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="viz_kind", metavar="KIND", required=True)
    for kind, (add, run_kind, help_text) in KINDS.items():
        p = sub.add_parser(kind, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add(p)
        p.set_defaults(_viz_run=run_kind)


def run(args: argparse.Namespace) -> int:
    return int(args._viz_run(args) or 0)
