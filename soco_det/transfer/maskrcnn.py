"""Mask R-CNN v2 (torchvision's architecture) at any ResNet depth, and its initialisation.

The architecture is torchvision's ``maskrcnn_resnet50_fpn_v2`` with the backbone depth as a
parameter: a ResNet with BatchNorm (nothing frozen, SoCo's ``FREEZE_AT: 0``), an FPN with BN, a
2-conv RPN head, a 4conv1fc box head with BN (the head SoCo pretrains) and a 4-conv mask head with
BN. The module tree comes from the exporter's ``build_maskrcnn_v2``, so exported names always fit;
the FPN / box-head widths follow the pretrained model (tiny recipes use narrower ones). Under DDP on
CUDA the fine-tuning loop turns every BN into SyncBatchNorm (SOCO_SPEC 7.1).

Initialisation (``model.init``):

* ``random``: torchvision's default initialisation;
* a torchvision-format export of a SoCo model (``soco-det export --to torchvision``): backbone,
  FPN and box head are loaded; the RPN, the box predictor and the mask branch stay random. The keys
  actually missing are logged and checked against exactly that set;
* a torchvision ResNet classification state dict (e.g. a local ``resnet50-*.pth``): the backbone
  only; its ``fc.*`` classifier is dropped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.torch_io import torch_load

log = get_logger(__name__)

DEFAULT_WIDTHS = {"fpn_channels": 256, "box_conv_dims": (256, 256, 256, 256), "box_fc_dims": (1024,), "box_roi_size": 7}


def build_architecture(depth: int, num_classes: int, **widths: Any) -> nn.Module:
    """The Mask R-CNN v2 module tree, randomly initialised (no hyper-parameters set yet).

    The exporter's builder, so that exports and fine-tuning share one definition of the key names;
    ``widths``: ``fpn_channels``, ``box_conv_dims``, ``box_fc_dims``, ``box_roi_size``.
    """
    from soco_det.export.torchvision import build_maskrcnn_v2

    return build_maskrcnn_v2(depth, num_classes, **{**DEFAULT_WIDTHS, **widths})


def widths_of(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """FPN / box-head widths of a torchvision Mask R-CNN state dict (only those it holds)."""
    widths: dict[str, Any] = {}
    if "backbone.fpn.inner_blocks.0.0.weight" in state:
        widths["fpn_channels"] = int(state["backbone.fpn.inner_blocks.0.0.weight"].shape[0])
    convs, fcs, k = [], [], 0
    while f"roi_heads.box_head.{k}.0.weight" in state:  # conv blocks, then Flatten, then Linear/ReLU pairs
        convs.append(int(state[f"roi_heads.box_head.{k}.0.weight"].shape[0]))
        k += 1
    j = k + 1
    while f"roi_heads.box_head.{j}.weight" in state:
        fcs.append(state[f"roi_heads.box_head.{j}.weight"])
        j += 2
    if convs or fcs:
        widths["box_conv_dims"] = tuple(convs)
        widths["box_fc_dims"] = tuple(int(w.shape[0]) for w in fcs)
        last = convs[-1] if convs else widths.get("fpn_channels", 256)
        widths["box_roi_size"] = math.isqrt(int(fcs[0].shape[1]) // last)
    return widths


def resolve_widths(model_cfg: Any) -> dict[str, Any]:
    """The config's widths with 0/empty filled from the init file (an export) or the defaults."""
    given = {
        "fpn_channels": model_cfg.fpn_channels, "box_conv_dims": tuple(model_cfg.box_conv_dims),
        "box_fc_dims": tuple(model_cfg.box_fc_dims), "box_roi_size": model_cfg.box_roi_size,
    }
    incomplete = not all(given.values())
    from_file = widths_of(read_weights(model_cfg.init)) if incomplete and model_cfg.init != "random" else {}
    return {k: v if v else from_file.get(k, DEFAULT_WIDTHS[k]) for k, v in given.items()}


def _presized_transform(min_size: int, max_size: int, mean: list[float], std: list[float]) -> nn.Module:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class PresizedTrainTransform(GeneralizedRCNNTransform):
        """Normalise and batch; resize only at inference. Training images arrive already resized by
        the data pipeline (multi-scale, seeded per sample), so resizing them again would be wrong."""

        def resize(self, image, target=None):
            if self.training:
                return image, target
            return super().resize(image, target)

    return PresizedTrainTransform(min_size, max_size, list(mean), list(std))


def build_maskrcnn(
    depth: int,
    num_classes: int,
    min_size_test: int = 800,
    max_size_test: int = 1333,
    pixel_mean: list[float] | tuple[float, ...] = (0.485, 0.456, 0.406),
    pixel_std: list[float] | tuple[float, ...] = (0.229, 0.224, 0.225),
    roi_batch_size: int = 512,
    rpn_batch_size: int = 256,
    rpn_pre_nms_top_n: tuple[int, int] = (2000, 1000),
    rpn_post_nms_top_n: tuple[int, int] = (2000, 1000),
    detections_per_img: int = 100,
    score_thresh: float = 0.05,
    **widths: Any,
) -> nn.Module:
    """A randomly initialised Mask R-CNN v2 with the given settings.

    The model takes a list of float32 ``[3, H, W]`` RGB images in ``[0, 1]`` and (training) targets
    as in :mod:`soco_det.transfer.coco_data`; in eval mode it returns, per image, ``boxes`` float32
    ``[N, 4]`` ``x1, y1, x2, y2`` in pixels of the input image, ``labels`` int64 ``[N]`` (1..C),
    ``scores`` float32 ``[N]`` and ``masks`` float32 ``[N, 1, H, W]`` probabilities at the input size.
    ``rpn_*_top_n`` are ``(train, test)`` pairs; ``widths`` as in :func:`build_architecture`.
    """
    model = build_architecture(depth, num_classes, **widths)
    model.transform = _presized_transform(min_size_test, max_size_test, list(pixel_mean), list(pixel_std))
    model.rpn._pre_nms_top_n = {"training": rpn_pre_nms_top_n[0], "testing": rpn_pre_nms_top_n[1]}
    model.rpn._post_nms_top_n = {"training": rpn_post_nms_top_n[0], "testing": rpn_post_nms_top_n[1]}
    model.rpn.fg_bg_sampler.batch_size_per_image = rpn_batch_size
    model.roi_heads.fg_bg_sampler.batch_size_per_image = roi_batch_size
    model.roi_heads.detections_per_img = detections_per_img
    model.roi_heads.score_thresh = score_thresh
    return model


def build_from_config(model_cfg: Any, input_cfg: Any, num_classes: int, masks: bool = True) -> nn.Module:
    """:func:`build_maskrcnn` from a ``FinetuneConfig``'s ``model`` and ``input`` sections (no weights
    loaded; widths left 0/empty in the config are taken from the init file or the defaults).
    ``masks=False``: the box-only Faster R-CNN (:mod:`soco_det.transfer.box_only`)."""
    m = model_cfg
    return build_maskrcnn(
        m.depth,
        num_classes,
        min_size_test=input_cfg.min_size_test,
        max_size_test=input_cfg.max_size_test,
        pixel_mean=input_cfg.pixel_mean,
        pixel_std=input_cfg.pixel_std,
        roi_batch_size=m.roi_batch_size,
        rpn_batch_size=m.rpn_batch_size,
        rpn_pre_nms_top_n=(m.rpn_pre_nms_top_n_train, m.rpn_pre_nms_top_n_test),
        rpn_post_nms_top_n=(m.rpn_post_nms_top_n_train, m.rpn_post_nms_top_n_test),
        detections_per_img=m.detections_per_img,
        score_thresh=m.score_thresh,
        masks=masks,
        **resolve_widths(m),
    )


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as a Mask R-CNN state dict (``backbone.body.*`` etc.).

    Accepts a bare state dict or one under ``model``/``state_dict``; keys of a detection export
    (``backbone.*``, ``roi_heads.*``) are kept, keys of a torchvision ResNet (``conv1.*``,
    ``layer1.*``...) are moved under ``backbone.body.`` and its ``fc.*`` classifier dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: init weights file not found (model.init takes 'random' or a weights file)")
    obj = torch_load(path, what="cannot read weights")
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise UserError(f"{path}: holds no state dict of tensors")
    if any(k.startswith("online.") or k.startswith("target.") for k in state):
        raise UserError(f"{path}: is a SoCo pretraining checkpoint; export it first (soco-det export --to torchvision)")
    if any(k.startswith(("backbone.", "roi_heads.", "rpn.")) for k in state):
        return state
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    raise UserError(f"{path}: keys are neither a torchvision detection export nor a ResNet (first: {sorted(state)[:3]})")


def load_init(model: nn.Module, path: str | Path) -> list[str]:
    """Load a weights file (see :func:`read_weights`) into ``model``; returns the keys left random.

    Checked by :func:`soco_det.export.torchvision.load_torchvision_export`: no key of the file may be
    unexpected or of another shape (a silent partial load would hide a wrong depth or a mis-named
    export), and the keys left random must be exactly the RPN, the box predictor and the mask branch
    (plus the FPN and box head for backbone-only weights). Raises :class:`UserError` otherwise.
    """
    from soco_det.export.torchvision import load_torchvision_export, missing_summary

    missing = load_torchvision_export(model, read_weights(path), where=path)
    log.info("init from %s; left random: %s", path, missing_summary(missing) or "nothing")
    return missing
