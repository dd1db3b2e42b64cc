"""Data stage of the SoCo pipeline: image sources, the view sampler, level assignment, the dataset.

``build_pretrain_dataset(cfg, seed)`` and ``collate_views(samples)`` are the interface the engine
uses (docs/architecture.md). They are imported lazily so that ``soco-det --help`` (which imports
``soco_det.data.viz``) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataConfig", "ViewsConfig", "build_pretrain_dataset", "collate_views", "PretrainDataset", "ViewSampler"]


def __getattr__(name: str) -> Any:
    if name in ("DataConfig", "ViewsConfig"):
        from soco_det.data import config

        return getattr(config, name)
    if name in ("build_pretrain_dataset", "collate_views", "PretrainDataset"):
        from soco_det.data import dataset

        return getattr(dataset, name)
    if name == "ViewSampler":
        from soco_det.data.sampler import ViewSampler

        return ViewSampler
    raise AttributeError(f"module 'soco_det.data' has no attribute {name!r}")
