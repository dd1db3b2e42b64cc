"""The frozen detector parts a probe reads: ResNet encoder, FPN neck and 4conv1fc box head.

A probe compares initialisations of *one* architecture, so every source is loaded into the same
freshly built SoCo_FPN online network:

* ``untrained``: the network as ``soco-det pretrain`` builds it before its first step, with the
  run's model config and seed (:func:`soco_det.models.init_model`): same init scheme
  (zero-init residual gammas), same seed — the honest "random" baseline;
* a run folder or checkpoint (soco-det or official): its encoder, neck and head replace the
  untrained ones where it has them (an image-level BYOL run brings an encoder only; its FPN and
  head stay as untrained, exactly as when fine-tuning from its export).

Which parts came from where is recorded in :attr:`ProbeNetwork.loaded`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soco_det.checkpoint_files import load_checkpoint
from soco_det.config import from_dict, load_config, upgrade_keys
from soco_det.engine.config import PretrainConfig
from soco_det.errors import UserError
from soco_det.export.source import load_source
from soco_det.models import init_model
from soco_det.models.soco import FPN_STRIDES

UNTRAINED = "untrained"
PARTS = ("encoder", "neck", "head")


@dataclass
class ProbeNetwork:
    """``encoder`` (C2..C5), ``neck`` (P2..P5) and ``head`` (RoI features -> fc vector) of one source.

    ``strides`` are the FPN strides of P2..P5; ``roi_size`` the RoIAlign output side;
    ``loaded`` names, per part, the source it came from (``untrained`` or a path).
    """

    encoder: nn.Module
    neck: nn.Module
    head: nn.Module
    strides: tuple[int, ...]
    roi_size: int
    name: str
    loaded: dict[str, str] = field(default_factory=dict)

    def modules(self) -> list[nn.Module]:
        return [self.encoder, self.neck, self.head]

    def to(self, device: torch.device) -> "ProbeNetwork":
        for m in self.modules():
            m.to(device)
        return self

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``[P2..P5]`` of a ``[B, 3, S, S]`` normalised batch."""
        return self.neck(self.encoder(images))


def fpn_model_config(model_cfg: Any) -> Any:
    """The SoCo_FPN config a probe builds for a run's ``model`` config (any variant): same depth,
    widths, RoI size and init scheme; C4 and image-level runs get the default FPN widths of their
    config, untrained."""
    cfg = copy.deepcopy(model_cfg)
    if cfg.variant not in ("soco_fpn", "soco_star"):
        cfg.variant = "soco_fpn"
        cfg.roi_output_size = None
    cfg.channels_last = False
    return cfg


def build_probe_network(model_cfg: Any, seed: int, name: str = UNTRAINED) -> ProbeNetwork:
    """The untrained online encoder/neck/head that pretraining with ``model_cfg`` and ``seed`` starts from."""
    cfg = fpn_model_config(model_cfg)
    model = init_model(cfg, seed)
    online = model.online
    return ProbeNetwork(
        encoder=online["encoder"],
        neck=online["neck"],
        head=online["head"],
        strides=tuple(FPN_STRIDES[: cfg.num_levels]),
        roi_size=cfg.resolved_roi_output_size(),
        name=name,
        loaded={part: UNTRAINED for part in PARTS},
    )


def load_probe_network(source: str | Path, model_cfg: Any, seed: int, network: str = "online") -> ProbeNetwork:
    """The untrained network of ``(model_cfg, seed)`` with every part ``source`` holds loaded into it.

    ``source``: ``"untrained"``, a soco-det run folder or checkpoint, or an official checkpoint.
    Raises :class:`UserError` when a part's shapes do not fit the architecture.
    """
    if str(source) == UNTRAINED:
        return build_probe_network(model_cfg, seed)

    src = load_source(source, network=network)
    net = build_probe_network(model_cfg, seed, name=str(source))
    for part in PARTS:
        state = getattr(src, part)
        if not state:
            continue
        module: nn.Module = getattr(net, part)
        own = module.state_dict()
        if part == "encoder":  # a checkpoint may lack nothing, but the trunk may hold more (no fc)
            state = {k: v for k, v in state.items() if k in own}
        bad = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
        if bad:
            raise UserError(
                f"{source}: its {part} does not fit the probe's architecture (ResNet-{model_cfg.depth}, "
                f"fpn_channels={model_cfg.fpn_channels}, head {model_cfg.head_conv_dim}/{model_cfg.head_fc_dim}): "
                f"{len(bad)} keys missing or of another shape, e.g. {bad[:3]}"
            )
        module.load_state_dict(state, strict=True)
        net.loaded[part] = str(source)
    return net


def read_run_config(run_dir: str | Path) -> Any:
    """The :class:`~soco_det.engine.config.PretrainConfig` of a run folder (its ``config.yaml``) or
    of a checkpoint file (its stored config)."""
    path = Path(run_dir)
    if path.is_dir():
        cfg_path = path / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"{path}: no config.yaml (is it a soco-det run folder?)")
        return load_config(PretrainConfig, cfg_path)

    stored = load_checkpoint(path).get("config")
    if not isinstance(stored, dict):
        raise UserError(f"{path}: the checkpoint holds no config; pass --config RECIPE")
    # checkpoints store the flat keys of format soco-det/1 (soco_det.config.downgrade_keys): no deprecation lines
    return from_dict(PretrainConfig, upgrade_keys(PretrainConfig, stored, quiet=True))
