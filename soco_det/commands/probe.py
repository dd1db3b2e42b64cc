"""Probe what frozen detector features know about objects, with 95 % intervals (``soco-det probe``).

For one or more networks of the same architecture — pretraining runs, checkpoints, official
checkpoints, or ``untrained`` (the run's own init, same seed: the honest random baseline) — pool
the ground-truth boxes of a labeled COCO set and report linear and k-NN classification, a
localisation probe, cross-view retrieval and the effective rank, each with a bootstrap interval,
plus paired differences against the first network::

    soco-det probe runs/soco untrained --train-json train.json --val-json val.json --images imgs/ -o probe.json

``--task classification`` is the official linear evaluation instead (:mod:`soco_det.probe.linear_eval`:
frozen backbone, linear classifier on pooled C5, ImageFolder layout)::

    soco-det probe runs/soco --task classification --train imagenet/train --val imagenet/val -o runs/linear
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.probe.config import LinearEvalSettings

log = get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="*",
        help="run folders, checkpoints, official checkpoints, or 'untrained' (the architecture's "
        "init with the config's seed); the first is compared with each other one",
    )
    parser.add_argument(
        "--task",
        choices=["objects", "classification", "detection"],
        default="objects",
        help="objects: the object-level probe on a COCO set; classification: the official linear "
        "evaluation on ImageFolders (--train/--val); detection: box AP of an RPN + box head trained on "
        "the frozen backbone + FPN (same COCO options as objects)",
    )
    parser.add_argument("--train-json", help="objects: COCO file whose objects fit the read-outs")
    parser.add_argument("--val-json", help="objects: COCO file whose objects score them")
    parser.add_argument("--images", help="objects: folder the COCO file_name entries are relative to")
    parser.add_argument(
        "--config",
        default=None,
        help="pretraining recipe or config.yaml giving the architecture, view size and seed "
        "(default: the first run folder's config.yaml)",
    )
    parser.add_argument("--seed", type=int, default=None, help="init seed of 'untrained' (default: the config's)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="probe images at this side in pixels (default: the config's whole-image view size; "
        "the level thresholds scale with it)",
    )
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many images per set")
    parser.add_argument(
        "--tasks", nargs="+", default=None, help="subset of linear knn loc retrieval rank (default: all)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument(
        "-o", "--out", default=None, help="objects: write the results as JSON here; classification: output folder"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing -o file (objects) or the results in the -o folder (classification); the old "
        "ones are moved to NAME.old-<time>",
    )
    add_classification_arguments(parser)  # the classification task's options (shared ones are not repeated)
    add_detection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from soco_det.runlock import output_file, output_folder

    if args.task == "classification":
        if args.out is None:
            return run_classification(args)
        with output_folder(args.out, ("metrics.json", "linear.pt"), args.overwrite, "linear evaluation folder"):
            return run_classification(args)
    task = run_detection if args.task == "detection" else run_objects
    if args.out is None:
        return task(args)
    with output_file(args.out, args.overwrite, "probe results"):
        return task(args)


def run_objects(args: argparse.Namespace) -> int:
    """The object-level probe (``--task objects``)."""
    missing = [f"--{k.replace('_', '-')}" for k in ("train_json", "val_json", "images") if not getattr(args, k)]
    if missing or not args.sources:
        raise UserError(
            f"the object probe needs sources and {', '.join(missing) or 'them'}"
            if missing
            else "the object probe needs at least one source (a run, a checkpoint or 'untrained')"
        )
    from soco_det import api
    from soco_det.probe.probe import format_table

    report = api.probe(
        args.sources,
        train_json=args.train_json,
        val_json=args.val_json,
        images=args.images,
        out=args.out,
        config=args.config,
        seed=args.seed,
        size=args.size,
        max_images=args.max_images,
        tasks=args.tasks,
        device=args.device,
        resamples=args.resamples,
    ).report
    if report.get("background_boxes"):
        print(
            f"one category: object vs background ({report['background_boxes']['train']} train / "
            f"{report['background_boxes']['val']} val background boxes drawn away from the objects); "
            "*_balanced is the mean of the two classes' accuracies, linear_auc the ROC AUC of the linear margin\n"
        )
    for kind in ("head", "roi"):
        print(format_table(report["results"], kind))
        print()
    if report["paired"]:
        for kind in ("head", "roi"):
            print(format_table(report["paired"], kind, paired=True))
            print()
    return 0


# ----------------------------------------------------------------------------- --task classification
def _add(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """Add an option unless the parser already has one of its flags (the ``soco-det probe`` command
    defines ``--device``, ``-o/--out`` and ``--seed`` for every task; those are then shared)."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def add_classification_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the classification probe (``soco-det probe --task classification``).

    ``--weights`` may instead come as the probe command's first positional source; ``--train`` /
    ``--val`` are checked by :func:`run_classification` (not ``required``, so they can share a parser with tasks
    that do not need them)."""
    d = LinearEvalSettings()
    _add(
        parser,
        "--weights",
        default=None,
        help="soco-det run folder or checkpoint, an export, an official SoCo checkpoint, a torchvision/timm "
        "ResNet or detector checkpoint (local), or 'random'",
    )
    _add(parser, "--train", default=None, metavar="DIR", help="training ImageFolder (DIR/CLASS/IMAGE)")
    _add(parser, "--val", default=None, metavar="DIR", help="validation ImageFolder with the same classes")
    _add(parser, "-o", "--out", default=None, help="folder for metrics.json and linear.pt")
    _add(parser, "--depth", type=int, default=None, help="ResNet depth (default: read from the weights)")
    _add(parser, "--device", default="auto", help="auto (CUDA if available), cpu, cuda ...")
    _add(parser, "--epochs", type=int, default=d.epochs, help="official: 100")
    _add(parser, "--batch-size", type=int, default=d.batch_size, help="total batch; official: 256")
    _add(parser, "--lr", type=float, default=d.lr, help="SGD learning rate (not scaled); official: 30")
    _add(parser, "--momentum", type=float, default=d.momentum)
    _add(parser, "--weight-decay", type=float, default=d.weight_decay)
    _add(parser, "--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warmup from lr/100; official: 5")
    _add(parser, "--image-size", type=int, default=d.image_size)
    _add(
        parser,
        "--crop-min-scale",
        type=float,
        default=d.crop_min_scale,
        help="RandomResizedCrop scale floor; official: 0.08",
    )
    _add(
        parser,
        "--bn-train-mode",
        action="store_true",
        help="BatchNorm in train mode as the official script (batch statistics, running stats updated)",
    )
    _add(parser, "--num-workers", type=int, default=d.num_workers)
    _add(parser, "--seed", type=int, default=d.seed)
    _add(parser, "--bootstrap", type=int, default=d.bootstrap, help="bootstrap resamples of the top-1 interval")


def run_classification(args: argparse.Namespace) -> int:
    from soco_det.probe.linear_eval import linear_eval

    d = LinearEvalSettings()
    weights = getattr(args, "weights", None) or (getattr(args, "sources", None) or [None])[0]
    if not weights or not getattr(args, "train", None) or not getattr(args, "val", None):
        raise UserError("linear evaluation needs --weights (or a source), --train DIR and --val DIR (ImageFolders)")
    seed = getattr(args, "seed", None)
    resamples = getattr(args, "bootstrap", None) or getattr(args, "resamples", None) or d.bootstrap
    settings = LinearEvalSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        image_size=args.image_size,
        crop_min_scale=args.crop_min_scale,
        bn_train_mode=args.bn_train_mode,
        num_workers=args.num_workers,
        seed=d.seed if seed is None else seed,
        bootstrap=resamples,
    )
    result = linear_eval(
        weights, args.train, args.val, out_dir=args.out, depth=args.depth, device=args.device, settings=settings
    )
    lo, hi = result["top1_ci95"]
    print(
        f"top-1 {100 * result['top1']:.2f}% (95% CI {100 * lo:.2f}-{100 * hi:.2f}) on {result['num_val']} images, "
        f"{result['num_classes']} classes; backbone {result['backbone']}"
    )
    if result["top5"] is not None:
        print(f"top-5 {100 * result['top5']:.2f}%")
    print(json.dumps({k: result[k] for k in ("top1", "top1_ci95", "top5")}))
    return 0


# ----------------------------------------------------------------------------- --task detection
def add_detection_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the frozen-backbone detection probe (``soco-det probe --task detection``)."""
    from soco_det.transfer.frozen_config import HEADS, FrozenSettings

    d = FrozenSettings()
    group = parser.add_argument_group("--task detection")
    group.add_argument("--iterations", type=int, default=d.iterations, help="SGD steps of the RPN and box head")
    group.add_argument(
        "--head",
        choices=HEADS,
        default=d.head,
        help="own: each source's own 4conv1fc box head (SoCo's pretrained one); shared: the same fresh head for all",
    )
    group.add_argument(
        "--ft-seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (paired across sources)"
    )
    group.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[1.0],
        help="fractions of the train images with labels, e.g. 0.2 1 (a seeded subset per fine-tuning seed)",
    )


def run_detection(args: argparse.Namespace) -> int:
    """The frozen-backbone detection probe (``--task detection``)."""
    missing = [f"--{k.replace('_', '-')}" for k in ("train_json", "val_json", "images") if not getattr(args, k)]
    if missing or not args.sources:
        raise UserError(
            f"the detection probe needs sources, --train-json, --val-json and --images (missing: {', '.join(missing) or 'sources'})"
        )
    from soco_det import api
    from soco_det.transfer.frozen import mean_ap

    settings = {"iterations": args.iterations, "head": args.head}
    if args.size is not None:
        settings["size"] = args.size
    report = api.detection_probe(
        args.sources,
        train_json=args.train_json,
        val_json=args.val_json,
        images=args.images,
        out=args.out,
        config=args.config,
        seed=args.seed,
        ft_seeds=args.ft_seeds,
        fractions=args.fractions,
        device=args.device,
        **settings,
    ).report
    print(f"box AP / AP50 (points, mean over fine-tuning seeds {args.ft_seeds}); head: {args.head}")
    for name, result in report["results"].items():
        cells = "  ".join(
            f"{100 * f:g} % labels: {mean_ap(result, f):.2f} / {mean_ap(result, f, 'AP50'):.2f}" for f in args.fractions
        )
        print(f"  {name}: {cells}")
    for pair, by_fraction in report["paired"].items():
        for f, diff in by_fraction.items():
            lo, hi = diff["box_ap"]["ci95"]
            print(
                f"  {pair} ({100 * float(f):g} % labels): box AP {diff['box_ap']['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            )
    return 0
