"""Export a pretrained SoCo network (encoder, FPN, box head) to torchvision, detectron2, mmdet or timm.

Examples::

    soco-det export runs/soco_fpn --to torchvision -o soco_r50_torchvision.pth
    soco-det export ckpt_epoch_400.pth --to detectron2 -o soco_r50.pkl      # official checkpoint
    soco-det export runs/soco_fpn/checkpoints/last.pt --to timm --network target

Prints the key mapping (tensors per group, a few examples) and the result of the check against the
target's layout; exits 2 with one line naming the problem when the source cannot be exported.
An existing output file is refused unless --overwrite (it is then moved aside), and so is any
file of a run folder's own (``-o RUN/checkpoints/last.pt``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        metavar="RUN_OR_CKPT",
        help="run folder (uses checkpoints/last.pt), soco-det checkpoint, or official ckpt_epoch_*.pth",
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=["torchvision", "detectron2", "mmdet", "timm"],
        help="target framework: torchvision Mask R-CNN v2, detectron2 .pkl, mmdetection load_from, "
        "or the backbone alone (timm / torchvision ResNet)",
    )
    parser.add_argument(
        "-o",
        "--out",
        default=None,
        help="output file; if omitted, RUN/export/soco_<to>.<ext> for a run folder, <ckpt>_<to>.<ext> next to "
        "a checkpoint file",
    )
    parser.add_argument(
        "--network",
        default="online",
        choices=["online", "target"],
        help="which network to export: online (what the official converters used) or the momentum target",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip the check against the target layout (not recommended)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output file (it is moved to OUT.old-<time>)"
    )


def run(args: argparse.Namespace) -> int:
    from soco_det.export import default_output, export
    from soco_det.runlock import output_file

    out = args.out if args.out is not None else default_output(args.src, args.to)
    with output_file(out, args.overwrite, "export") as out:
        result = export(args.src, args.to, out, network=args.network, check=not args.no_check)
    print("\n".join(result.summary_lines()))
    print(f"wrote {result.path}")
    return 0
