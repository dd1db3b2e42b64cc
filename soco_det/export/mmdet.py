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

Fine-tune with the config written next to the file (``soco_mmdet.pth`` -> ``soco_mmdet.py``):
``soco_det/configs/mmdet/soco_mask-rcnn_r50_fpn_syncbn_1x_coco.py`` (an mmdetection 3.x config:
SyncBN in backbone, FPN and heads, ``Shared4Conv1FCBBoxHead``) with ``load_from`` set to the file and
this network's depth and widths (:func:`target_settings`: the backbone depth, the FPN's
``in_channels`` and ``out_channels``, the RPN / RoI extractors / mask head that follow the FPN
width, the box head's conv and fc widths and RoI size, the norms). The check compares every
exported name and shape with the model that config builds (:mod:`soco_det.export.layouts`). The FPN
there has ``num_outs=5``: its extra P6 level is a max-pool without weights, so it needs nothing from
the file. For a C4 or backbone-only source the file has ``backbone.*`` only (mmdet then initialises
neck and heads).
"""

from __future__ import annotations

import os
import re
import runpy
import types
from pathlib import Path
from typing import Any

import torch

from soco_det import __version__
from soco_det.atomic import atomic_save, atomic_write_text
from soco_det.errors import UserError
from soco_det.export.layouts import built_shapes, compare_layout, config_header, mmdet_layout, with_settings
from soco_det.export.mapping import Mapping, TargetExport, config_path, map_parts
from soco_det.export.source import ExportSource
from soco_det.models.maskrcnn import DEFAULT_WIDTHS

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


def check_names(mapping: Mapping, source: ExportSource) -> None:
    bad = [k for k in mapping.state_dict if not VALID_NAME.match(k)]
    if bad:
        raise UserError(f"{source.path}: names that are not mmdetection names: {bad[:6]}")


# ----------------------------------------------------------------------------- the fine-tuning config
def shipped_config() -> dict[str, Any]:
    """The top-level names of the shipped config (plain dicts: mmdet is not needed to read it)."""
    values = runpy.run_path(str(CONFIG))
    return {k: v for k, v in values.items() if not k.startswith("__") and not isinstance(v, types.ModuleType)}


def target_settings(source: ExportSource, out: Path) -> dict[str, Any]:
    """Every key of the mmdetection config that decides the pretrained parts' names and shapes, for
    ``source`` (depth, the FPN's input and output widths, the box head's convs/fcs, norms) and ``out``;
    the RPN, RoI extractors and mask head follow the FPN width."""
    base = shipped_config()
    norm = base["norm_cfg"]
    widths = {**DEFAULT_WIDTHS, **source.widths()}
    fpn, convs, fcs = widths["fpn_channels"], widths["box_conv_dims"], widths["box_fc_dims"]
    if len(set(convs)) > 1 or len(set(fcs)) > 1:
        raise UserError(
            f"{source.path}: box-head convs {list(convs)} / fcs {list(fcs)} of different widths: mmdetection's "
            "ConvFCBBoxHead has one conv_out_channels and one fc_out_channels"
        )
    head: dict[str, Any] = (
        {"model.roi_head.bbox_head.type": "Shared4Conv1FCBBoxHead"}
        if (len(convs), len(fcs)) == (4, 1)
        else {
            "model.roi_head.bbox_head.type": "ConvFCBBoxHead",
            "model.roi_head.bbox_head.num_shared_convs": len(convs),
            "model.roi_head.bbox_head.num_shared_fcs": len(fcs),
        }
    )
    r = "model.roi_head."
    return {
        "load_from": os.path.abspath(out),
        "model.backbone.depth": source.depth,
        "model.backbone.norm_cfg": norm,
        "model.neck.in_channels": [source.res2_channels * 2**i for i in range(4)],
        "model.neck.out_channels": fpn,
        "model.neck.norm_cfg": norm,
        "model.rpn_head.in_channels": fpn,
        "model.rpn_head.feat_channels": fpn,
        f"{r}bbox_roi_extractor.out_channels": fpn,
        f"{r}bbox_roi_extractor.roi_layer.output_size": widths["box_roi_size"],
        **head,
        f"{r}bbox_head.in_channels": fpn,
        f"{r}bbox_head.conv_out_channels": convs[0] if convs else 256,
        f"{r}bbox_head.fc_out_channels": fcs[0] if fcs else 1024,
        f"{r}bbox_head.roi_feat_size": widths["box_roi_size"],
        f"{r}bbox_head.norm_cfg": norm,
        f"{r}mask_roi_extractor.out_channels": fpn,
        f"{r}mask_head.in_channels": fpn,
    }


def config_values(settings: dict[str, Any]) -> dict[str, Any]:
    """The shipped config's top-level values with ``settings`` applied."""
    return with_settings(shipped_config(), settings)


def config_text(source: ExportSource, settings: dict[str, Any]) -> str:
    """The shipped config with ``settings`` applied, as an mmdetection (mmengine) Python config."""
    header = config_header(
        "mmdetection 3.x",
        Path(settings["load_from"]).name,
        CONFIG,
        source.describe(),
        list(settings),
        "bash tools/dist_train.sh THIS_FILE 8",
    )
    body = [f"{name} = {python_literal(value)}" for name, value in config_values(settings).items()]
    return header + "\n\n".join(body) + "\n"


def python_literal(value: Any, indent: int = 0) -> str:
    """``value`` (dicts, lists, tuples, scalars) as Python source in mmdetection's style: dicts with
    identifier keys as ``dict(k=v, ...)``, on one line when short, else one item per line."""
    if isinstance(value, dict):
        named = all(isinstance(k, str) and k.isidentifier() for k in value)
        items = [
            f"{k}={python_literal(v, indent + 1)}" if named else f"{k!r}: {python_literal(v, indent + 1)}"
            for k, v in value.items()
        ]
        opening, closing = ("dict(", ")") if named else ("{", "}")
    elif isinstance(value, (list, tuple)):
        items = [python_literal(v, indent + 1) for v in value]
        opening, closing = ("[", "]") if isinstance(value, list) else ("(", ",)" if len(value) == 1 else ")")
    else:
        return repr(value)
    one_line = opening + ", ".join(items) + closing
    if len(one_line) + 4 * indent <= 100 or not items:
        return one_line
    pad = "    " * (indent + 1)
    return opening + "\n" + "".join(f"{pad}{item},\n" for item in items) + "    " * indent + closing


def check_layout(mapping: Mapping, source: ExportSource, settings: dict[str, Any], text: str) -> str:
    """Names and shapes against the mmdetection model the config builds: built by mmdetection where it is
    importable, else the layout derived from the config's keys."""
    check_names(mapping, source)
    target = built_shapes("mmdet", text, ".py")
    how = "built by mmdetection"
    if target is None:
        target = mmdet_layout(config_values(settings)["model"])
        how = "as its keys define it; mmdetection is not installed here"
    parts = [
        ("backbone", ("backbone.",)),
        ("FPN", ("neck.",)),
        ("box head", ("roi_head.bbox_head.shared_",)),
    ]
    new = compare_layout(mapping.state_dict, target, parts, source.path, "the model of the config")
    left = ", ".join(new + ["RPN", "box predictor (fc_cls, fc_reg)", "mask head"])
    return (
        f"all {len(mapping.state_dict)} tensors have the names and shapes of the ResNet/FPN/"
        f"{settings['model.roi_head.bbox_head.type']} the config builds ({how}); mmdetection initialises the {left}"
    )


def export(source: ExportSource, out: Path, check: bool = True) -> TargetExport:
    """Map ``source``, check names and shapes, write ``{"state_dict", "meta"}`` to ``out`` and its config
    next to it."""
    mapping = map_source(source)
    settings = target_settings(source, out)
    text = config_text(source, settings)
    note = check_layout(mapping, source, settings, text) if check else "not checked"
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
    config = config_path(out, ".py")
    atomic_write_text(config, text)
    usage = f"bash tools/dist_train.sh {config} 8 (load_from is this file)"
    return TargetExport(mapping, note, usage, settings, config)
