"""Names and shapes of the parts SoCo pretrains in a detectron2 or mmdetection model built from a config.

An export is checked against the model its fine-tuning config builds. Where the framework is
importable, that model is built (:func:`built_shapes`) and its state dict read; otherwise its
layout is derived from the config's keys (:func:`detectron2_layout`, :func:`mmdet_layout`) as the
frameworks' module code builds it (detectron2 ``modeling/backbone/resnet.py``, ``fpn.py``,
``roi_heads/box_head.py``, ``roi_heads.py``::Res5ROIHeads; mmdetection ``ResNet``, ``FPN`` and
``ConvFCBBoxHead`` with mmcv ``ConvModule``). :func:`compare_layout` then checks, part by part, that
every exported tensor has its name and shape in the target and that each exported part is complete.

A layout is ``{name: shape}`` (``()`` for a BatchNorm counter). Configs are read as a detectron2
flattened dict (``{"MODEL.RESNETS.DEPTH": 50, ...}``) and an mmdetection ``model`` dict merged over
the keys of its ``_base_`` that our configs rely on (:data:`MMDET_BASE`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from soco_det.errors import UserError
from soco_det.logs import get_logger

log = get_logger(__name__)

Layout = dict[str, tuple[int, ...]]

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_BN = ("weight", "bias", "running_mean", "running_var")

# detectron2/config/defaults.py values of the keys the layout reads, for a config that omits them.
DETECTRON2_DEFAULTS: dict[str, Any] = {
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.RESNETS.OUT_FEATURES": ["res4"],
    "MODEL.RESNETS.NORM": "FrozenBN",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.FPN.IN_FEATURES": [],
    "MODEL.FPN.OUT_CHANNELS": 256,
    "MODEL.FPN.NORM": "",
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
    "MODEL.ROI_BOX_HEAD.NAME": "",
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": 256,
    "MODEL.ROI_BOX_HEAD.NUM_FC": 0,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.NORM": "",
}
# mmdetection's mask-rcnn_r50_fpn_1x_coco.py (our configs' _base_): the values our configs leave to it.
MMDET_BASE: dict[str, Any] = {
    "backbone": {"stem_channels": 64, "base_channels": 64, "num_stages": 4},
    "neck": {"in_channels": [256, 512, 1024, 2048], "out_channels": 256, "norm_cfg": None},
    "bbox_head": {"in_channels": 256, "conv_out_channels": 256, "fc_out_channels": 1024, "roi_feat_size": 7},
}
MMDET_HEADS = {"Shared4Conv1FCBBoxHead": (4, 1), "Shared2FCBBoxHead": (0, 2)}


# ----------------------------------------------------------------------------- detectron2
def _d2_conv(layout: Layout, prefix: str, shape: tuple[int, ...], norm: str, bias_without_norm: bool) -> None:
    """detectron2 ``Conv2d(..., norm=get_norm(norm))``: BN and SyncBN have a counter, FrozenBN none;
    without a norm the conv has a bias where the module asks for one."""
    layout[f"{prefix}.weight"] = shape
    if norm in ("BN", "SyncBN", "FrozenBN"):
        layout.update({f"{prefix}.norm.{b}": (shape[0],) for b in _BN})
        if norm != "FrozenBN":
            layout[f"{prefix}.norm.num_batches_tracked"] = ()
    elif bias_without_norm:
        layout[f"{prefix}.bias"] = (shape[0],)


def _d2_stage(layout: Layout, owner: str, stage: int, in_ch: int, cfg: Mapping[str, Any]) -> int:
    """Blocks of ``res{stage}`` under ``owner``; returns the stage's output channels."""
    depth, norm = cfg["MODEL.RESNETS.DEPTH"], cfg["MODEL.RESNETS.NORM"]
    factor = 2 ** (stage - 2)
    out = cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] * factor
    groups = cfg["MODEL.RESNETS.NUM_GROUPS"]
    neck = groups * cfg["MODEL.RESNETS.WIDTH_PER_GROUP"] * factor
    for j in range(BLOCKS[depth][stage - 2]):
        p = f"{owner}.res{stage}.{j}"
        if depth >= 50:  # BottleneckBlock
            _d2_conv(layout, f"{p}.conv1", (neck, in_ch, 1, 1), norm, False)
            _d2_conv(layout, f"{p}.conv2", (neck, neck // groups, 3, 3), norm, False)
            _d2_conv(layout, f"{p}.conv3", (out, neck, 1, 1), norm, False)
        else:  # BasicBlock
            _d2_conv(layout, f"{p}.conv1", (out, in_ch, 3, 3), norm, False)
            _d2_conv(layout, f"{p}.conv2", (out, out, 3, 3), norm, False)
        if in_ch != out:
            _d2_conv(layout, f"{p}.shortcut", (out, in_ch, 1, 1), norm, False)
        in_ch = out
    return out


def detectron2_layout(config: Mapping[str, Any]) -> Layout:
    """Layout of the ResNet, FPN, 4conv1fc box head (and C4's ``roi_heads.res5``) of the detectron2
    model a flattened config builds."""
    cfg = {**DETECTRON2_DEFAULTS, **config}
    c4 = cfg["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeads"
    last = max(int(f[3:]) for f in cfg["MODEL.RESNETS.OUT_FEATURES"])  # build_resnet_backbone stops there
    layout: Layout = {}
    stem = cfg["MODEL.RESNETS.STEM_OUT_CHANNELS"]
    _d2_conv(layout, "backbone.bottom_up.stem.conv1", (stem, 3, 7, 7), cfg["MODEL.RESNETS.NORM"], False)
    channels, in_ch = {}, stem
    for stage in range(2, 6):
        if stage <= last:
            in_ch = channels[stage] = _d2_stage(layout, "backbone.bottom_up", stage, in_ch, cfg)
        elif stage == 5 and c4:
            _d2_stage(layout, "roi_heads", 5, in_ch, cfg)
    if cfg["MODEL.BACKBONE.NAME"] == "build_resnet_fpn_backbone":
        out, norm = cfg["MODEL.FPN.OUT_CHANNELS"], cfg["MODEL.FPN.NORM"]
        for feature in cfg["MODEL.FPN.IN_FEATURES"]:
            s = int(feature[3:])
            _d2_conv(layout, f"backbone.fpn_lateral{s}", (out, channels[s], 1, 1), norm, True)
            _d2_conv(layout, f"backbone.fpn_output{s}", (out, out, 3, 3), norm, True)
        if cfg["MODEL.ROI_BOX_HEAD.NAME"] == "FastRCNNConvFCHead" and not c4:
            _d2_box_head(layout, cfg, out)
    return layout


def _d2_box_head(layout: Layout, cfg: Mapping[str, Any], in_ch: int) -> None:
    res, norm = cfg["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"], cfg["MODEL.ROI_BOX_HEAD.NORM"]
    conv_dim, fc_dim = cfg["MODEL.ROI_BOX_HEAD.CONV_DIM"], cfg["MODEL.ROI_BOX_HEAD.FC_DIM"]
    for k in range(1, cfg["MODEL.ROI_BOX_HEAD.NUM_CONV"] + 1):
        _d2_conv(layout, f"roi_heads.box_head.conv{k}", (conv_dim, in_ch, 3, 3), norm, True)
        in_ch = conv_dim
    flat = in_ch * res * res
    for k in range(1, cfg["MODEL.ROI_BOX_HEAD.NUM_FC"] + 1):
        layout[f"roi_heads.box_head.fc{k}.weight"] = (fc_dim, flat)
        layout[f"roi_heads.box_head.fc{k}.bias"] = (fc_dim,)
        flat = fc_dim


# ----------------------------------------------------------------------------- mmdetection
def _mm_conv(layout: Layout, prefix: str, shape: tuple[int, ...], norm_cfg: Mapping | None) -> None:
    """mmcv ``ConvModule``: ``conv`` (bias='auto': none with a norm) and the norm, named ``bn``."""
    layout[f"{prefix}.conv.weight"] = shape
    if norm_cfg:
        layout.update({f"{prefix}.bn.{b}": (shape[0],) for b in _BN})
        layout[f"{prefix}.bn.num_batches_tracked"] = ()
    else:
        layout[f"{prefix}.conv.bias"] = (shape[0],)


def _mm_norm(layout: Layout, prefix: str, channels: int) -> None:
    layout.update({f"{prefix}.{b}": (channels,) for b in _BN})
    layout[f"{prefix}.num_batches_tracked"] = ()


def _mm_backbone(layout: Layout, backbone: Mapping[str, Any]) -> None:
    """mmdet ``ResNet`` (style pytorch, no deep stem): torchvision's names and shapes."""
    b = {**MMDET_BASE["backbone"], **backbone}
    depth, bottleneck = b["depth"], b["depth"] >= 50
    expansion = 4 if bottleneck else 1
    layout["backbone.conv1.weight"] = (b["stem_channels"], 3, 7, 7)
    _mm_norm(layout, "backbone.bn1", b["stem_channels"])
    inplanes = b["stem_channels"]
    for i in range(b["num_stages"]):
        planes = b["base_channels"] * 2**i
        for j in range(BLOCKS[depth][i]):
            p = f"backbone.layer{i + 1}.{j}"
            convs = (
                [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
                if bottleneck
                else [(planes, inplanes, 3), (planes, planes, 3)]
            )
            for c, (cout, cin, k) in enumerate(convs, start=1):
                layout[f"{p}.conv{c}.weight"] = (cout, cin, k, k)
                _mm_norm(layout, f"{p}.bn{c}", cout)
            if j == 0 and (i > 0 or inplanes != planes * expansion):  # stride 2 or another width
                layout[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                _mm_norm(layout, f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion


def mmdet_layout(model: Mapping[str, Any]) -> Layout:
    """Layout of the ResNet, FPN and shared box-head convs/fcs of the mmdetection model ``model``
    (a config's ``model`` dict) builds."""
    layout: Layout = {}
    _mm_backbone(layout, model.get("backbone", {}))
    neck = {**MMDET_BASE["neck"], **model.get("neck", {})}
    out = neck["out_channels"]
    for i, cin in enumerate(neck["in_channels"]):
        _mm_conv(layout, f"neck.lateral_convs.{i}", (out, cin, 1, 1), neck["norm_cfg"])
        _mm_conv(layout, f"neck.fpn_convs.{i}", (out, out, 3, 3), neck["norm_cfg"])
    head = {**MMDET_BASE["bbox_head"], **model.get("roi_head", {}).get("bbox_head", {})}
    convs, fcs = MMDET_HEADS.get(head.get("type"), (head.get("num_shared_convs", 0), head.get("num_shared_fcs", 0)))
    cin = head["in_channels"]
    for i in range(convs):
        _mm_conv(
            layout, f"roi_head.bbox_head.shared_convs.{i}", (head["conv_out_channels"], cin, 3, 3), head.get("norm_cfg")
        )
        cin = head["conv_out_channels"]
    flat = cin * head["roi_feat_size"] ** 2
    for i in range(fcs):
        layout[f"roi_head.bbox_head.shared_fcs.{i}.weight"] = (head["fc_out_channels"], flat)
        layout[f"roi_head.bbox_head.shared_fcs.{i}.bias"] = (head["fc_out_channels"],)
        flat = head["fc_out_channels"]
    return layout


# ----------------------------------------------------------------------------- the framework's own model
def built_shapes(framework: str, config_text: str, suffix: str) -> Layout | None:
    """The state-dict shapes of the model ``framework`` (``detectron2`` or ``mmdet``) builds from a
    config file holding ``config_text``, or ``None`` when the framework is not importable (or cannot
    build it: the derived layout is used then, with a warning)."""
    import tempfile

    builders: dict[str, Callable[[Path], Any]] = {"detectron2": _detectron2_model, "mmdet": _mmdet_model}
    with tempfile.TemporaryDirectory(prefix="soco-det-config-") as folder:
        config = Path(folder) / f"config{suffix}"
        config.write_text(config_text)
        try:
            model = builders[framework](config)
        except ImportError:
            return None
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party builder: use the derived layout
            log.warning(
                "%s could not build a model from the config (%s: %s); checking against the layout its keys give",
                framework,
                type(exc).__name__,
                exc,
            )
            return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _detectron2_model(config: Path) -> Any:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


def _mmdet_model(config: Path) -> Any:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    return MODELS.build(Config.fromfile(str(config)).model)


# ----------------------------------------------------------------------------- comparison
def compare_layout(
    exported: Mapping[str, Any], target: Layout, parts: Sequence[tuple[str, tuple[str, ...]]], where: object, model: str
) -> list[str]:
    """Check ``exported`` (name -> tensor) against the ``target`` layout, part by part.

    ``parts``: ``(part name, name prefixes)``. Every exported tensor must be in the target with the
    same shape; a part the export holds must be complete. Raises :class:`UserError` naming the
    tensors otherwise; returns the parts the export leaves to the framework's initialisation."""
    wrong = [
        f"{k} {tuple(v.shape)} vs {model} {target[k]}"
        for k, v in exported.items()
        if k in target and tuple(v.shape) != target[k]
    ]
    unknown = sorted(k for k in exported if k not in target)
    if wrong or unknown:
        raise UserError(
            f"{where}: does not fit {model}: {len(wrong)} tensors of another shape ({_few(wrong)}), "
            f"{len(unknown)} names it does not have ({_few(unknown)})"
        )
    new = []
    for part, group in parts:
        wanted = {k for k in target if k.startswith(group)}
        have = {k for k in exported if k.startswith(group)}
        if not wanted:
            continue  # a part this model does not have (e.g. res5 in the RoI head of an FPN model)
        if not have:
            new.append(part)
        elif wanted - have:
            raise UserError(f"{where}: the {part} is incomplete for {model}: missing {_few(sorted(wanted - have))}")
    return new


def _few(items: Sequence[str], n: int = 4) -> str:
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------- nested configs
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"A": {"B": 1}}`` -> ``{"A.B": 1}`` (a detectron2 config's keys)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def with_settings(tree: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``tree`` with each dotted key of ``settings`` set (sections created as needed)."""
    import copy

    out = copy.deepcopy(dict(tree))
    for key, value in settings.items():
        node = out
        *sections, last = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = copy.deepcopy(value)
    return out


def config_header(framework: str, weights: str, base: Path, source: str, keys: Sequence[str], train: str) -> str:
    """The comment block a written fine-tuning config starts with: what it is for, where it came
    from, which keys were set for this network and how to train with it."""
    import textwrap

    from soco_det import __version__

    text = (
        f"{framework} fine-tuning config for {weights}, written by `soco-det export` (soco-det {__version__}) "
        f"from soco_det/configs/{base.parent.name}/{base.name} (see its comments) with the widths of {source}. "
        f"Keys set for this network: {', '.join(keys)}."
    )
    lines = textwrap.wrap(text, 98) + [f"Train with e.g.  {train}"]
    return "".join(f"# {line}\n" for line in lines)
