"""The SoCo pretraining model: online and momentum-target networks on object boxes (SOCO_SPEC 3-4).

``SoCoFPN`` (variants ``soco_fpn`` and ``soco_star``) is ResNet -> FPN (P2..P5) -> RoIAlign 7x7 ->
4conv1fc head -> projector (-> predictor, online only). :class:`MomentumModel` holds what every
variant shares: the online/target registration in one place, the EMA update and the batch checks.

State-dict names (the contract in docs/architecture.md)::

    online.encoder.*  online.neck.*  online.head.*  online.projector.*   predictor.*
    target.encoder.*  target.neck.*  target.head.*  target.projector.*

Box rows and levels. For a view pair (a, b), each side has K box rows. With P levels the
embeddings of a side are ``[B, P*K, D]`` in level-major order (row ``p*K + i`` is box i pooled on
level p), the layout of ``batch["corr"]``:

* ``all_levels`` (default, official): every box is pooled on every level and the head, projector
  and predictor run once per (pair, view, level), so BatchNorm statistics are those of the official
  per-call batches (SOCO_SPEC 3.4, 9.8);
* ``assigned_level``: each box is pooled only on its assigned level and the head runs once per
  (pair, view); rows of other levels are zeros, which ``corr`` never selects.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from soco_det.losses import SoCoLoss, decorrelation_loss
from soco_det.models.backbone import ResNetTrunk
from soco_det.models.box_head import ConvFCHead
from soco_det.models.config import ModelConfig
from soco_det.models.fpn import FPN
from soco_det.models.mlp import MLP
from soco_det.models.roi import pool_assigned_level, roi_align_boxes

FPN_STRIDES = (4, 8, 16, 32)  # P2..P5


class MomentumModel(nn.Module):
    """Online network + predictor, and a momentum copy of the online network (the target).

    ``online`` and ``target`` are ``nn.ModuleDict`` s with the same keys; the target is a deep copy
    taken at construction with ``requires_grad=False`` (no optimizer ever sees it) and only moves
    through :meth:`update_target`. There is no target predictor (BYOL).
    """

    def __init__(self, cfg: ModelConfig, online: Mapping[str, nn.Module], predictor: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.online = nn.ModuleDict(online)
        self.predictor = predictor
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        self.criterion = SoCoLoss()

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(target_params, online_params)`` in matching order (parameters only, no buffers)."""
        target = list(self.target.parameters())
        online = [p for name in self.target for p in self.online[name].parameters()]
        return target, online

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """``theta_k <- momentum * theta_k + (1 - momentum) * theta_q`` for every target parameter.

        One foreach update over all pairs. BatchNorm running statistics are not averaged: the
        target always runs in train mode on batch statistics, as in the official code
        (SOCO_SPEC 3.6, 9.12).
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        target, online = self.momentum_pairs()
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1.0 - momentum)

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last:
            return image.contiguous(memory_format=torch.channels_last)
        return image


def check_batch(batch: Mapping[str, Any], num_levels: int, need: Sequence[str] = ("boxes", "corr")) -> None:
    """Raise ``ValueError`` naming the key when ``batch`` does not follow the documented layout."""
    for key in ("images", "pairs", *need):
        if key not in batch:
            raise ValueError(f"batch has no {key!r} (keys: {sorted(batch)})")
    images, pairs = batch["images"], batch["pairs"]
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("batch['images'] must be a non-empty list of [B, 3, S, S] tensors, one per view")
    n_img = images[0].shape[0]
    for v, img in enumerate(images):
        if img.dim() != 4 or img.shape[1] != 3 or img.shape[0] != n_img:
            raise ValueError(f"batch['images'][{v}]: expected [{n_img}, 3, S, S], got {list(img.shape)}")
    if not pairs:
        raise ValueError("batch['pairs'] is empty")
    for k, pair in enumerate(pairs):
        if len(pair) != 2 or not all(0 <= int(v) < len(images) for v in pair) or pair[0] == pair[1]:
            raise ValueError(f"batch['pairs'][{k}] = {pair!r} does not name two different views of {len(images)}")
    for key in need:
        if len(batch[key]) != len(pairs):
            raise ValueError(f"batch[{key!r}] has {len(batch[key])} entries for {len(pairs)} pairs")
    for k in range(len(pairs)):
        k_rows = None
        if "boxes" in need:
            for s, boxes in enumerate(batch["boxes"][k]):
                if boxes.dim() != 3 or boxes.shape[0] != n_img or boxes.shape[2] != 4:
                    raise ValueError(f"batch['boxes'][{k}][{s}]: expected [{n_img}, K, 4], got {list(boxes.shape)}")
                if k_rows is not None and boxes.shape[1] != k_rows:
                    raise ValueError(f"batch['boxes'][{k}]: both views need the same K, got {k_rows} and {boxes.shape[1]}")
                k_rows = boxes.shape[1]
        if "levels" in need:
            for s, levels in enumerate(batch["levels"][k]):
                if tuple(levels.shape) != (n_img, k_rows):
                    raise ValueError(f"batch['levels'][{k}][{s}]: expected [{n_img}, {k_rows}], got {list(levels.shape)}")
        if "corr" in need:
            m = num_levels * k_rows
            if tuple(batch["corr"][k].shape) != (n_img, m, m):
                raise ValueError(
                    f"batch['corr'][{k}]: expected [B, P*K, P*K] = [{n_img}, {m}, {m}] for P={num_levels} "
                    f"levels and K={k_rows}, got {list(batch['corr'][k].shape)} (do the data and model "
                    f"level settings agree?)"
                )


class BoxModel(MomentumModel):
    """A momentum model whose loss compares box embeddings of view pairs (FPN and C4 variants).

    Subclasses give ``features(net, image)`` (once per view and network) and
    ``embed(net, feats, boxes, levels, view_size, predictor)`` -> ``[B, P*K, D]``.
    """

    num_levels: int = 1

    def forward(self, batch: Mapping[str, Any]) -> dict:
        """``{"loss": fp32 scalar, "pair_losses": {"1-2": ..., "2-1": ...}}`` for a batch (layout in
        docs/architecture.md) already on the model's device."""
        need = ("boxes", "corr", "levels") if self.uses_levels else ("boxes", "corr")
        check_batch(batch, self.num_levels, need)
        images, pairs = batch["images"], [tuple(int(v) for v in p) for p in batch["pairs"]]
        views = sorted({v for pair in pairs for v in pair})
        online_feats = {v: self.features(self.online, self._prepare(images[v])) for v in views}
        with torch.no_grad():
            target_feats = {v: self.features(self.target, self._prepare(images[v])) for v in views}

        preds, targets = [], []
        for k, pair in enumerate(pairs):
            levels = batch["levels"][k] if self.uses_levels else (None, None)
            sides = list(zip(pair, batch["boxes"][k], levels))
            preds.append(tuple(
                self.embed(self.online, online_feats[v], boxes, lev, tuple(images[v].shape[-2:]), self.predictor)
                for v, boxes, lev in sides
            ))
            with torch.no_grad():
                targets.append(tuple(
                    self.embed(self.target, target_feats[v], boxes, lev, tuple(images[v].shape[-2:]), None)
                    for v, boxes, lev in sides
                ))
        out = self.criterion(pairs, preds, targets, batch["corr"])
        return self._add_regularisers(out)

    def _add_regularisers(self, out: dict) -> dict:
        """Add ``model.head_decorrelation`` x the decorrelation of the online head outputs recorded
        during this forward pass (an option off in the paper recipes) as ``aux_losses``."""
        recorded, self._head_outputs = self._head_outputs, []
        weight = getattr(self.cfg, "head_decorrelation", 0.0)
        if weight > 0 and recorded:
            term = decorrelation_loss(recorded)
            out["loss"] = out["loss"] + weight * term
            out["aux_losses"] = {"head_decorrelation": term.detach()}
        return out

    _head_outputs: list = []

    @property
    def uses_levels(self) -> bool:
        return False


class SoCoFPN(BoxModel):
    """SoCo with ResNet + FPN + 4conv1fc box head (variants ``soco_fpn`` and ``soco_star``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        encoder = ResNetTrunk(cfg.depth, out="c2c5", zero_init_residual=cfg.zero_init_residual)
        roi = cfg.resolved_roi_output_size()
        online = {
            "encoder": encoder,
            "neck": FPN(encoder.channels, cfg.fpn_channels),
            "head": ConvFCHead(cfg.fpn_channels, cfg.head_conv_dim, cfg.head_fc_dim, roi),
            "projector": MLP(cfg.head_fc_dim, cfg.proj_hidden_dim, cfg.proj_dim),
        }
        super().__init__(cfg, online, MLP(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim))
        self.num_levels = cfg.num_levels
        self.strides = FPN_STRIDES[: cfg.num_levels]
        self.roi_output_size = roi

    @property
    def uses_levels(self) -> bool:
        return self.cfg.roi_mode == "assigned_level"

    def features(self, net: nn.ModuleDict, image: torch.Tensor) -> list[torch.Tensor]:
        """``[P2..P5]`` of one view: the backbone and FPN run once per view and network."""
        return net["neck"](net["encoder"](image))

    def project(self, net: nn.ModuleDict, rois: torch.Tensor, predictor: nn.Module | None) -> torch.Tensor:
        """RoI features ``[R, C, s, s]`` -> head -> projector (-> predictor): ``[R, D]``."""
        if self.cfg.channels_last:
            rois = rois.contiguous(memory_format=torch.channels_last)
        head = net["head"](rois)
        if net is self.online and self.cfg.head_decorrelation > 0:
            self._head_outputs = [*self._head_outputs, head]
        out = net["projector"](head)
        return predictor(out) if predictor is not None else out

    def embed(
        self,
        net: nn.ModuleDict,
        pyramid: Sequence[torch.Tensor],
        boxes: torch.Tensor,
        levels: torch.Tensor | None,
        view_size: tuple[int, int],
        predictor: nn.Module | None,
    ) -> torch.Tensor:
        """Embeddings ``[B, P*K, D]`` (level-major rows) of the ``[B, K, 4]`` normalised boxes."""
        b, k = boxes.shape[:2]
        roi, legacy = self.roi_output_size, self.cfg.legacy
        if self.cfg.roi_mode == "all_levels":
            per_level = [
                self.project(net, roi_align_boxes(feat, boxes, view_size, stride, roi, legacy), predictor).view(b, k, -1)
                for feat, stride in zip(pyramid, self.strides)
            ]
            return torch.cat(per_level, dim=1)
        rois, image, row = pool_assigned_level(pyramid, boxes, levels, view_size, self.strides, roi, legacy)
        if rois.shape[0] == 0:  # no box assigned to any level: nothing can match, nothing to learn
            return boxes.new_zeros(b, self.num_levels * k, self.cfg.proj_dim)
        vec = self.project(net, rois, predictor)
        out = vec.new_zeros(b, self.num_levels * k, vec.shape[-1])
        return out.index_put((image, row), vec)
