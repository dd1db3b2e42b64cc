"""The fine-tuning detector: a Mask R-CNN (or box-only Faster R-CNN) built from a ``FinetuneConfig``
and initialised from ``model.init``.

The architecture is :mod:`soco_det.models.maskrcnn`'s (torchvision's v2 Mask R-CNN at any depth);
this module reads the fine-tuning config into it and loads the starting weights.

Initialisation (``model.init``):

* ``random``: torchvision's default initialisation;
* a torchvision-format export of a SoCo model (``soco-det export --to torchvision``): backbone,
  FPN and box head are loaded; the RPN, the box predictor and the mask branch stay random. The keys
  actually missing are logged and checked against exactly that set;
* a torchvision ResNet classification state dict (e.g. a local ``resnet50-*.pth``): the backbone
  only; its ``fc.*`` classifier is dropped.
* a SoCo pretraining run folder, its checkpoint or an official ``ckpt_epoch_*.pth``: exported in
  memory, as ``soco-det export --to torchvision`` would (online network);
* ``untrained:RUN``: the network that pretraining run started from (same init scheme and seed),
  exported in memory the same way: the paired baseline of ``RUN``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from soco_det.errors import UserError
from soco_det.export.source import load_source
from soco_det.export.torchvision import load_torchvision_export, map_source, missing_summary
from soco_det.logs import get_logger
from soco_det.models.maskrcnn import DEFAULT_WIDTHS, build_maskrcnn, widths_of
from soco_det.torch_io import check_finite, torch_load
from soco_det.transfer.untrained_init import is_untrained_init, untrained_weights

log = get_logger(__name__)


def resolve_widths(model_cfg: Any) -> dict[str, Any]:
    """The config's widths with 0/empty filled from the init file (an export) or the defaults."""
    given = {
        "fpn_channels": model_cfg.fpn_channels,
        "box_conv_dims": tuple(model_cfg.box_conv_dims),
        "box_fc_dims": tuple(model_cfg.box_fc_dims),
        "box_roi_size": model_cfg.box_roi_size,
    }
    incomplete = not all(given.values())
    from_file = widths_of(read_weights(model_cfg.init)) if incomplete and model_cfg.init != "random" else {}
    return {k: v if v else from_file.get(k, DEFAULT_WIDTHS[k]) for k, v in given.items()}


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
    """The tensors of ``model.init`` as a Mask R-CNN state dict (``backbone.body.*`` etc.).

    Accepts a bare state dict or one under ``model``/``state_dict``: keys of a detection export
    (``backbone.*``, ``roi_heads.*``; also a fine-tuning checkpoint) are kept, keys of a torchvision
    ResNet (``conv1.*``, ``layer1.*``...) are moved under ``backbone.body.`` and its ``fc.*``
    classifier dropped. A SoCo pretraining run folder, its checkpoint or an official
    ``ckpt_epoch_*.pth`` is exported in memory, as ``soco-det export --to torchvision`` would
    (online network); ``untrained:RUN`` is the network that run started from
    (:mod:`soco_det.transfer.untrained_init`).
    """
    if is_untrained_init(path):
        return untrained_weights(path)
    path = Path(path)
    if path.is_dir():
        return _pretrained_weights(path)
    if not path.is_file():
        raise UserError(
            f"{path}: init weights not found (model.init takes 'random', a weights file, or a soco-det "
            "run folder / checkpoint)"
        )
    obj = torch_load(path, what="cannot read weights")
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not state:
        raise UserError(f"{path}: holds no state dict of tensors")
    if any(k.startswith(("online.", "target.", "module.encoder.", "encoder.")) for k in state):
        return _pretrained_weights(path)
    if any(k.startswith(("backbone.", "roi_heads.", "rpn.")) for k in state):
        return state
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return {f"backbone.body.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    raise UserError(
        f"{path}: keys are neither a torchvision detection export nor a ResNet nor a SoCo checkpoint "
        f"(first: {sorted(state)[:3]})"
    )


def _pretrained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The torchvision export of a SoCo run folder / checkpoint / official checkpoint, in memory."""
    source = load_source(path)
    log.info(
        "init from %s (%s %s, online network), exported to torchvision names",
        source.path,
        source.origin,
        source.variant,
    )
    return map_source(source).state_dict


def load_init(model: nn.Module, path: str | Path) -> list[str]:
    """Load a weights file (see :func:`read_weights`) into ``model``; returns the keys left random.

    Checked by :func:`soco_det.export.torchvision.load_torchvision_export`: no key of the file may be
    unexpected or of another shape (a silent partial load would hide a wrong depth or a mis-named
    export), and the keys left random must be exactly the RPN, the box predictor and the mask branch
    (plus the FPN and box head for backbone-only weights). Raises :class:`UserError` otherwise.
    """
    weights = read_weights(path)
    check_finite(weights, f"model.init: {path}")
    missing = load_torchvision_export(model, weights, where=path)
    log.info("init from %s; left random: %s", path, missing_summary(missing) or "nothing")
    return missing
