"""Models stage of the SoCo pipeline: backbone, FPN, box head, RoI pooling, online/target networks.

``build_model(cfg)`` returns the pretraining model of ``cfg.variant``. Every variant has the same
interface (docs/architecture.md):

* ``forward(batch) -> {"loss": fp32 scalar, "pair_losses": {"1-2": t, "2-1": t, ...}}``;
* ``update_target(momentum)``: EMA of the target parameters, called by the engine once per step
  before the forward pass;
* ``online`` / ``target`` module dicts and ``predictor``, named as in the state-dict contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from soco_det.models.config import ModelConfig

if TYPE_CHECKING:  # torch is imported lazily so that configs load without it (fast CLI --help)
    from torch import nn

__all__ = ["ModelConfig", "build_model", "convert_sync_bn"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The pretraining model for ``cfg`` (plain BatchNorm; see :func:`convert_sync_bn`)."""
    import torch

    cfg.validate()
    if cfg.variant in ("soco_fpn", "soco_star"):
        from soco_det.models.soco import SoCoFPN as cls
    elif cfg.variant == "soco_c4":
        from soco_det.models.c4 import SoCoC4 as cls
    else:
        from soco_det.models.image_byol import ImageBYOL as cls
    model = cls(cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Every BatchNorm (online, target, predictor) -> ``SyncBatchNorm``, as the official runs.

    Call it for distributed CUDA training before wrapping in DDP; parameters are kept (the same
    ``Parameter`` objects), so the target/online pairing and state-dict names are unchanged.
    """
    from torch import nn

    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
