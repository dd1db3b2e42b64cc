"""Pictures to check each stage by eye: ``soco-det viz scenes|proposals|views ...``."""

from __future__ import annotations

import argparse
import importlib

# kind -> (module with add_arguments/run, help)
KINDS: dict[str, tuple[str, str]] = {
    "scenes": ("soco_det.synth.viz", "sample scenes with their ground-truth boxes"),
    "proposals": ("soco_det.proposals.viz", "one image with its filtered proposals"),
    "views": ("soco_det.data.viz", "a grid of SoCo views with boxes coloured by proposal id and labelled by level"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from soco_det.cli import HelpFormatter

    sub = parser.add_subparsers(dest="viz_kind", metavar="KIND", required=True)
    for kind, (module_name, help_text) in KINDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(kind, help=help_text, description=help_text, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_viz_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._viz_run(args) or 0)
