"""Read the network to export from a soco-det checkpoint, a run folder or an official checkpoint.

Accepted sources (docs/architecture.md, "Checkpoint format"):

* a soco-det checkpoint (``{"format": "soco-det/1", "model": ..., "config": ...}``);
* a run folder, meaning its ``checkpoints/last.pt``;
* an official SoCo ``ckpt_epoch_*.pth`` (``{"model": {"module.encoder.*": ...}, ...}``), renamed
  by :func:`soco_det.models.official.load_official_state_dict`.

Only the detector parts are exported: the encoder (torchvision ResNet names), the FPN neck
(mmdet names) and the 4conv1fc box head. The projector, predictor and the other network are
left out. The converted official checkpoints used the online network (docs/method.md 9.20), so that
is the default; ``network="target"`` picks the momentum network instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soco_det.checkpoint_files import resolve_checkpoint
from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.models.config import ModelConfig
from soco_det.models.official import load_official_state_dict
from soco_det.torch_io import torch_load

log = get_logger(__name__)

NETWORKS = ("online", "target")
PARTS = ("encoder", "neck", "head")
# Blocks per stage and block type -> ResNet depth (the torchvision family).
_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
_ENCODER_KEY = re.compile(r"^(conv1|bn1|layer[1-4])\.")


@dataclass
class ExportSource:
    """The parts of one network, ready to be renamed.

    ``encoder``: torchvision ResNet names without prefix (``conv1.weight``,
    ``layer1.0.bn1.running_mean``, ``layer1.0.downsample.0.weight``; no ``fc``);
    ``neck``: ``lateral_convs.{i}.conv.weight`` / ``.bn.*`` and ``fpn_convs.{i}...`` (i = 0..3 for
    P2..P5), empty for C4 and the image-level baseline; ``head``: ``conv{k}.weight``,
    ``bn{k}.*``, ``fc{j}.{weight,bias}``, empty without a box head. Tensors are on the CPU.
    ``variant`` is the model variant (``soco_fpn|soco_star|soco_c4|image_byol``); for C4 the
    encoder's ``layer4`` is the RoI head. ``dropped`` counts the tensors of the state dict that are
    not exported, per prefix.
    """

    path: Path
    origin: str  # "soco-det" or "official"
    network: str
    variant: str
    depth: int
    encoder: dict[str, torch.Tensor]
    neck: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    step: int | None = None  # global step (soco-det) or epoch (official), when stored

    @property
    def is_c4(self) -> bool:
        return self.variant == "soco_c4"

    @property
    def bottleneck(self) -> bool:
        return "layer1.0.conv3.weight" in self.encoder

    @property
    def res2_channels(self) -> int:
        """Output channels of the first ResNet stage (C2): 256 for ResNet-50+, 64 for ResNet-18/34."""
        last_conv = "conv3" if self.bottleneck else "conv2"
        return int(self.encoder[f"layer1.0.{last_conv}.weight"].shape[0])

    def widths(self) -> dict[str, Any]:
        """The FPN / box-head widths read from the weights, named as
        :func:`soco_det.models.maskrcnn.build_maskrcnn_v2`'s keywords: ``fpn_channels`` (with a neck),
        ``box_conv_dims``, ``box_fc_dims`` and ``box_roi_size`` (with a head)."""
        widths: dict[str, Any] = {}
        if self.neck:
            widths["fpn_channels"] = int(self.neck["lateral_convs.0.conv.weight"].shape[0])
        if self.head:
            convs = sorted(int(k[4:-7]) for k in self.head if re.fullmatch(r"conv\d+\.weight", k))
            fcs = sorted(int(k[2:-7]) for k in self.head if re.fullmatch(r"fc\d+\.weight", k))
            widths["box_conv_dims"] = tuple(int(self.head[f"conv{k}.weight"].shape[0]) for k in convs)
            widths["box_fc_dims"] = tuple(int(self.head[f"fc{j}.weight"].shape[0]) for j in fcs)
            last = widths["box_conv_dims"][-1] if convs else widths.get("fpn_channels", 256)
            widths["box_roi_size"] = math.isqrt(int(self.head["fc1.weight"].shape[1]) // last)
        return widths

    def describe(self) -> str:
        unit = "step" if self.origin == "soco-det" else "epoch"
        step = f", {unit} {self.step}" if self.step is not None else ""
        return (
            f"{self.path} ({self.origin} checkpoint{step}, {self.variant}, ResNet-{self.depth}, {self.network} network)"
        )


def resolve_checkpoint_path(src: str | Path) -> Path:
    """The checkpoint file of ``src``: the file itself, or the newest intact checkpoint of a run
    folder (``checkpoints/last.pt``, else the newest ``step_*.pt``). Raises :class:`UserError`
    naming the path when there is nothing to read."""
    return resolve_checkpoint(src, intact=True, expected=_EXPECTED)


_EXPECTED = "a soco-det run folder, a checkpoint .pt or an official ckpt_epoch_*.pth"


def load_source(src: str | Path, network: str = "online") -> ExportSource:
    """Read ``src`` and return the ``network`` (``online`` or ``target``) parts to export."""
    if network not in NETWORKS:
        raise UserError(f"network: must be one of {list(NETWORKS)}, got {network!r}")
    path = resolve_checkpoint_path(src)
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: not a SoCo checkpoint (no 'model' state dict in it)")

    if str(ckpt.get("format", "")).startswith("soco-det/"):
        origin, state = "soco-det", ckpt["model"]
        model_cfg = (ckpt.get("config") or {}).get("model") or {}
        variant = model_cfg.get("variant")
        config_depth = model_cfg.get("depth")
    else:
        origin, config_depth = "official", None
        state, variant = _from_official(path, ckpt)
    state = _strip_module_prefix(state)

    parts = {part: _sub_dict(state, f"{network}.{part}.") for part in PARTS}
    if not parts["encoder"]:
        have = sorted({k.split(".", 1)[0] for k in state})
        raise UserError(f"{path}: has no {network}.encoder.* weights to export (top-level names found: {have})")
    encoder = {k: v for k, v in parts["encoder"].items() if _ENCODER_KEY.match(k)}
    dropped = _count_dropped(state, network)
    extra = len(parts["encoder"]) - len(encoder)
    if extra:
        # e.g. an `fc` classifier: not part of any detector backbone.
        dropped[f"{network}.encoder.(non-backbone)."] = extra

    depth = infer_depth(encoder, path)
    if config_depth is not None and int(config_depth) != depth:
        raise UserError(
            f"{path}: the stored config says model.depth={config_depth} but the encoder weights are a ResNet-{depth}"
        )
    if variant is None:
        variant = _guess_variant(parts)
    step = ckpt.get("step") if origin == "soco-det" else ckpt.get("epoch")
    return ExportSource(
        path=path,
        origin=origin,
        network=network,
        variant=str(variant),
        depth=depth,
        encoder=encoder,
        neck=parts["neck"],
        head=parts["head"],
        dropped=dropped,
        step=int(step) if isinstance(step, int) else None,
    )


def infer_depth(encoder: dict[str, torch.Tensor], where: object = "encoder") -> int:
    """ResNet depth from the block counts and block type of torchvision-named encoder weights."""
    counts = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in encoder if k.startswith(f"layer{stage}.")}
        counts.append(max(blocks) + 1 if blocks else 0)
    bottleneck = "layer1.0.conv3.weight" in encoder
    depth = _DEPTHS.get((tuple(counts), bottleneck))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise UserError(
            f"{where}: encoder has {counts} {kind} blocks per stage, which is not a ResNet-18/34/50/101/152"
        )
    return depth


def _torch_load(path: Path) -> Any:
    # mmap: only the tensors of the exported network are read from disk, not the other network,
    # the optimizer state or the RNG states.
    return torch_load(path, mmap=True)


def _from_official(path: Path, ckpt: dict) -> tuple[dict[str, torch.Tensor], str]:
    raw = _strip_module_prefix(dict(ckpt["model"]))
    cfg = official_model_config(raw, path)
    try:
        state, report = load_official_state_dict(ckpt, cfg.variant, cfg=cfg)
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a readable official SoCo checkpoint ({exc})") from exc
    log.debug("official checkpoint: %s", report.summary())
    return state, cfg.variant


def official_model_config(raw: dict[str, torch.Tensor], where: object):
    """The :class:`~soco_det.models.config.ModelConfig` an official state dict was trained with,
    read from its weights (``module.`` stripped): the released ones are ResNet-50 SoCo_FPN / SoCo*
    (same weights; SoCo* only differs in its views) or SoCo_C4, but the shapes decide."""
    encoder = {k[len("encoder.") :]: v for k, v in raw.items() if k.startswith("encoder.")}
    if not encoder:
        raise UserError(f"{where}: has no module.encoder.* weights: not an official SoCo checkpoint")
    cfg = ModelConfig(
        variant="soco_fpn" if "neck.lateral_convs.0.conv.weight" in raw else "soco_c4",
        depth=infer_depth(encoder, where),
    )

    def dim(key: str, axis: int = 0) -> int | None:
        return int(raw[key].shape[axis]) if key in raw else None

    if cfg.variant == "soco_fpn":
        cfg.fpn_channels = dim("neck.lateral_convs.0.conv.weight") or cfg.fpn_channels
        cfg.head_conv_dim = dim("head.conv1.weight") or cfg.head_conv_dim
        cfg.head_fc_dim = dim("head.fc1.weight") or cfg.head_fc_dim
        if "head.fc1.weight" in raw:
            cfg.roi_output_size = math.isqrt(dim("head.fc1.weight", 1) // cfg.head_conv_dim)
    cfg.proj_hidden_dim = dim("projector.linear1.weight") or cfg.proj_hidden_dim
    cfg.proj_dim = dim("projector.linear2.weight") or cfg.proj_dim
    return cfg


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A state dict saved from a DDP-wrapped model has every key under "module.".
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _sub_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.detach().cpu() for k, v in state.items() if k.startswith(prefix)}


def _guess_variant(parts: dict[str, dict]) -> str:
    # Only for a soco-det checkpoint without a stored config: a neck and head mean an FPN model;
    # without them C4 and the image-level baseline look alike, and the backbone-only reading
    # (image_byol) is the one that cannot misplace res5.
    return "soco_fpn" if parts["neck"] and parts["head"] else "image_byol"


def _count_dropped(state: dict[str, torch.Tensor], network: str) -> dict[str, int]:
    kept = tuple(f"{network}.{part}." for part in PARTS)
    dropped: dict[str, int] = {}
    for key in state:
        if key.startswith(kept):
            continue
        head = key.split(".", 2)
        # e.g. "online.projector." for the exported network, "target." / "predictor." as a whole.
        prefix = f"{head[0]}.{head[1]}." if head[0] == network and len(head) > 2 else head[0] + "."
        dropped[prefix] = dropped.get(prefix, 0) + 1
    return dropped
