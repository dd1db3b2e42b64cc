"""Box-only fine-tuning: training annotations without segmentation give a Faster R-CNN.

Most labelled detection sets have boxes only. Turning each box into a rectangular mask so that a
Mask R-CNN can train would teach the mask head rectangles and report a meaningless mask AP, so:

* :func:`annotation_kind` reads the training set: ``"masks"`` when every usable (non-crowd,
  non-degenerate) annotation has a segmentation, ``"boxes"`` when none has one; a **mixed** set is
  refused with a :class:`~soco_det.errors.UserError` naming both counts (drop the segmentations
  to train boxes only, or complete them);
* with ``"boxes"`` the fine-tuning builds the same network without its mask branch: torchvision's
  ``FasterRCNN`` with the same ResNet, FPN, RPN, 4conv1fc box head and predictor (and so the same
  state-dict names: a SoCo export loads the same way), and evaluation reports bbox AP only.

A checkpoint records which one it is by its keys (``roi_heads.mask_head.*`` or not), so
``soco-det evaluate`` rebuilds the right model (:func:`has_mask_branch`).
"""

from __future__ import annotations

from typing import Any, Mapping

from soco_det.errors import UserError
from soco_det.logs import get_logger

log = get_logger(__name__)


def _has_segmentation(ann: Mapping[str, Any]) -> bool:
    seg = ann.get("segmentation")
    return bool(seg) and (not isinstance(seg, list) or any(len(poly) >= 6 for poly in seg))


def annotation_kind(dataset: Any) -> str:
    """``"masks"`` or ``"boxes"`` for a :class:`~soco_det.transfer.coco_data.CocoInstances`
    (its images' usable annotations); raises :class:`UserError` for a mixed set."""
    anns = [a for i in dataset.ids for a in dataset.coco.imgToAnns.get(i, []) if dataset._usable(a)]
    with_seg = sum(1 for a in anns if _has_segmentation(a))
    if with_seg == len(anns):
        return "masks"
    if with_seg == 0:
        log.info(
            "%s: no annotation has a segmentation: fine-tuning a box-only Faster R-CNN (bbox AP only)",
            dataset.json_path,
        )
        return "boxes"
    raise UserError(
        f"{dataset.json_path}: {with_seg} of {len(anns)} annotations have a segmentation and "
        f"{len(anns) - with_seg} have none; fine-tuning trains a Mask R-CNN when all have one and a "
        f"box-only Faster R-CNN when none has: remove the segmentations (boxes only) or complete them"
    )


def has_mask_branch(model_or_state: Any) -> bool:
    """Whether a detector (module or state dict) has a mask head; a module that is not a
    torchvision R-CNN (no ``roi_heads.has_mask``) is assumed to predict masks, as before."""
    if isinstance(model_or_state, Mapping):
        return any(k.startswith("roi_heads.mask_head.") for k in model_or_state)
    has_mask = getattr(getattr(model_or_state, "roi_heads", None), "has_mask", None)
    return bool(has_mask()) if callable(has_mask) else True


def iou_types(model: Any) -> tuple[str, ...]:
    """The COCO IoU types a detector can be scored on: ``("bbox", "segm")`` or ``("bbox",)``."""
    return ("bbox", "segm") if has_mask_branch(model) else ("bbox",)
