"""COCO box and mask AP (AP, AP50, AP75, APs/m/l) of a fine-tuned Mask R-CNN on a COCO-format val set.

Example::

    soco-det evaluate runs/ft/checkpoints/last.pt --json val.json --images imgs -o runs/ft/eval_val

CKPT is a `soco-det finetune` checkpoint or run folder. Writes OUT/metrics.json (fractions; null
where the val set has no object of a size range) and the COCO results OUT/{bbox,segm}_results.json,
holding OUT's lock. OUT is refused if it is a run folder (or among a run's own files), and if it
holds an earlier evaluation's results unless --overwrite (they are moved aside).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="fine-tuning checkpoint (.pt) or run folder")
    parser.add_argument("--json", required=True, help="COCO instances JSON of the evaluation set")
    parser.add_argument("--images", required=True, help="folder the JSON's file_names are relative to")
    parser.add_argument(
        "-o",
        "--out",
        required=True,
        help="output folder for metrics.json and the COCO results (its own folder: never a run folder, whose "
        "metrics.json is the run's final result)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of an earlier evaluation in OUT (they are moved to OUT.old-<time>)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate the first N images only (0 = all)")


def run(args: argparse.Namespace) -> int:
    from soco_det.runlock import output_folder
    from soco_det.transfer import evaluate
    from soco_det.transfer.evaluation import RESULT_FILES, format_metrics

    with output_folder(args.out, RESULT_FILES, args.overwrite, "evaluation folder") as out:
        metrics = evaluate(
            args.checkpoint,
            args.json,
            args.images,
            out,
            device=args.device,
            batch_size=args.batch_size,
            max_images=args.max_images,
        )
    print(format_metrics(metrics).replace("; ", "\n"))
    return 0
