"""Export to torchvision's Mask R-CNN v2 (``maskrcnn_resnet50_fpn_v2`` and its other depths).

torchvision's v2 Mask R-CNN has BatchNorm after every FPN conv and a 4conv1fc box head with
BatchNorm (``FastRCNNConvFCHead``), i.e. the same layers SoCo pretrains, so all three parts load:

=================================================  ================================================
soco-det (``online.`` or ``target.``)              torchvision
=================================================  ================================================
``encoder.{conv1,bn1,layerN}.*``                   ``backbone.body.{conv1,bn1,layerN}.*``
``neck.lateral_convs.{i}.conv.weight`` / ``.bn.*``  ``backbone.fpn.inner_blocks.{i}.0.weight`` / ``.1.*``
``neck.fpn_convs.{i}.conv.weight`` / ``.bn.*``      ``backbone.fpn.layer_blocks.{i}.0.weight`` / ``.1.*``
``head.conv{k}.weight`` / ``head.bn{k}.*``          ``roi_heads.box_head.{k-1}.0.weight`` / ``.1.*``
``head.fc{j}.*``                                    ``roi_heads.box_head.{C+1+2(j-1)}.*`` (C convs; fc1 -> 5)
=================================================  ================================================

FPN index ``i`` is the same on both sides: lateral ``i`` reads C(i+2) and gives P(i+2); the
torchvision backbone returns P2..P5 as ``'0'..'3'`` plus the parameter-free ``'pool'`` level. The
RPN, the box predictor and the mask branch stay newly initialised, and the export **checks** that:
loaded with ``strict=False`` into a freshly built model, nothing is unexpected and the missing keys
are exactly ``rpn.*``, ``roi_heads.box_predictor.*``, ``roi_heads.mask_head.*`` and
``roi_heads.mask_predictor.*`` (plus ``backbone.fpn.*`` / ``roi_heads.box_head.*`` for a source
without neck / head, e.g. C4).

The file is a plain state dict (``torch.save``). torchvision's builders exist for ResNet-50 only
(``maskrcnn_resnet50_fpn_v2``); :func:`soco_det.models.maskrcnn.build_maskrcnn_v2` builds the same
architecture at any depth and width, and the export prints the exact call for its network
(:func:`usage`). To fine-tune::

    from soco_det.export.torchvision import load_torchvision_export
    from soco_det.models.maskrcnn import build_maskrcnn_v2
    model = build_maskrcnn_v2(depth=50, num_classes=81)   # == maskrcnn_resnet50_fpn_v2 for R50
    load_torchvision_export(model, "soco_torchvision.pth")  # checks the exact missing keys

    # a ResNet-18 export of the tiny_cpu recipe (64-channel FPN, 64-channel convs, 256-wide fc):
    model = build_maskrcnn_v2(depth=18, num_classes=11, fpn_channels=64, box_conv_dims=(64, 64, 64, 64),
                              box_fc_dims=(256,), masks=False)  # masks=False: the Faster R-CNN
    load_torchvision_export(model, "soco_tv.pth")

With ``num_classes`` other than 91 the predictors change shape, which does not matter: they are
not in the file. ``soco-det finetune --init FILE`` reads the widths from the file itself.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence
from typing import Mapping as TMapping

import torch
from torch import nn

from soco_det.atomic import atomic_save
from soco_det.errors import UserError
from soco_det.export.mapping import Mapping, TargetExport, map_parts
from soco_det.export.source import ExportSource
from soco_det.models.maskrcnn import DEFAULT_WIDTHS, build_maskrcnn_v2
from soco_det.torch_io import torch_load

# Parts of the Mask R-CNN that SoCo does not pretrain.
NEW_PREFIXES = ("rpn.", "roi_heads.box_predictor.", "roi_heads.mask_head.", "roi_heads.mask_predictor.")
FPN_PREFIX = "backbone.fpn."
BOX_HEAD_PREFIX = "roi_heads.box_head."

_NECK_KEY = re.compile(r"^(lateral_convs|fpn_convs)\.(\d+)\.(conv|bn)\.(.+)$")
_HEAD_KEY = re.compile(r"^(conv|bn|fc)(\d+)\.(.+)$")


# ----------------------------------------------------------------------------- renaming rules
def rename_encoder(key: str) -> str:
    return f"backbone.body.{key}"


def rename_neck(key: str) -> str | None:
    m = _NECK_KEY.match(key)
    if m is None:
        return None
    kind, i, layer, rest = m.groups()
    block = "inner_blocks" if kind == "lateral_convs" else "layer_blocks"
    return f"backbone.fpn.{block}.{i}.{0 if layer == 'conv' else 1}.{rest}"


def head_renamer(head: TMapping[str, Any]):
    """The rule for ``head.*`` keys; it needs the number of convs to place the fc layers."""
    num_convs = sum(1 for k in head if re.fullmatch(r"conv\d+\.weight", k))

    def rename(key: str) -> str | None:
        m = _HEAD_KEY.match(key)
        if m is None:
            return None
        kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "conv":
            return f"roi_heads.box_head.{idx - 1}.0.{rest}"
        if kind == "bn":
            return f"roi_heads.box_head.{idx - 1}.1.{rest}"
        # FastRCNNConvFCHead = [conv blocks..., Flatten, Linear, ReLU, Linear, ReLU, ...]
        return f"roi_heads.box_head.{num_convs + 1 + 2 * (idx - 1)}.{rest}"

    return rename


def map_source(source: ExportSource) -> Mapping:
    """soco-det encoder / neck / head -> torchvision Mask R-CNN names (table in the module doc)."""
    net = source.network
    return map_parts(
        [
            ("backbone", f"{net}.encoder.", source.encoder, rename_encoder),
            ("fpn", f"{net}.neck.", source.neck, rename_neck),
            ("box_head", f"{net}.head.", source.head, head_renamer(source.head)),
        ]
    )


# ----------------------------------------------------------------------------- target model
def target_settings(source: ExportSource) -> dict[str, Any]:
    """The :func:`~soco_det.models.maskrcnn.build_maskrcnn_v2` arguments of the detector that
    ``source`` fits: its depth and its FPN / box-head widths (the defaults for parts it has not)."""
    return {"depth": source.depth, **DEFAULT_WIDTHS, **source.widths()}


def build_target_for(source: ExportSource, masks: bool = True) -> tuple[nn.Module, str]:
    """A fresh Mask R-CNN v2 (``masks=False``: Faster R-CNN v2) shaped like ``source`` and its name.

    Build it under ``torch.device("meta")`` when only names and shapes matter.
    """
    settings = target_settings(source)
    depth, widths = settings.pop("depth"), settings
    if depth == 50 and widths == DEFAULT_WIDTHS:
        from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2

        builder = maskrcnn_resnet50_fpn_v2 if masks else fasterrcnn_resnet50_fpn_v2
        model = builder(weights=None, weights_backbone=None, num_classes=91)
        return model, f"torchvision {builder.__name__}(weights=None, num_classes=91)"
    detail = "".join(f", {k}={v}" for k, v in widths.items() if v != DEFAULT_WIDTHS[k])
    model = build_maskrcnn_v2(depth, 91, masks=masks, **widths)
    return model, f"soco_det build_maskrcnn_v2(depth={depth}{detail}{'' if masks else ', masks=False'})"


def usage(source: ExportSource, out: Path) -> str:
    """How to build the detector the export loads into, as one line of Python."""
    settings = target_settings(source)
    args = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "depth")
    line = (
        f"model = soco_det.models.maskrcnn.build_maskrcnn_v2(depth={source.depth}, num_classes=<classes + 1>, {args})"
        " (masks=False: the Faster R-CNN)"
    )
    if source.depth == 50 and all(settings[k] == v for k, v in DEFAULT_WIDTHS.items()):
        line += (
            ", or torchvision's maskrcnn_resnet50_fpn_v2 / fasterrcnn_resnet50_fpn_v2(weights=None, num_classes=...)"
        )
    return f"{line}; then soco_det.export.torchvision.load_torchvision_export(model, '{out}')"


# ----------------------------------------------------------------------------- loading + check
def expected_missing(model: nn.Module, state_dict: TMapping[str, torch.Tensor]) -> set[str]:
    """The keys of ``model`` that a SoCo export does not provide: the new parts, plus the FPN and
    the box head when ``state_dict`` has none of their keys (a backbone-only export).

    ``num_batches_tracked`` buffers are left out: BatchNorm fills a missing one in itself, so
    recent PyTorch versions never report it as missing.
    """
    prefixes = list(NEW_PREFIXES)
    for part in (FPN_PREFIX, BOX_HEAD_PREFIX):
        if not any(k.startswith(part) for k in state_dict):
            prefixes.append(part)
    return {k for k in model.state_dict() if k.startswith(tuple(prefixes)) and not _is_counter(k)}


def _is_counter(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def load_torchvision_export(
    model: nn.Module,
    exported: str | Path | TMapping[str, torch.Tensor],
    where: object = None,
    assign: bool = False,
) -> list[str]:
    """Load an exported state dict (or its file) into a torchvision Mask R-CNN and verify it.

    Raises :class:`UserError` listing the offending keys when a key is unexpected, has another
    shape, or when the missing keys are not exactly :func:`expected_missing`. Returns the sorted
    missing keys (the newly initialised parameters and buffers, without BatchNorm counters).
    ``assign`` is passed to ``load_state_dict`` (the export's own check uses a model on the meta
    device, where only names and shapes exist).
    """
    if not isinstance(exported, TMapping):
        where = where or exported
        exported = torch_load(exported, what="cannot read the exported state dict")
    where = where or "exported state dict"
    model_state = model.state_dict()
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs model {tuple(model_state[k].shape)}"
        for k, v in exported.items()
        if k in model_state and model_state[k].shape != v.shape
    ]
    if wrong_shape:
        raise UserError(f"{where}: {len(wrong_shape)} tensors do not fit the model: {_few(wrong_shape)}")
    expected = expected_missing(model, exported)
    result = model.load_state_dict(dict(exported), strict=False, assign=assign)
    unexpected = sorted(result.unexpected_keys)
    missing = {k for k in result.missing_keys if not _is_counter(k)}
    if unexpected or missing != expected:
        raise UserError(
            f"{where}: does not load as a SoCo export should: unexpected keys {_few(unexpected)}; "
            f"missing but expected to load {_few(sorted(missing - expected))}; "
            f"loaded but expected to stay new {_few(sorted(expected - missing))}"
        )
    return sorted(missing)


def missing_summary(missing: Iterable[str]) -> str:
    """``rpn.head 8, roi_heads.box_predictor 4, ...``: missing keys counted per module prefix."""
    counts: OrderedDict[str, int] = OrderedDict()
    for key in missing:
        parts = key.split(".")
        prefix = ".".join(parts[:2])
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{p}.* {n}" for p, n in counts.items())


def export(source: ExportSource, out: Path, check: bool = True) -> TargetExport:
    """Map ``source``, check that it loads into a fresh Mask R-CNN v2 and Faster R-CNN v2 of its
    widths, write ``out``."""
    mapping = map_source(source)
    note = "not checked"
    if check:
        # Names and shapes are what the check is about: a meta-device model has them without
        # allocating or initialising a single weight.
        with torch.device("meta"):
            model, name = build_target_for(source)
            boxes_only, _ = build_target_for(source, masks=False)
        missing = load_torchvision_export(model, mapping.state_dict, where=source.path, assign=True)
        load_torchvision_export(boxes_only, mapping.state_dict, where=source.path, assign=True)
        note = (
            f"loads into {name} (and its Faster R-CNN): 0 unexpected keys, 0 shape mismatches, {len(missing)} "
            f"missing keys = exactly the parts the export does not provide ({missing_summary(missing)})"
        )
    atomic_save(out, lambda f: torch.save(mapping.state_dict, f))
    return TargetExport(mapping, note, usage(source, out), target_settings(source))


def _few(items: Sequence[str], n: int = 6) -> str:
    if not items:
        return "none"
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
