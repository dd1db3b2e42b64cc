"""Engine stage: the SoCo pretraining loop, LARS, schedules, checkpoints and distributed set-up.

``pretrain(cfg, out_dir, resume=None)`` trains a :class:`PretrainConfig` into a run folder.
Imports are lazy so that the CLI can list commands without importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["pretrain", "PretrainConfig", "TrainConfig"]


def __getattr__(name: str) -> Any:
    if name in ("PretrainConfig", "TrainConfig"):
        from soco_det.engine import config

        return getattr(config, name)
    if name == "pretrain":
        from soco_det.engine.trainer import pretrain

        return pretrain
    raise AttributeError(f"module 'soco_det.engine' has no attribute {name!r}")
