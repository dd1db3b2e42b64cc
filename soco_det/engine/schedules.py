"""Per-iteration schedules as pure functions of the global optimizer step (docs/method.md 3.6, 5, 9.11).

The global step ``t`` counts optimizer steps from 0 and is stored in every checkpoint, so a
resumed run continues both schedules exactly where it stopped (the official code restarts the
momentum schedule at tau0 after a resume; docs/method.md 9.11).

* learning rate: ``peak = base_lr * effective_batch / 256``; linear warmup over ``T_w`` steps
  ``peak/m * ((m-1) * t/T_w + 1)`` (m = 100), then a cosine
  ``min_lr + (peak - min_lr) * (1 + cos(pi * t'/T_c)) / 2`` with ``t' = t - T_w``,
  ``T_c = T - T_w``;
* target momentum: ``tau = 1 - (1 - tau0) * (cos(pi * k/K) + 1) / 2`` with ``K = T`` total steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def scaled_lr(base_lr: float, effective_batch: int, denominator: int = 256, rule: str = "linear") -> float:
    """The peak learning rate for a batch: ``base_lr * effective_batch / denominator`` (``linear``,
    the paper's rule) or ``base_lr * sqrt(effective_batch / denominator)`` (``sqrt``)."""
    if rule == "sqrt":
        return base_lr * math.sqrt(effective_batch / denominator)
    if rule != "linear":
        raise ValueError(f"lr scaling rule must be linear or sqrt, got {rule!r}")
    return base_lr * effective_batch / denominator


def learning_rate(
    step: int,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr: float = 1e-6,
    warmup_multiplier: float = 100.0,
) -> float:
    """Learning rate used for the optimizer step taken at global step ``step`` (0-based)."""
    if step < warmup_steps:
        return peak_lr / warmup_multiplier * ((warmup_multiplier - 1) * step / warmup_steps + 1)
    cosine_steps = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, cosine_steps)
    return min_lr + (peak_lr - min_lr) * (1 + math.cos(math.pi * t / cosine_steps)) / 2


def target_momentum(step: int, total_steps: int, tau0: float = 0.99) -> float:
    """EMA momentum of the target network at global step ``step``: tau0 at 0, 1 at ``total_steps``."""
    k = min(step, total_steps)
    return 1 - (1 - tau0) * (math.cos(math.pi * k / max(total_steps, 1)) + 1) / 2


@dataclass(frozen=True)
class Schedule:
    """Both schedules of one run, in optimizer steps."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 1e-6
    warmup_multiplier: float = 100.0
    tau0: float = 0.99

    @classmethod
    def from_config(cls, train, steps_per_epoch: int, effective_batch: int) -> "Schedule":  # noqa: ANN001
        """From a :class:`~soco_det.engine.config.TrainConfig` (``optim`` and ``loop.epochs``) and the
        loader's steps per epoch."""
        optim = train.optim
        return cls(
            peak_lr=scaled_lr(optim.base_lr, effective_batch, optim.lr_batch_denominator, optim.lr_scaling),
            warmup_steps=int(round(optim.warmup_epochs * steps_per_epoch)),
            total_steps=train.loop.epochs * steps_per_epoch,
            min_lr=optim.min_lr,
            warmup_multiplier=optim.warmup_multiplier,
            tau0=optim.target_momentum,
        )

    def lr(self, step: int) -> float:
        return learning_rate(
            step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr, self.warmup_multiplier
        )

    def momentum(self, step: int) -> float:
        return target_momentum(step, self.total_steps, self.tau0)
