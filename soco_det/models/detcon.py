"""DetCon baseline (variant ``detcon``): object-level contrast of mask-pooled backbone features.

After Hénaff et al. 2021 ("Efficient Visual Pretraining with Contrastive Detection"), DetCon_S:
the same ResNet trunk and batch as SoCo; every proposal box of a view pair becomes a mask on that
view's C5 grid (:mod:`soco_det.models.mask_pool`), C5 is averaged over each mask, projected by an
MLP, and an NT-Xent loss (temperature ``model.temperature``, DetCon's 0.1) makes the same proposal
in the other view the positive of each mask and every other mask of the batch, from either view, a
negative (:func:`soco_det.losses.nt_xent_loss`). Both views go through the online network with
gradients (SimCLR, no predictor: ``predictor`` is an identity); the target copy exists only for
the models' common interface and is never read.

Matching uses the proposal ids of ``batch["ids"]``, not ``corr`` (whose FPN levels DetCon has no
use for): a row of view a whose id is also in view b is a positive pair; duplicate rows (the
sampler pads with duplicates) are counted once. How it differs from SoCo: docs/benchmarks.md,
"DetCon baseline".
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from soco_det.losses import nt_xent_loss, pair_name
from soco_det.models.backbone import ResNetTrunk
from soco_det.models.config import ModelConfig
from soco_det.models.mask_pool import box_masks, mask_pool
from soco_det.models.mlp import MLP
from soco_det.models.soco import MomentumModel, check_batch


def matched_rows(ids_a: torch.Tensor, ids_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image, row_a, row_b)`` of every distinct proposal present in both views (``[B, K]`` ids,
    1-based): for each id, its first row in a and its first row in b."""
    k = ids_a.shape[1]
    same = ids_a[:, :, None] == ids_b[:, None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids_a.device).tril(-1)
    duplicate = ((ids_a[:, :, None] == ids_a[:, None, :]) & earlier).any(-1)
    valid = same.any(-1) & ~duplicate & (ids_a > 0)
    first_b = same.to(torch.uint8).argmax(-1)  # the first maximal index: the first matching row
    n, i = valid.nonzero(as_tuple=True)
    return n, i, first_b[n, i]


class DetCon(MomentumModel):
    """Online ``{encoder, projector}``; identity predictor; an unused target copy."""

    def __init__(self, cfg: ModelConfig) -> None:
        encoder = ResNetTrunk(cfg.depth, out="c2c5", zero_init_residual=cfg.zero_init_residual)
        online = {"encoder": encoder, "projector": MLP(encoder.channels[3], cfg.proj_hidden_dim, cfg.proj_dim)}
        super().__init__(cfg, online, nn.Identity())

    def pair_embeddings(
        self, c5: Mapping[int, torch.Tensor], pair: tuple[int, int], boxes: Any, ids: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_a, z_b)`` ``[M, D]``: projections of the M matched masks of one view pair."""
        a, b = pair
        pooled = [
            mask_pool(c5[v], box_masks(boxes[s], *c5[v].shape[-2:]).to(c5[v].device)) for s, v in enumerate((a, b))
        ]
        n, i, j = matched_rows(ids[0], ids[1])
        rows = torch.cat([pooled[0][n, i], pooled[1][n, j]])
        z = self.online["projector"](rows)
        return z[: len(n)], z[len(n) :]

    def forward(self, batch: Mapping[str, Any]) -> dict:
        check_batch(batch, 1, need=("boxes", "ids"))
        images, pairs = batch["images"], [tuple(int(v) for v in p) for p in batch["pairs"]]
        views = sorted({v for pair in pairs for v in pair})
        c5 = {v: self.online["encoder"](self._prepare(images[v]))[-1] for v in views}
        pair_losses: dict[str, torch.Tensor] = {}
        for k, (a, b) in enumerate(pairs):
            z_a, z_b = self.pair_embeddings(c5, (a, b), batch["boxes"][k], batch["ids"][k])
            if z_a.shape[0] < 2:  # nothing to contrast: a zero that keeps the graph
                zero = (z_a.sum() + z_b.sum()).float() * 0.0
                pair_losses[pair_name(a, b)], pair_losses[pair_name(b, a)] = zero, zero
                continue
            l_a, l_b = nt_xent_loss(z_a, z_b, self.cfg.temperature)
            pair_losses[pair_name(a, b)], pair_losses[pair_name(b, a)] = l_a, l_b
        return {"loss": torch.stack(list(pair_losses.values())).sum(), "pair_losses": pair_losses}
