"""The untrained network of a pretraining config, as a checkpoint to export.

A fair "random" baseline for pretraining is the same architecture with the same init scheme and seed,
untrained — exactly what the run started from (:func:`soco_det.models.init_model`), not
torchvision's default init: the benchmark and the demo fine-tune from its export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from soco_det.atomic import atomic_save
from soco_det.checkpoint_files import FORMAT
from soco_det.config import to_dict
from soco_det.models import init_model


def save_untrained(cfg: Any, path: str | Path, seed: int | None = None) -> Path:
    """Write a soco-det checkpoint (step 0) of ``init_model(cfg.model, seed)`` to ``path``;
    ``seed`` defaults to ``cfg.seed``. Export it with :func:`soco_det.export.export_checkpoint`."""
    seed = cfg.seed if seed is None else seed
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "model": init_model(cfg.model, seed).state_dict(),
        "step": 0,
        "epoch": 0,
        "config": {**to_dict(cfg), "seed": seed},
    }
    atomic_save(path, lambda f: torch.save(state, f))
    return path
