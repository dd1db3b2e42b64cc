"""Ready-made data sets in the layout of :func:`soco_det.synth.generate`, nothing downloaded.

``prepare(name, out, **options)`` writes ``out/images/<split>/...`` and ``out/<split>.json`` (COCO)
for the splits ``unlabeled``, ``train`` and ``val``, and returns ``{"images", "unlabeled", "train",
"val"}``, so a caller (``benchmarks/transfer.py``, ``soco-det prepare``) takes any of them:

* ``scenes``: the seeded sample scenes at the CPU benchmark's sizes (:mod:`.scenes`);
* ``nuclei``: tiles of a real fluorescence image of cell nuclei with instance masks, shipped by the
  PyPI package ``stardist`` (:mod:`.nuclei`; ``pip install stardist``).

Heavy libraries are imported inside the functions.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from soco_det.errors import UserError

__all__ = ["NAMES", "prepare", "options_of"]

NAMES = ("scenes", "nuclei")


def _function(name: str) -> Callable[..., dict[str, Path]]:
    if name == "scenes":
        from soco_det.datasets.scenes import prepare_scenes

        return prepare_scenes
    if name == "nuclei":
        from soco_det.datasets.nuclei import prepare_nuclei

        return prepare_nuclei
    raise UserError(f"unknown data set {name!r}; choose one of: {', '.join(NAMES)}")


def options_of(name: str) -> list[str]:
    """The keyword options that ``prepare(name, ...)`` accepts."""
    return [p for p in inspect.signature(_function(name)).parameters if p != "out"]


def prepare(name: str, out: str | Path, **options: Any) -> dict[str, Path]:
    """Write data set ``name`` into ``out``; returns its paths (module docstring). An option the set
    does not take is a :class:`UserError` listing those it does."""
    function = _function(name)
    accepted = options_of(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"data set {name!r} takes no option {', '.join(unknown)}; its options: {', '.join(accepted)}")
    return {key: Path(value) for key, value in function(out, **options).items()}
