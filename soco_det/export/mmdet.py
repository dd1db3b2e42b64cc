"""Export to mmdetection: ``torch.save({"state_dict": ..., "meta": ...})``, read by ``load_from``.

SoCo's encoder already has mmdet's ResNet names (= torchvision's) and its neck mmdet's FPN names,
so only the box head is renamed, to mmdet's ``Shared4Conv1FCBBoxHead`` with a norm:

=================================================  ==================================================
soco-det (``online.`` or ``target.``)              mmdetection
=================================================  ==================================================
``encoder.*``                                      ``backbone.*``
``neck.lateral_convs.{i}.conv`` / ``.bn``          ``neck.lateral_convs.{i}.conv`` / ``.bn``
``neck.fpn_convs.{i}.conv`` / ``.bn``              ``neck.fpn_convs.{i}.conv`` / ``.bn``
``head.conv{k}`` / ``head.bn{k}``                  ``roi_head.bbox_head.shared_convs.{k-1}.conv`` / ``.bn``
``head.fc{j}``                                     ``roi_head.bbox_head.shared_fcs.{j-1}``
=================================================  ==================================================

Fine-tune with ``soco_det/configs/mmdet/soco_mask-rcnn_r50_fpn_syncbn_1x_coco.py`` (an
mmdetection 3.x config: ``load_from`` the exported file, SyncBN in backbone, FPN and heads,
``Shared4Conv1FCBBoxHead``). The FPN there has ``num_outs=5``: its extra P6 level is a max-pool
without weights, so it needs nothing from the file. For a C4 or backbone-only source the file has
``backbone.*`` only (mmdet then initialises neck and heads).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from soco_det import __version__
from soco_det.atomic import atomic_save
from soco_det.errors import UserError
from soco_det.export.mapping import Mapping, map_parts
from soco_det.export.source import ExportSource

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mmdet" / "soco_mask-rcnn_r50_fpn_syncbn_1x_coco.py"

_NORM_SUFFIX = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
# Names an export may contain, from mmdet's ResNet, FPN (ConvModule: .conv / .bn) and
# ConvFCBBoxHead (shared_convs / shared_fcs); an independent check of the renaming rules.
VALID_NAME = re.compile(
    r"^(backbone\.(conv1\.weight|bn1\."
    + _NORM_SUFFIX
    + r"|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\."
    + _NORM_SUFFIX
    + r"|downsample\.0\.weight|downsample\.1\."
    + _NORM_SUFFIX
    + r"))"
    + r"|neck\.(lateral_convs|fpn_convs)\.\d+\.(conv\.weight|bn\."
    + _NORM_SUFFIX
    + r")"
    + r"|roi_head\.bbox_head\.(shared_convs\.\d+\.(conv\.weight|bn\."
    + _NORM_SUFFIX
    + r")"
    + r"|shared_fcs\.\d+\.(weight|bias)))$"
)


def rename_head(key: str) -> str | None:
    m = re.match(r"^(conv|bn|fc)(\d+)\.(.+)$", key)
    if m is None:
        return None
    kind, k, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "fc":
        return f"roi_head.bbox_head.shared_fcs.{k - 1}.{rest}"
    return f"roi_head.bbox_head.shared_convs.{k - 1}.{kind}.{rest}"


def map_source(source: ExportSource) -> Mapping:
    """soco-det encoder / neck / head -> mmdetection names (table in the module doc)."""
    net = source.network
    neck_ok = re.compile(r"^(lateral_convs|fpn_convs)\.\d+\.(conv|bn)\.")
    return map_parts(
        [
            ("backbone", f"{net}.encoder.", source.encoder, lambda k: f"backbone.{k}"),
            ("fpn", f"{net}.neck.", source.neck, lambda k: f"neck.{k}" if neck_ok.match(k) else None),
            ("box_head", f"{net}.head.", source.head, rename_head),
        ]
    )


def check_names(mapping: Mapping, source: ExportSource) -> str:
    bad = [k for k in mapping.state_dict if not VALID_NAME.match(k)]
    if bad:
        raise UserError(f"{source.path}: names that are not mmdetection names: {bad[:6]}")
    settings = ["load_from=<this file>"]
    if source.depth != 50:
        settings.append(f"model.backbone.depth={source.depth}")
    if not source.bottleneck:
        settings.append("model.neck.in_channels=[64, 128, 256, 512]")
    return (
        f"all {len(mapping.state_dict)} names are mmdetection ResNet/FPN/Shared4Conv1FCBBoxHead names; "
        f"fine-tune with {CONFIG.name} ({', '.join(settings)})"
    )


def export(source: ExportSource, out: Path, check: bool = True) -> tuple[Mapping, str]:
    """Map ``source``, check the names, write ``{"state_dict", "meta"}`` to ``out``."""
    mapping = map_source(source)
    note = check_names(mapping, source) if check else "not checked"
    payload = {
        "state_dict": mapping.state_dict,
        "meta": {
            "author": "soco-det",
            "soco_det_version": __version__,
            "source": str(source.path),
            "network": source.network,
            "variant": source.variant,
            "depth": source.depth,
        },
    }
    atomic_save(out, lambda f: torch.save(payload, f))
    return mapping, note
