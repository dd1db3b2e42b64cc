"""Sub-commands whose stage is not built yet say so plainly instead of pretending to work."""

from __future__ import annotations

import argparse
from typing import Callable

from soco_det.errors import UserError


def pending(command: str, issue: int) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """``(add_arguments, run)`` for a command that is not available yet."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.description = f"(not available yet: tracked in issue #{issue})"
        parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        raise UserError(f"`soco-det {command}` is not available yet in this version (tracked in issue #{issue})")

    return add_arguments, run
