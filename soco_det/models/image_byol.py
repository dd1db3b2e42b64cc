"""Image-level BYOL baseline (variant ``image_byol``) for the transfer comparison.

Same ResNet trunk, same batch and interface as SoCo, but each view is one global vector: C5 ->
global average pool -> projector (-> predictor). For every pair (a, b) of ``batch["pairs"]`` (V1
with each other view) the loss is ``-2 cos(p_a, z_b) - 2 cos(p_b, z_a)`` averaged over the batch,
i.e. BYOL without the constant. Boxes and correspondences are ignored.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from soco_det.losses import byol_loss, pair_name
from soco_det.models.backbone import ResNetTrunk
from soco_det.models.config import ModelConfig
from soco_det.models.mlp import MLP
from soco_det.models.soco import MomentumModel, check_batch


class ImageBYOL(MomentumModel):
    """Online ``{encoder, projector}`` + predictor; target ``{encoder, projector}``."""

    def __init__(self, cfg: ModelConfig) -> None:
        encoder = ResNetTrunk(cfg.depth, out="c2c5", zero_init_residual=cfg.zero_init_residual)
        online = {"encoder": encoder, "projector": MLP(encoder.channels[3], cfg.proj_hidden_dim, cfg.proj_dim)}
        super().__init__(cfg, online, MLP(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim))

    def embed(self, net: nn.ModuleDict, image: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` projection of one view (pooled C5)."""
        c5 = net["encoder"](self._prepare(image))[-1]
        return net["projector"](c5.mean(dim=(2, 3)))

    def forward(self, batch: Mapping[str, Any]) -> dict:
        check_batch(batch, 1, need=())
        images, pairs = batch["images"], [tuple(int(v) for v in p) for p in batch["pairs"]]
        views = sorted({v for pair in pairs for v in pair})
        preds = {v: self.predictor(self.embed(self.online, images[v])) for v in views}
        with torch.no_grad():
            targets = {v: self.embed(self.target, images[v]) for v in views}
        pair_losses: dict[str, torch.Tensor] = {}
        for a, b in pairs:
            pair_losses[pair_name(a, b)] = byol_loss(preds[a], targets[b])
            pair_losses[pair_name(b, a)] = byol_loss(preds[b], targets[a])
        return {"loss": torch.stack(list(pair_losses.values())).sum(), "pair_losses": pair_losses}
