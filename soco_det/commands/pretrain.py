"""SoCo pretraining of a whole detector (backbone, FPN, box head) from images and their proposals.

    soco-det pretrain --recipe soco_fpn_r50_100ep --images DIR --proposals STORE -o RUN [key=value ...]
    torchrun --nproc_per_node=8 -m soco_det pretrain --recipe ... -o RUN      # one node, 8 GPUs

The recipe (a shipped name or a YAML file) sets every value; ``key=value`` overrides adjust it
(``train.loop.epochs=10 data.batch_size=32 model.roi_mode=assigned_level``); the resolved config is
written to ``RUN/config.yaml``. ``--resume auto`` continues ``RUN`` from its last checkpoint
(exactly: step, schedules, sampler position, RNG), or starts fresh when there is none; a run folder
that holds checkpoints is never started over without ``--overwrite``. Ctrl-C or SIGTERM finishes
the current step and saves a checkpoint first (a second signal exits at once).

The logged ``loss`` is negative by design: it sums one term ``-2 cos(prediction, target)`` per view
pair and direction (docs/method.md 4), BYOL's ``2 - 2 cos`` without its constant, so each term lies
in [-2, 2] and the sum's minimum is -2 x the number of terms (-8 for the three views of SoCo_FPN).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from soco_det.errors import UserError

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")

LOSS_HELP = (
    "The logged loss is negative by design: one term -2 cos(online prediction, target projection) per view pair "
    "and direction, averaged over the matched boxes (BYOL's 2 - 2 cos without its constant 2), so each term lies in "
    "[-2, 2] and 0 means unrelated features. The total sums the terms: with SoCo_FPN's three views (pairs V1-V2 and "
    "V1-V3, both ways) it ends near its minimum of -8 when every matched box agrees; loss/1-2 etc. are the terms."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = LOSS_HELP
    parser.add_argument(
        "--recipe",
        required=True,
        help="shipped recipe name (soco_fpn_r50_100ep, soco_fpn_r50_400ep, soco_star_r50_400ep, "
        "soco_c4_r50_100ep, tiny_cpu) or a YAML file",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        metavar="IMAGES",
        help="images root folder, or the inputs `soco-det proposals` took: archives, patterns such as "
        "'shards/shard-{000..009}.tar', .txt list files (sets data.images; default: the proposal store's root)",
    )
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
    from soco_det import api
    from soco_det.engine.trainer import NonFiniteLossError
    from soco_det.logs import get_logger

    images = None
    if args.images is not None:
        # `--images DIR train.loop.max_steps=2`: --images takes several words, so overrides right after it land there
        overrides = [w for w in args.images if _OVERRIDE.match(w) and not Path(w).exists()]
        args.overrides = overrides + list(args.overrides)
        images = [p for p in args.images if p not in overrides]
        if not images:
            raise UserError("--images: no images given (only key=value overrides)")
    try:
        result = api.pretrain(
            images[0] if images and len(images) == 1 else images,
            args.proposals,
            args.out,
            recipe=args.recipe,
            overrides=args.overrides,
            resume=args.resume,
            overwrite=args.overwrite,
            device=args.device,
        )
    except NonFiniteLossError as exc:
        get_logger(__name__).error("%s", exc)
        return 1
    get_logger(__name__).info("pretraining finished: %s", result.path)
    return 0
