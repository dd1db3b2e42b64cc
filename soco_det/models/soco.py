"""The SoCo pretraining model: online and momentum-target networks on object boxes (docs/method.md 3-4).

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
  per-call batches (docs/method.md 3.4, 9.8);
* ``assigned_level``: each box is pooled only on its assigned level and the head runs once per
  (pair, view); rows of other levels are zeros, which ``corr`` never selects.

Calls and BatchNorm (``model.batched_calls``, default on). The official forward makes one call per
(pair, view, level) of the head, projector and predictor, and one backbone/FPN call per view; BN
statistics are per call. With ``batched_calls`` those calls are made as one batched call each, with
segment-wise BatchNorm (:mod:`soco_det.models.segment_bn`): every original call is a segment with
its own statistics, so losses, gradients and running statistics equal those of separate calls up to
float rounding. The backbone/FPN batches consecutive views of the same size (V1 and V2). Either way
the calls (segments) follow the official order, which fixes the running statistics after a step:
sides sorted by (view, pair), i.e. V1-of-pair-12, V1-of-13, V2, V3 (four levels each), online and
then target (docs/method.md 3.4; the official ``SoCo_FPN.forward``).
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
from soco_det.models.segment_bn import bn_segments, convert_segment_bn

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
        # Segment-wise BN is plain BN outside a batched call: same names, buffers and results.
        self.online = convert_segment_bn(nn.ModuleDict(online))
        self.predictor = convert_segment_bn(predictor)
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
        (docs/method.md 3.6, 9.12).
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
                    raise ValueError(
                        f"batch['boxes'][{k}]: both views need the same K, got {k_rows} and {boxes.shape[1]}"
                    )
                k_rows = boxes.shape[1]
        if "levels" in need:
            for s, levels in enumerate(batch["levels"][k]):
                if tuple(levels.shape) != (n_img, k_rows):
                    raise ValueError(
                        f"batch['levels'][{k}][{s}]: expected [{n_img}, {k_rows}], got {list(levels.shape)}"
                    )
        if "corr" in need:
            m = num_levels * k_rows
            if tuple(batch["corr"][k].shape) != (n_img, m, m):
                raise ValueError(
                    f"batch['corr'][{k}]: expected [B, P*K, P*K] = [{n_img}, {m}, {m}] for P={num_levels} "
                    f"levels and K={k_rows}, got {list(batch['corr'][k].shape)} (do the data and model "
                    f"level settings agree?)"
                )


def side_order(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(view, pair, side)`` of every pair side, sorted by (view, pair): the official call order
    (V1 of pair 1-2, V1 of 1-3, V2, V3 for SoCo_FPN; V1-12, V1-13, V1-14, V2, V3, V4 for SoCo*)."""
    return sorted((v, k, s) for k, pair in enumerate(pairs) for s, v in enumerate(pair))


def _split(out: Any, n: int, i: int) -> Any:
    """Segment ``i`` of ``n`` equal segments along dim 0 of a tensor or a list/tuple of tensors."""
    if isinstance(out, torch.Tensor):
        return out.chunk(n)[i]
    return type(out)(t.chunk(n)[i] for t in out)


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
        sides = side_order(pairs)
        views = sorted({v for v, _, _ in sides})
        online = self.embed_sides(
            self.online, self.view_features(self.online, images, views), batch, sides, self.predictor
        )
        with torch.no_grad():
            target = self.embed_sides(self.target, self.view_features(self.target, images, views), batch, sides, None)
        preds = [(online[(k, 0)], online[(k, 1)]) for k in range(len(pairs))]
        targets = [(target[(k, 0)], target[(k, 1)]) for k in range(len(pairs))]
        return self._add_regularisers(self.criterion(pairs, preds, targets, batch["corr"]))

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

    _head_outputs: list = []  # online head outputs of this forward pass, one tensor per call

    def view_features(self, net: nn.ModuleDict, images: Sequence[torch.Tensor], views: Sequence[int]) -> dict:
        """``{view: features(net, image)}`` in view order; with ``batched_calls`` consecutive views of the
        same size go through the backbone in one call, one BN segment per view."""
        groups: list[list[int]] = []
        for v in views:
            if (
                self.cfg.batched_calls
                and self.cfg.batched_backbone
                and groups
                and images[groups[-1][-1]].shape == images[v].shape
                and groups[-1][-1] == v - 1
            ):
                groups[-1].append(v)
            else:
                groups.append([v])
        feats = {}
        for group in groups:
            if len(group) == 1:
                feats[group[0]] = self.features(net, self._prepare(images[group[0]]))
                continue
            with bn_segments([net], len(group)):
                out = self.features(net, self._prepare(torch.cat([images[v] for v in group])))
            for i, v in enumerate(group):
                feats[v] = _split(out, len(group), i)
        return feats

    def embed_sides(
        self,
        net: nn.ModuleDict,
        feats: Mapping[int, Any],
        batch: Mapping[str, Any],
        sides: Sequence[tuple[int, int, int]],
        predictor: nn.Module | None,
    ) -> dict[tuple[int, int], torch.Tensor]:
        """``{(pair, side): [B, P*K, D]}``: one :meth:`embed` per side, in the official order."""
        out = {}
        for v, k, s in sides:
            levels = batch["levels"][k][s] if self.uses_levels else None
            out[(k, s)] = self.embed(
                net, feats[v], batch["boxes"][k][s], levels, tuple(batch["images"][v].shape[-2:]), predictor
            )
        return out

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

    def embed_sides(
        self,
        net: nn.ModuleDict,
        feats: Mapping[int, Any],
        batch: Mapping[str, Any],
        sides: Sequence[tuple[int, int, int]],
        predictor: nn.Module | None,
    ) -> dict[tuple[int, int], torch.Tensor]:
        """``all_levels`` with ``batched_calls``: every (side, level) RoI batch in one head/projector/
        predictor call, one BN segment each, in the official order (side-major, then level)."""
        shapes = {tuple(batch["boxes"][k][s].shape) for _, k, s in sides}
        if self.cfg.roi_mode != "all_levels" or not self.cfg.batched_calls or len(shapes) != 1:
            return super().embed_sides(net, feats, batch, sides, predictor)
        b, k_rows, _ = shapes.pop()
        rois = [
            roi_align_boxes(
                feats[v][p],
                batch["boxes"][k][s],
                tuple(batch["images"][v].shape[-2:]),
                stride,
                self.roi_output_size,
                self.cfg.legacy,
            )
            for v, k, s in sides
            for p, stride in enumerate(self.strides)
        ]
        with bn_segments([net, predictor], len(rois)):
            vec = self.project(net, torch.cat(rois), predictor, segments=len(rois))
        # [side, level, B, K, D] -> [side, B, level*K + row, D] (level-major rows, as ``corr``)
        vec = vec.view(len(sides), self.num_levels, b, k_rows, -1).transpose(1, 2)
        vec = vec.reshape(len(sides), b, self.num_levels * k_rows, -1)
        return {(k, s): vec[i] for i, (_, k, s) in enumerate(sides)}

    def project(
        self, net: nn.ModuleDict, rois: torch.Tensor, predictor: nn.Module | None, segments: int = 1
    ) -> torch.Tensor:
        """RoI features ``[R, C, s, s]`` -> head -> projector (-> predictor): ``[R, D]``; ``segments``
        equal row blocks stand for as many original calls (segment-wise BN, batched calls)."""
        if self.cfg.channels_last:
            rois = rois.contiguous(memory_format=torch.channels_last)
        head = net["head"](rois)
        if net is self.online and self.cfg.head_decorrelation > 0:
            self._head_outputs = [*self._head_outputs, *head.chunk(segments)]
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
                self.project(net, roi_align_boxes(feat, boxes, view_size, stride, roi, legacy), predictor).view(
                    b, k, -1
                )
                for feat, stride in zip(pyramid, self.strides)
            ]
            return torch.cat(per_level, dim=1)
        rois, image, row = pool_assigned_level(pyramid, boxes, levels, view_size, self.strides, roi, legacy)
        if rois.shape[0] == 0:  # no box assigned to any level: nothing can match, nothing to learn
            return boxes.new_zeros(b, self.num_levels * k, self.cfg.proj_dim)
        vec = self.project(net, rois, predictor)
        out = vec.new_zeros(b, self.num_levels * k, vec.shape[-1])
        return out.index_put((image, row), vec)
