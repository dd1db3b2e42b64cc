"""``model.init: untrained:RUN``: the network a pretraining run started from, as the fine-tuner's init.

The fair "random" baseline of a pretraining run is not torchvision's default initialisation but the
same architecture with the same init scheme and seed, untrained: exactly what ``RUN`` started from
(:func:`soco_det.models.init_model` of its model config and seed). ``RUN`` is a pretraining run folder,
its ``config.yaml`` or one of its checkpoints; the network is built with
:func:`soco_det.export.untrained.save_untrained` and exported to the torchvision layout in memory,
as ``soco-det export --to torchvision`` would (backbone, FPN and box head; the RPN, the box
predictor and the mask branch stay random, as with a SoCo export).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch

from soco_det.errors import UserError
from soco_det.logs import get_logger

log = get_logger(__name__)

PREFIX = "untrained:"


def is_untrained_init(init: str | Path) -> bool:
    """Whether ``init`` names the untrained network of a run (``untrained:RUN``, or the bare word)."""
    text = str(init)
    return text == "untrained" or text.startswith(PREFIX)


def untrained_run(init: str | Path) -> Path:
    """The ``RUN`` of ``untrained:RUN``; a :class:`UserError` when it is missing or names nothing."""
    run = str(init)[len(PREFIX) :] if str(init).startswith(PREFIX) else ""
    if not run:
        raise UserError(
            f"model.init {str(init)!r}: give the pretraining run whose starting network to use, "
            "as untrained:RUN (a run folder, its config.yaml or a checkpoint)"
        )
    path = Path(run).expanduser()
    if not path.exists():
        raise UserError(f"model.init untrained:{run}: {path} not found (a pretraining run folder or its config.yaml)")
    return path


def run_config(path: Path) -> Any:
    """The :class:`~soco_det.engine.config.PretrainConfig` of a run folder, its ``config.yaml`` or a
    checkpoint; a :class:`UserError` naming the file when it is not one."""
    from soco_det.config import ConfigError, load_config
    from soco_det.engine.config import PretrainConfig
    from soco_det.probe.network import read_run_config

    if path.is_file() and path.suffix in (".yaml", ".yml"):
        try:
            return load_config(PretrainConfig, path)
        except (ConfigError, ValueError, TypeError, KeyError) as exc:
            raise UserError(f"model.init untrained:{path}: not a pretraining config ({exc})") from exc
    return read_run_config(path)


@functools.lru_cache(maxsize=2)
def _weights(path: str, mtime: float) -> dict[str, torch.Tensor]:
    from soco_det.export.source import load_source
    from soco_det.export.torchvision import map_source
    from soco_det.export.untrained import save_untrained

    cfg = run_config(Path(path))
    with tempfile.TemporaryDirectory(prefix="soco-det-untrained-") as tmp:
        ckpt = save_untrained(cfg, Path(tmp) / "untrained.pt", cfg.seed)
        state = dict(map_source(load_source(ckpt)).state_dict)
    log.info(
        "init: the untrained network of %s (ResNet-%d %s, init seed %d), exported to torchvision names",
        path,
        cfg.model.depth,
        cfg.model.variant,
        cfg.seed,
    )
    return state


def untrained_weights(init: str | Path) -> dict[str, torch.Tensor]:
    """The torchvision-layout state dict (``backbone.body.*``, ``backbone.fpn.*``, ``roi_heads.box_head.*``)
    of the network ``untrained:RUN`` started from. Built once per run config (cached)."""
    path = untrained_run(init).resolve()
    config = path / "config.yaml" if path.is_dir() else path
    mtime = config.stat().st_mtime if config.exists() else 0.0
    return dict(_weights(str(path), mtime))
