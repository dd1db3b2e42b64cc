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

__all__ = ["ModelConfig", "build_model", "convert_sync_bn", "init_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The pretraining model for ``cfg`` (plain BatchNorm; see :func:`convert_sync_bn`)."""
    import torch

    cfg.validate()
    if cfg.variant in ("soco_fpn", "soco_star"):
        from soco_det.models.soco import SoCoFPN as cls
    elif cfg.variant == "soco_c4":
        from soco_det.models.c4 import SoCoC4 as cls
    elif cfg.variant == "detcon":
        from soco_det.models.detcon import DetCon as cls
    else:
        from soco_det.models.image_byol import ImageBYOL as cls
    model = cls(cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def init_model(cfg: ModelConfig, seed: int) -> nn.Module:
    """The model a run with ``cfg`` and ``seed`` starts from: torch's RNG seeded with ``seed`` right
    before the model is built, so the untrained baseline of a probe or benchmark
    (:mod:`soco_det.probe`) is exactly the network step 1 of the run starts from."""
    import torch

    torch.manual_seed(seed)
    return build_model(cfg)


def convert_sync_bn(model: nn.Module, process_group=None) -> nn.Module:  # noqa: ANN001
    """Every BatchNorm (online, target, predictor) synchronised across processes, as the official runs.

    The layers become :mod:`soco_det.models.segment_bn` modules with ``sync=True``: SyncBatchNorm
    semantics per call *and per segment* of a batched call, over ``torch.distributed`` (gloo on
    CPU, NCCL on CUDA). Call it before wrapping in DDP; parameters and buffers are kept (the same
    objects), so the target/online pairing and state-dict names are unchanged.
    """
    from soco_det.models.segment_bn import convert_segment_bn

    return convert_segment_bn(model, sync=True, process_group=process_group)
