"""Settings of the probes that are not a pretraining config: the linear evaluation's recipe.

Kept apart from :mod:`soco_det.probe.linear_eval` so that the command line can show the defaults
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from soco_det.errors import UserError


@dataclass
class LinearEvalSettings:
    """The recipe; defaults are the official ``main_linear.py`` values (module docstring)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 30.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 5.0
    warmup_multiplier: float = 100.0
    min_lr: float = 1e-6
    image_size: int = 224
    crop_min_scale: float = 0.08
    bn_train_mode: bool = False
    num_workers: int = 4
    seed: int = 0
    bootstrap: int = 1000

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 8:
            raise UserError("linear eval: epochs and batch_size must be >= 1 and image_size >= 8")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise UserError("linear eval: lr must be > 0, momentum in [0, 1), weight_decay >= 0")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(f"linear eval: warmup_epochs must lie in [0, epochs={self.epochs})")
        if not 0 < self.crop_min_scale <= 1:
            raise UserError("linear eval: crop_min_scale must lie in (0, 1]")
