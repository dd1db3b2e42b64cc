"""The ``soco-det`` command line: one entry point, one sub-command per pipeline stage.

Each sub-command lives in its own module of :mod:`soco_det.commands` exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only lists them, so ``soco-det --help``
stays fast (heavy imports happen inside ``run``).
Errors that are the user's (:class:`~soco_det.errors.UserError`) print one line and exit 2; I/O errors
(disk full, read-only file system, a file where a folder belongs) print one line naming the path and
exit 1; a run stopped by SIGINT/SIGTERM after saving its state exits 128 + the signal.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from soco_det import __version__
from soco_det.errors import Interrupted, UserError
from soco_det.logs import get_logger, setup_logging

# name -> (module, one-line help). Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("soco_det.commands.synth", "generate the seeded sample-scene dataset (images + COCO JSON)"),
    "prepare": ("soco_det.commands.prepare", "write a ready-made data set: sample scenes or real nuclei (no download)"),
    "proposals": ("soco_det.commands.proposals", "selective-search proposals: compute, merge, import, export"),
    "views": ("soco_det.commands.views", "check the views: FPN levels and sizes of the boxes in each view"),
    "pretrain": ("soco_det.commands.pretrain", "SoCo pretraining (one CPU to many GPUs with torchrun)"),
    "export": ("soco_det.commands.export", "export a pretrained model to torchvision/detectron2/mmdet/timm"),
    "probe": (
        "soco_det.commands.probe",
        "object-level probe of frozen features (linear, k-NN, localisation, retrieval, rank)",
    ),
    "finetune": ("soco_det.commands.finetune", "fine-tune a Mask R-CNN on a COCO-format dataset"),
    "evaluate": ("soco_det.commands.evaluate", "COCO bbox/segm AP of a Mask R-CNN on a val set"),
    "viz": ("soco_det.commands.viz", "pictures: sample scenes, proposals, views, a detector's predictions"),
    "demo": ("soco_det.commands.demo", "the whole pipeline on the sample scenes, on CPU, with a report"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless it is None/False or the help text already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soco-det",
        description="SoCo: object-level contrastive pretraining of a whole detector from unlabeled images.",
    )
    parser.add_argument("--version", action="version", version=f"soco-det {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip().splitlines()[0],
            formatter_class=HelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def normalize_argv(argv: list[str]) -> list[str]:
    """``argv`` with the command's own ``normalize_argv(words)`` (if its module has one) applied to the words after
    the command name: how ``soco-det proposals IMAGES -o STORE`` means ``soco-det proposals compute ...``."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # the global options: --log-level LEVEL, --version, -h
        i += 2 if argv[i] == "--log-level" else 1
    if i < len(argv) and argv[i] in COMMANDS:
        normalize = getattr(importlib.import_module(COMMANDS[argv[i]][0]), "normalize_argv", None)
        if normalize is not None:
            return [*argv[: i + 1], *normalize(argv[i + 1 :])]
    return list(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else list(argv)))
    setup_logging(args.log_level)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        get_logger(__name__).debug("user error", exc_info=True)
        print(f"soco-det {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"soco-det {args.command}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        logging.getLogger("soco_det").warning("interrupted")
        return 130
    except OSError as exc:
        # Disk full, read-only or missing folders, a file where a folder is expected: one line, with the path.
        get_logger(__name__).debug("I/O error", exc_info=True)
        print(f"soco-det {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason`` for an I/O error (``PATH -> PATH2`` for a rename), with a hint for a full disk."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += " (free some space or write elsewhere; finished checkpoints and results are kept)"
    return f"{where}: {reason}" if where else reason


if __name__ == "__main__":
    sys.exit(main())
