"""Export to detectron2: the ``.pkl`` its ``DetectionCheckpointer`` reads.

File layout (a pickle)::

    {"model": {name: numpy.ndarray}, "__author__": "soco-det", "matching_heuristics": True}

Unlike the official converters (which wrote short names such as ``res2.0.conv1.weight`` and relied
on detectron2's suffix matching, docs/method.md 7.2), names here are **fully qualified**, so they match
a detectron2 model exactly; ``matching_heuristics`` stays on so that a model whose names differ
slightly (e.g. a wrapped one) still finds them.

=================================================  ==================================================
soco-det (``online.`` or ``target.``)              detectron2
=================================================  ==================================================
``encoder.conv1.weight`` / ``encoder.bn1.*``       ``backbone.bottom_up.stem.conv1.weight`` / ``.conv1.norm.*``
``encoder.layerS.J.convC.weight``                  ``backbone.bottom_up.res{S+1}.J.convC.weight``
``encoder.layerS.J.bnC.*``                         ``backbone.bottom_up.res{S+1}.J.convC.norm.*``
``encoder.layerS.J.downsample.0`` / ``.1``         ``backbone.bottom_up.res{S+1}.J.shortcut`` / ``.shortcut.norm``
``neck.lateral_convs.{i}.conv`` / ``.bn``          ``backbone.fpn_lateral{i+2}`` / ``.norm``
``neck.fpn_convs.{i}.conv`` / ``.bn``              ``backbone.fpn_output{i+2}`` / ``.norm``
``head.conv{k}`` / ``head.bn{k}`` / ``head.fc1``   ``roi_heads.box_head.conv{k}`` / ``.conv{k}.norm`` / ``.fc1``
=================================================  ==================================================

For SoCo_C4, ``layer4`` (res5) is the RoI head, which detectron2's ``Res5ROIHeads`` holds as
``roi_heads.res5.*``; the C4 backbone stops at res4.

BatchNorm buffers: ``running_mean`` and ``running_var`` are exported, and so is
``num_batches_tracked`` (a 0-d int64 array). The shipped configs use ``NORM: SyncBN``, which
detectron2 maps to ``torch.nn.SyncBatchNorm``; that module has a ``num_batches_tracked`` buffer, so
without it every norm would be reported as missing from the checkpoint. A ``FrozenBN`` model has no
such buffer and only logs these keys as unused (harmless), as with the official converters, which
kept them too.

Fine-tune with the config written next to the file (``soco_detectron2.pkl`` ->
``soco_detectron2.yaml``): ``soco_det/configs/detectron2/soco_mask_rcnn_R_50_FPN_1x.yaml`` (or the C4
one) with ``MODEL.WEIGHTS`` set to the file and every key that decides the pretrained parts' shapes
set to this network's values (:func:`target_settings`: ``MODEL.RESNETS.DEPTH`` and
``RES2_OUT_CHANNELS``, ``MODEL.FPN.OUT_CHANNELS``, ``MODEL.ROI_BOX_HEAD.NUM_CONV/CONV_DIM/NUM_FC/
FC_DIM/POOLER_RESOLUTION`` and the norms), so that a ResNet-18 or a narrow tiny-recipe export loads
as well as a ResNet-50. The check compares every exported name and shape with the model that config
builds (:mod:`soco_det.export.layouts`). Heads not in the file (RPN, box predictor, mask head) are
initialised by detectron2. Note ``STRIDE_IN_1X1: False``: SoCo's ResNet has its stride in the 3x3
conv (docs/method.md 3.1).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from soco_det.atomic import atomic_save, atomic_write_text
from soco_det.errors import UserError
from soco_det.export.layouts import (
    built_shapes,
    compare_layout,
    config_header,
    detectron2_layout,
    flatten,
    with_settings,
)
from soco_det.export.mapping import Mapping, TargetExport, config_path, map_parts
from soco_det.export.source import ExportSource
from soco_det.models.maskrcnn import DEFAULT_WIDTHS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "detectron2"
FPN_CONFIG = CONFIG_DIR / "soco_mask_rcnn_R_50_FPN_1x.yaml"
C4_CONFIG = CONFIG_DIR / "soco_mask_rcnn_R_50_C4_1x.yaml"

_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_NORM_SUFFIX = r"(weight|norm\.(weight|bias|running_mean|running_var|num_batches_tracked))"
# Every name an export may contain, written from detectron2's module names (resnet.py, fpn.py,
# box_head.py, roi_heads.py); used as an independent check of the renaming rules.
VALID_NAME = re.compile(
    r"^(backbone\.bottom_up\.stem\.conv1\."
    + _NORM_SUFFIX
    + r"|(backbone\.bottom_up|roi_heads)\.res[2-5]\.\d+\.(conv[1-3]|shortcut)\."
    + _NORM_SUFFIX
    + r"|backbone\.fpn_(lateral|output)[2-5]\."
    + _NORM_SUFFIX
    + r"|roi_heads\.box_head\.conv\d+\."
    + _NORM_SUFFIX
    + r"|roi_heads\.box_head\.fc\d+\.(weight|bias))$"
)


def _conv_and_norm(rest: str) -> str:
    """``bn2.weight`` -> ``conv2.norm.weight``; ``downsample.1.x`` -> ``shortcut.norm.x``."""
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    return re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)


def encoder_renamer(c4: bool):
    """Rule for encoder keys; with ``c4`` the res5 stage goes to ``roi_heads.res5``."""

    def rename(key: str) -> str | None:
        if key.startswith(("conv1.", "bn1.")):
            return "backbone.bottom_up.stem." + _conv_and_norm(key)  # BasicStem: conv1 (+ norm)
        m = _BLOCK_KEY.match(key)
        if m is None:
            return None
        stage, block, rest = int(m.group(1)) + 1, m.group(2), _conv_and_norm(m.group(3))
        owner = "roi_heads" if c4 and stage == 5 else "backbone.bottom_up"
        return f"{owner}.res{stage}.{block}.{rest}"

    return rename


def rename_neck(key: str) -> str | None:
    m = re.match(r"^(lateral_convs|fpn_convs)\.(\d+)\.(conv|bn)\.(.+)$", key)
    if m is None:
        return None
    kind, i, layer, rest = m.groups()
    name = f"fpn_{'lateral' if kind == 'lateral_convs' else 'output'}{int(i) + 2}"
    return f"backbone.{name}.{'norm.' if layer == 'bn' else ''}{rest}"


def rename_head(key: str) -> str | None:
    m = re.match(r"^(conv|bn|fc)(\d+)\.(.+)$", key)
    if m is None:
        return None
    kind, k, rest = m.groups()
    if kind == "bn":
        return f"roi_heads.box_head.conv{k}.norm.{rest}"
    return f"roi_heads.box_head.{kind}{k}.{rest}"


def map_source(source: ExportSource) -> Mapping:
    """soco-det encoder / neck / head -> fully qualified detectron2 names (table in the module doc)."""
    if source.is_c4 and not source.bottleneck:
        raise UserError(
            f"{source.path}: a C4 export needs a bottleneck ResNet (50/101): detectron2's Res5ROIHeads "
            f"builds res5 from bottleneck blocks, and this is a ResNet-{source.depth}"
        )
    net = source.network
    return map_parts(
        [
            (
                "backbone" if not source.is_c4 else "backbone+res5",
                f"{net}.encoder.",
                source.encoder,
                encoder_renamer(source.is_c4),
            ),
            ("fpn", f"{net}.neck.", source.neck, rename_neck),
            ("box_head", f"{net}.head.", source.head, rename_head),
        ]
    )


def to_numpy(value: torch.Tensor) -> np.ndarray:
    """CPU numpy copy; half/bfloat16 become float32 (numpy has no bfloat16)."""
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
        value = value.float()
    return value.numpy().copy()


def check_names(mapping: Mapping, source: ExportSource) -> int:
    """Every exported name is a detectron2 name and each norm has its five tensors; returns the
    number of norm layers."""
    bad = [k for k in mapping.state_dict if not VALID_NAME.match(k)]
    if bad:
        raise UserError(f"{source.path}: names that are not detectron2 names: {bad[:6]}")
    norms = {k.rsplit(".", 1)[0] for k in mapping.state_dict if ".norm." in k}
    incomplete = [
        n
        for n in sorted(norms)
        if any(
            f"{n}.{b}" not in mapping.state_dict
            for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        )
    ]
    if incomplete:
        raise UserError(f"{source.path}: incomplete norm layers (weight/bias/running stats): {incomplete[:6]}")
    return len(norms)


# ----------------------------------------------------------------------------- the fine-tuning config
def base_config(source: ExportSource) -> Path:
    """The shipped config the export's own config starts from: the C4 one for SoCo_C4, else the FPN one."""
    return C4_CONFIG if source.is_c4 else FPN_CONFIG


def target_settings(source: ExportSource, out: Path) -> dict[str, Any]:
    """Every key of the detectron2 config that decides the pretrained parts' names and shapes, for
    ``source`` (its depth, res2 width, FPN width, box-head convs/fcs and norms) and ``out``."""
    base = flatten(yaml.safe_load(base_config(source).read_text()))
    settings: dict[str, Any] = {
        "MODEL.WEIGHTS": os.path.abspath(out),
        "MODEL.RESNETS.DEPTH": source.depth,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": source.res2_channels,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.NORM": base["MODEL.RESNETS.NORM"],
    }
    if source.is_c4:
        return settings
    widths = {**DEFAULT_WIDTHS, **source.widths()}
    convs, fcs = widths["box_conv_dims"], widths["box_fc_dims"]
    if len(set(convs)) > 1 or len(set(fcs)) > 1:
        raise UserError(
            f"{source.path}: box-head convs {list(convs)} / fcs {list(fcs)} of different widths: detectron2's "
            "FastRCNNConvFCHead has one CONV_DIM and one FC_DIM"
        )
    return {
        **settings,
        "MODEL.FPN.OUT_CHANNELS": widths["fpn_channels"],
        "MODEL.FPN.NORM": base["MODEL.FPN.NORM"],
        "MODEL.ROI_BOX_HEAD.NUM_CONV": len(convs),
        "MODEL.ROI_BOX_HEAD.CONV_DIM": convs[0] if convs else base.get("MODEL.ROI_BOX_HEAD.CONV_DIM", 256),
        "MODEL.ROI_BOX_HEAD.NUM_FC": len(fcs),
        "MODEL.ROI_BOX_HEAD.FC_DIM": fcs[0] if fcs else base.get("MODEL.ROI_BOX_HEAD.FC_DIM", 1024),
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": widths["box_roi_size"],
        "MODEL.ROI_BOX_HEAD.NORM": base["MODEL.ROI_BOX_HEAD.NORM"],
    }


def config_text(source: ExportSource, settings: dict[str, Any]) -> str:
    """The shipped config with ``settings`` applied, as YAML, with a header saying where it came from."""
    base = base_config(source)
    tree = with_settings(yaml.safe_load(base.read_text()), settings)
    header = config_header(
        "detectron2",
        Path(settings["MODEL.WEIGHTS"]).name,
        base,
        source.describe(),
        list(settings),
        "python tools/train_net.py --num-gpus 8 --config-file THIS_FILE",
    )
    return header + yaml.dump(tree, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line (``SIZES: [[32], [64]]``), as detectron2's own configs."""


_ConfigDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def check_layout(mapping: Mapping, source: ExportSource, text: str) -> str:
    """Names (:func:`check_names`) and shapes against the detectron2 model the config builds: built by
    detectron2 where it is importable, else the layout derived from the config's keys."""
    norms = check_names(mapping, source)
    target = built_shapes("detectron2", text, ".yaml")
    how = "built by detectron2"
    if target is None:
        target = detectron2_layout(flatten(yaml.safe_load(text)))
        how = "as its keys define it; detectron2 is not installed here"
    parts = [
        ("backbone", ("backbone.bottom_up.",)),
        ("res5 RoI head", ("roi_heads.res5.",)),
        ("FPN", ("backbone.fpn_",)),
        ("box head", ("roi_heads.box_head.",)),
    ]
    new = compare_layout(mapping.state_dict, target, parts, source.path, "the model of the config")
    left = ", ".join(new + ["RPN", "box predictor", "mask head"])
    return (
        f"all {len(mapping.state_dict)} tensors have the names and shapes of the model the config builds ({how}); "
        f"{norms} norm layers with weight, bias, running_mean, running_var, num_batches_tracked; "
        f"detectron2 initialises the {left}"
    )


def export(source: ExportSource, out: Path, check: bool = True) -> TargetExport:
    """Map ``source``, check names and shapes, write the pickle to ``out`` and its config next to it."""
    mapping = map_source(source)
    settings = target_settings(source, out)
    text = config_text(source, settings)
    note = check_layout(mapping, source, text) if check else "not checked"
    payload = {
        "model": {k: to_numpy(v) for k, v in mapping.state_dict.items()},
        "__author__": "soco-det",
        "matching_heuristics": True,
    }
    atomic_save(out, lambda f: pickle.dump(payload, f))
    config = config_path(out, ".yaml")
    atomic_write_text(config, text)
    usage = f"python tools/train_net.py --config-file {config} (MODEL.WEIGHTS is this file)"
    return TargetExport(mapping, note, usage, settings, config)
