"""Check the views before pretraining: where the boxes land in each view.

  soco-det views report --proposals STORE [--images DIR] [--recipe R] [-n N] [--json OUT] [key=value ...]

``report`` samples the views of N images exactly as pretraining with that recipe and those
overrides would (the real sampler, the run's seed; only the geometry, no pixel is decoded) and
prints per view (V1, V2, ...) the share of the kept boxes on each FPN level, their median side in
view pixels and the share under 8 px, beside the paper's reference (the official sampler on
photographs). Pictures of the views: ``soco-det viz views``.
"""

from __future__ import annotations

import argparse

_REPORT = (
    "per view: the FPN level histogram of the kept boxes, their median side and the share under 8 px, "
    "with the paper's reference"
)


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proposals", required=True, metavar="STORE", help="proposal store from `soco-det proposals`")
    p.add_argument("--images", default=None, metavar="DIR", help="images root (default: the store's root)")
    p.add_argument(
        "--recipe",
        default="soco_fpn_r50_100ep",
        help="pretraining recipe (a shipped name such as tiny_cpu, or a YAML file) whose views to report",
    )
    p.add_argument("-n", "--num-images", type=int, default=64, help="images sampled, evenly spaced over the dataset")
    p.add_argument("--epoch", type=int, default=0, help="the epoch whose samples are drawn")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides as for `soco-det pretrain`, e.g. data.views.geometry.fit_objects=true",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    _add_report(sub.add_parser("report", help=_REPORT, description=_REPORT, formatter_class=parser.formatter_class))


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from soco_det import api
    from soco_det.atomic import atomic_write_text
    from soco_det.data.dataset import build_pretrain_dataset
    from soco_det.data.view_report import dataset_view_report
    from soco_det.errors import UserError

    if args.num_images < 1:
        raise UserError(f"--num-images: must be >= 1, got {args.num_images}")
    cfg = api.pretrain_config(args.images, args.proposals, recipe=args.recipe, overrides=args.overrides)
    try:
        cfg.data.validate()
    except ValueError as exc:
        raise UserError(f"views report: {exc}") from exc
    dataset = build_pretrain_dataset(cfg.data, seed=cfg.seed)
    report = dataset_view_report(dataset, args.num_images, epoch=args.epoch)
    print(report.format())
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
