"""Mask R-CNN v2 (torchvision's architecture) at any ResNet depth, and its initialisation.

The architecture is torchvision's ``maskrcnn_resnet50_fpn_v2`` with the backbone depth as a
parameter: a ResNet with BatchNorm (nothing frozen, SoCo's ``FREEZE_AT: 0``), an FPN with BN, a
2-conv RPN head, a 4conv1fc box head with BN (the head SoCo pretrains) and a 4-conv mask head with
BN. :func:`build_maskrcnn_v2` is the one definition of the module tree: the exporter
(:mod:`soco_det.export.torchvision`) names its keys after it, fine-tuning and evaluation
(:mod:`soco_det.transfer.model`) build it through :func:`build_maskrcnn` with torchvision's constructor
arguments; the FPN / box-head widths follow the pretrained model (tiny recipes use narrower ones). Under DDP on
CUDA the fine-tuning loop turns every BN into SyncBatchNorm (docs/method.md 7.1).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

DEFAULT_WIDTHS = {"fpn_channels": 256, "box_conv_dims": (256, 256, 256, 256), "box_fc_dims": (1024,), "box_roi_size": 7}


def build_maskrcnn_v2(
    depth: int = 50,
    num_classes: int = 91,
    *,
    fpn_channels: int = 256,
    box_conv_dims: Sequence[int] = (256, 256, 256, 256),
    box_fc_dims: Sequence[int] = (1024,),
    box_roi_size: int = 7,
    trainable_layers: int = 5,
    masks: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """torchvision Mask R-CNN "v2" on a ResNet-``depth`` (18/34/50/101/152), no weights loaded.

    For ``depth=50`` and the default widths this has exactly the modules (names and shapes) of
    ``torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)``:
    BatchNorm2d (not frozen) in the ResNet, FPN P2-P5 (+ max-pool P6) with BatchNorm, a 2-conv RPN
    head, a 4conv1fc box head with BatchNorm and a 4-conv mask head with BatchNorm. The widths
    follow a SoCo model built with other ``fpn_channels`` / ``head_conv_dim`` / ``head_fc_dim`` /
    ``roi_output_size``. ``trainable_layers`` (0-5) freezes the stem and first stages like
    torchvision does (5: everything trains, the SoCo transfer setting ``FREEZE_AT 0``).
    ``kwargs`` go to ``MaskRCNN`` (``min_size``, ``max_size``, ``box_detections_per_img``...).
    ``masks=False`` builds the same network without the mask branch (torchvision's ``FasterRCNN``,
    same names for every other module), for box-only fine-tuning.
    """
    import torchvision
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNConvFCHead, FastRCNNPredictor, RPNHead
    from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    if depth not in (18, 34, 50, 101, 152):
        raise ValueError(f"depth: must be 18, 34, 50, 101 or 152, got {depth}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers: must be in 0..5, got {trainable_layers}")
    body = getattr(torchvision.models, f"resnet{depth}")(weights=None)  # BatchNorm2d throughout
    trainable = ("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable_layers]
    if trainable_layers == 5:
        trainable += ("bn1",)
    for name, param in body.named_parameters():
        if not name.startswith(trainable):
            param.requires_grad_(False)
    c2 = body.layer1[-1].conv1.in_channels if depth < 50 else body.layer1[-1].conv3.out_channels
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[c2 * 2**i for i in range(4)],
        out_channels=fpn_channels,
        norm_layer=nn.BatchNorm2d,
    )
    # torchvision's default FPN anchors: one size per level (P2..P6), three aspect ratios.
    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    box_head = FastRCNNConvFCHead(
        (fpn_channels, box_roi_size, box_roi_size),
        list(box_conv_dims),
        list(box_fc_dims),
        norm_layer=nn.BatchNorm2d,
    )
    box_roi_pool = None
    if box_roi_size != 7:
        box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=box_roi_size, sampling_ratio=2)
    common = dict(
        num_classes=None,  # the predictors are given
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(list(box_fc_dims)[-1], num_classes),
    )
    if not masks:
        return FasterRCNN(backbone, **common, **kwargs)
    mask_dims = [256, 256, 256, 256]
    return MaskRCNN(
        backbone,
        **common,
        mask_head=MaskRCNNHeads(fpn_channels, mask_dims, 1, norm_layer=nn.BatchNorm2d),
        mask_predictor=MaskRCNNPredictor(mask_dims[-1], 256, num_classes),
        **kwargs,
    )


def build_architecture(depth: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """:func:`build_maskrcnn_v2` with the default widths filled in; ``kwargs``: widths
    (``fpn_channels``, ``box_conv_dims``, ``box_fc_dims``, ``box_roi_size``), ``masks`` and
    ``MaskRCNN`` / ``FasterRCNN`` constructor arguments."""
    return build_maskrcnn_v2(depth, num_classes, **{**DEFAULT_WIDTHS, **kwargs})


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
    model = build_architecture(
        depth,
        num_classes,
        min_size=min_size_test,
        max_size=max_size_test,
        image_mean=list(pixel_mean),
        image_std=list(pixel_std),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n[0],
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=rpn_post_nms_top_n[0],
        rpn_post_nms_top_n_test=rpn_post_nms_top_n[1],
        rpn_batch_size_per_image=rpn_batch_size,
        box_batch_size_per_image=roi_batch_size,
        box_detections_per_img=detections_per_img,
        box_score_thresh=score_thresh,
        **widths,
    )
    # torchvision's transform, resizing at inference only (training images arrive resized).
    model.transform = _presized_transform(min_size_test, max_size_test, list(pixel_mean), list(pixel_std))
    return model
