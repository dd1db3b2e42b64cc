"""Load the official SoCo checkpoints (``ckpt_epoch_*.pth``, ``current.pth``) into our names.

The official training script saves ``{"model": DDP state_dict, "optimizer", "scheduler", "opt",
"epoch"}``; model keys carry DDP's ``module.`` prefix. Module names of the official
``contrast/models`` (SoCo_FPN.py, SoCo_FPN_Star.py, SoCo_C4.py, mlps.py) and ours:

=========================  ======================  ==========================================
official prefix            ours                    note
=========================  ======================  ==========================================
``module.encoder.``        ``online.encoder.``     torchvision ResNet names on both sides
``module.neck.``           ``online.neck.``        mmcv ConvModule names (``.conv``, ``.bn``)
``module.head.``           ``online.head.``        ``conv1..4``, ``bn1..4``, ``fc1``
``module.projector.``      ``online.projector.``   ``mlps.MLP``: ``linear1``, ``bn1``, ``linear2``
``module.predictor.``      ``predictor.``
``module.encoder_k.``      ``target.encoder.``
``module.neck_k.``         ``target.neck.``
``module.head_k.``         ``target.head.``
``module.projector_k.``    ``target.projector.``
``module.queue``           (dropped)               unused MoCo leftovers of SoCo_C4 (docs/method.md 3.6)
``module.queue_ptr``       (dropped)
=========================  ======================  ==========================================

The suffix after the prefix is kept unchanged (SyncBatchNorm and BatchNorm have the same keys).
The load is exact: every official key must be mapped or listed as dropped, every key of our
model must be filled, and shapes must agree; anything else raises :class:`OfficialCheckpointError`
naming the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from soco_det.errors import UserError
from soco_det.models import build_model
from soco_det.models.config import ModelConfig
from soco_det.torch_io import torch_load

PREFIX_MAP = (
    ("encoder_k.", "target.encoder."),
    ("neck_k.", "target.neck."),
    ("head_k.", "target.head."),
    ("projector_k.", "target.projector."),
    ("encoder.", "online.encoder."),
    ("neck.", "online.neck."),
    ("head.", "online.head."),
    ("projector.", "online.projector."),
    ("predictor.", "predictor."),
)
DROPPED_KEYS = ("queue", "queue_ptr")
VARIANTS = ("soco_fpn", "soco_star", "soco_c4")


class OfficialCheckpointError(UserError):
    """An official checkpoint that does not map exactly onto our model; the message names the keys."""


@dataclass
class OfficialLoadReport:
    """What :func:`load_official_state_dict` did: ``mapping`` official -> ours, ``dropped`` keys."""

    source: str
    variant: str
    mapping: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.source}: {len(self.mapping)} official keys mapped onto {self.variant}, "
            f"{len(self.dropped)} dropped ({', '.join(self.dropped) or 'none'})"
        )


def official_to_ours(key: str) -> str | None:
    """Our name for an official model key (``module.`` already stripped); ``None`` if unknown."""
    for theirs, ours in PREFIX_MAP:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


def ours_to_official(key: str) -> str:
    """The official name (with ``module.``) of one of our state-dict keys (used by tests and docs)."""
    for theirs, ours in PREFIX_MAP:
        if key.startswith(ours):
            return "module." + theirs + key[len(ours) :]
    raise KeyError(f"{key} has no official counterpart")


def _read(src: str | Path | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    if isinstance(src, Mapping):
        return src, "<dict>"
    path = Path(src)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: no such checkpoint file")
    # weights_only keeps unpickling safe; the official file also stores its argparse options.
    obj = torch_load(path, error=OfficialCheckpointError, what="cannot read as a torch checkpoint")
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj, str(path)


def expected_state(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Key -> shape of our model's state dict for ``cfg``, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def load_official_state_dict(
    src: str | Path | Mapping[str, Any], variant: str = "soco_fpn", cfg: ModelConfig | None = None
) -> tuple[dict[str, torch.Tensor], OfficialLoadReport]:
    """Official checkpoint -> ``(state_dict in our names, report)``.

    Args:
        src: a ``ckpt_epoch_*.pth`` path, the loaded checkpoint dict, or its ``"model"`` dict.
        variant: ``soco_fpn``, ``soco_star`` (same keys) or ``soco_c4``.
        cfg: the model config to check against; default ``ModelConfig(variant=variant)`` (ResNet-50
            and the official widths).
    Raises:
        OfficialCheckpointError: unreadable file, unknown or missing keys, or shape mismatches.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    cfg = replace(cfg, variant=variant) if cfg is not None else ModelConfig(variant=variant)
    ckpt, source = _read(src)
    raw = ckpt["model"] if isinstance(ckpt.get("model"), Mapping) else ckpt
    report = OfficialLoadReport(source=source, variant=variant)
    if "epoch" in ckpt:
        report.meta["epoch"] = ckpt["epoch"]

    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in raw.items():
        bare = key[len("module.") :] if key.startswith("module.") else key
        if bare in DROPPED_KEYS:
            report.dropped.append(key)
            continue
        ours = official_to_ours(bare)
        if ours is None or not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        state[ours] = value
        report.mapping[key] = ours

    expected = expected_state(cfg)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k])
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} official keys with no mapping: {_few(unknown)}")
    if extra:
        problems.append(f"{len(extra)} keys our {variant} model does not have: {_few(extra)}")
    if missing:
        problems.append(
            f"{len(missing)} keys of our {variant} model not in the checkpoint: {_few(_group(missing, expected))}"
        )
    if shapes:
        problems.append(
            "shape mismatches: " + _few([f"{k} {tuple(state[k].shape)} vs {tuple(expected[k])}" for k in shapes])
        )
    if problems:
        raise OfficialCheckpointError(
            f"{source}: not an exact official {variant} checkpoint for depth {cfg.depth}: " + "; ".join(problems)
        )
    return state, report


def _group(keys: list[str], expected: Mapping[str, Any]) -> list[str]:
    """Collapse modules (``online.neck``) whose keys are all in ``keys`` into ``online.neck.* (all N)``."""

    def module(key: str) -> str:
        parts = key.split(".")
        return ".".join(parts[:2]) if parts[0] in ("online", "target") else parts[0]

    wanted = set(keys)
    out, done = [], set()
    for key in keys:
        mod = module(key)
        members = [k for k in expected if module(k) == mod]
        if all(k in wanted for k in members):
            if mod not in done:
                out.append(f"{mod}.* (all {len(members)})")
                done.add(mod)
        else:
            out.append(key)
    return out


def _few(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")
