"""SoCo pretraining of a whole detector (backbone, FPN, box head) from images and their proposals.

    soco-det pretrain --recipe soco_fpn_r50_100ep --images DIR --proposals STORE -o RUN [key=value ...]
    torchrun --nproc_per_node=8 -m soco_det pretrain --recipe ... -o RUN      # one node, 8 GPUs

The recipe (a shipped name or a YAML file) sets every value; ``key=value`` overrides adjust it
(``train.loop.epochs=10 data.batch_size=32 model.roi_mode=assigned_level``); the resolved config is
written to ``RUN/config.yaml``. ``--resume auto`` continues ``RUN`` from its last checkpoint
(exactly: step, schedules, sampler position, RNG), or starts fresh when there is none; a run folder
that holds checkpoints is never started over without ``--overwrite``. Ctrl-C or SIGTERM finishes
the current step and saves a checkpoint first (a second signal exits at once).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        required=True,
        help="shipped recipe name (soco_fpn_r50_100ep, soco_fpn_r50_400ep, soco_star_r50_400ep, "
        "soco_c4_r50_100ep, tiny_cpu) or a YAML file",
    )
    parser.add_argument("--images", help="images root folder (sets data.images; default: the proposal store's root)")
    parser.add_argument("--proposals", help="proposal store from `soco-det proposals` (sets data.proposals)")
    parser.add_argument("-o", "--out", required=True, help="run folder (config.yaml, metrics.jsonl, checkpoints/)")
    parser.add_argument(
        "--resume",
        default=None,
        help="'auto' (the run folder's last checkpoint, if any) or a checkpoint file / run folder",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in a run folder that holds one: the old run is moved to RUN.old-<time>",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="sets train.loop.device (default: the recipe's, auto = CUDA when available)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides with dotted keys, e.g. train.loop.max_steps=2 data.batch_size=2",
    )


def run(args: argparse.Namespace) -> int:
    from soco_det.config import build_config
    from soco_det.engine.config import PretrainConfig
    from soco_det.engine.trainer import NonFiniteLossError, pretrain
    from soco_det.logs import get_logger

    extra: dict = {}
    if args.images is not None:
        extra.setdefault("data", {})["images"] = str(Path(args.images).resolve())
    if args.proposals is not None:
        extra.setdefault("data", {})["proposals"] = str(Path(args.proposals).resolve())
    if args.device is not None:
        extra.setdefault("train", {}).setdefault("loop", {})["device"] = args.device
    cfg = build_config(PretrainConfig, args.recipe, args.overrides, extra=extra)
    sources = []
    if cfg.train.probe.every and os.environ.get("RANK", "0") == "0":  # main process (torchrun sets RANK)
        from soco_det.probe.online import OnlineProbe

        sources.append(OnlineProbe(cfg))
    try:
        out = pretrain(cfg, args.out, resume=args.resume, overwrite=args.overwrite, metric_sources=sources)
    except NonFiniteLossError as exc:
        get_logger(__name__).error("%s", exc)
        return 1
    get_logger(__name__).info("pretraining finished: %s", out)
    return 0
