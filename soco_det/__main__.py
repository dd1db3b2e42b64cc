"""Allows ``python -m soco_det ...`` (and ``torchrun -m soco_det ...``)."""

import sys

from soco_det.commands.main import main

if __name__ == "__main__":
    sys.exit(main())
