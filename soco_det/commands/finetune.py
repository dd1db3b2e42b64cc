"""Fine-tune a Mask R-CNN (torchvision v2 architecture) on a COCO-format dataset, from random init or a SoCo export.

Examples::

    soco-det finetune --train-json train.json --train-images imgs --val-json val.json --val-images imgs \\
        --init export/torchvision.pth -o runs/ft                          # recipe finetune_1x
    soco-det finetune ... --recipe finetune_tiny_cpu -o runs/ft solver.iterations=100 model.depth=18
    soco-det finetune ... --init untrained:runs/soco -o runs/ft_base   # the network runs/soco started from
    soco-det finetune ... --threads 1 -o runs/ft                         # a shared machine: one thread
    soco-det finetune -o runs/ft --resume                                  # continue (reads runs/ft/config.yaml)
    soco-det finetune ... -o runs/ft --overwrite                           # start over; old run -> runs/ft.old-<time>
    torchrun --nproc_per_node 8 -m soco_det.commands.main finetune ...               # DDP, SyncBN on CUDA
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-json", help="COCO instances JSON of the training set")
    parser.add_argument("--train-images", help="folder the training JSON's file_names are relative to")
    parser.add_argument("--val-json", help="COCO instances JSON of the evaluation set")
    parser.add_argument("--val-images", help="folder the val JSON's file_names are relative to")
    parser.add_argument(
        "--init",
        help="'random' (torchvision's init), 'untrained:RUN' (the network the pretraining run RUN, a folder "
        "or its config.yaml, started from: same init scheme and seed, the fair baseline of RUN), a soco-det "
        "pretraining run folder or checkpoint, an official SoCo checkpoint, a `soco-det export --to "
        "torchvision` file, or a torchvision ResNet weights file",
    )
    parser.add_argument(
        "-o", "--out", required=True, help="run folder (checkpoints, metrics.jsonl, config.yaml, metrics.json)"
    )
    parser.add_argument(
        "--recipe",
        default=None,
        help="recipe name (finetune_1x, finetune_tiny_cpu) or YAML file; default finetune_1x, "
        "or the run folder's config.yaml with --resume",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its newest intact checkpoint (as pretrain's --resume auto)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a run folder that holds one: the old run is moved to OUT.old-<time>",
    )
    parser.add_argument("--device", default=None, help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (config cpu_threads; default: torch's, one per core). On a machine shared "
        "with other jobs use 1 per process: extra threads only spin-wait there",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. solver.iterations=500 model.depth=18"
    )


def run(args: argparse.Namespace) -> int:
    from soco_det import api
    from soco_det.engine.loop import NonFiniteLossError
    from soco_det.logs import get_logger

    try:
        api.finetune(
            args.out,
            init=args.init,
            train_json=args.train_json,
            train_images=args.train_images,
            val_json=args.val_json,
            val_images=args.val_images,
            recipe=args.recipe,
            overrides=args.overrides,
            resume=args.resume,
            overwrite=args.overwrite,
            device=args.device,
            threads=args.threads,
        )
    except NonFiniteLossError as exc:
        get_logger(__name__).error("%s", exc)
        return 1
    return 0
