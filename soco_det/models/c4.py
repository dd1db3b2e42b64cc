"""SoCo_C4 (docs/method.md 6): RoIAlign on C4, res5 as the RoI head, like detectron2's ``Res5ROIHeads``.

The encoder is the whole ResNet (``online.encoder.layer4`` is res5), so the state dict keeps
torchvision names and the detectron2 C4 export places ``layer4`` in ``roi_heads.res5``. The batch
has one level (P = 1): ``corr`` is ``[B, K, K]`` and ``levels`` is unused.
"""

from __future__ import annotations

import torch
from torch import nn

from soco_det.models.backbone import ResNetTrunk
from soco_det.models.config import ModelConfig
from soco_det.models.mlp import MLP
from soco_det.models.roi import roi_align_boxes
from soco_det.models.soco import BoxModel

C4_STRIDE = 16


class SoCoC4(BoxModel):
    """Online ``{encoder, projector}`` + predictor; target ``{encoder, projector}``."""

    def __init__(self, cfg: ModelConfig) -> None:
        encoder = ResNetTrunk(cfg.depth, out="c4", zero_init_residual=cfg.zero_init_residual)
        online = {"encoder": encoder, "projector": MLP(encoder.channels[3], cfg.proj_hidden_dim, cfg.proj_dim)}
        super().__init__(cfg, online, MLP(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim))
        self.num_levels = 1
        self.roi_output_size = cfg.resolved_roi_output_size()

    def features(self, net: nn.ModuleDict, image: torch.Tensor) -> torch.Tensor:
        """C4 ``[B, C, S/16, S/16]`` of one view."""
        return net["encoder"](image)

    def embed(
        self,
        net: nn.ModuleDict,
        c4: torch.Tensor,
        boxes: torch.Tensor,
        levels: torch.Tensor | None,
        view_size: tuple[int, int],
        predictor: nn.Module | None,
    ) -> torch.Tensor:
        """``[B, K, D]``: RoIAlign 14x14 on C4 -> res5 (-> 7x7) -> average pool -> projector (-> predictor)."""
        b, k = boxes.shape[:2]
        rois = roi_align_boxes(c4, boxes, view_size, C4_STRIDE, self.roi_output_size, self.cfg.legacy)
        rois = self._prepare(rois)
        vec = net["encoder"].layer4(rois).mean(dim=(2, 3))
        out = net["projector"](vec)
        if predictor is not None:
            out = predictor(out)
        return out.view(b, k, -1)
