"""Export a SoCo-pretrained network to the detection frameworks people fine-tune with.

``export_checkpoint(src, to, out, network="online")`` reads a soco-det checkpoint, a run folder
(its ``checkpoints/last.pt``) or an official ``ckpt_epoch_*.pth``, renames the encoder, FPN and box
head for the target framework, checks the result against that framework's layout and writes it:

* ``torchvision``: a state dict for ``maskrcnn_resnet50_fpn_v2`` (other depths:
  :func:`soco_det.models.maskrcnn.build_maskrcnn_v2`); checked by loading it into a fresh
  model, where exactly the RPN, box predictor and mask branch must stay new;
* ``detectron2``: a ``.pkl`` with fully qualified detectron2 names, and next to it a ``.yaml``
  fine-tuning config (a shipped one with this network's depth and widths);
* ``mmdet``: ``{"state_dict", "meta"}`` for mmdetection's ``load_from``, and next to it a ``.py``
  fine-tuning config;
* ``timm``: the ResNet alone, loadable strictly by timm and torchvision ResNets without ``fc``.

The check compares names **and shapes** with the model the target framework builds for this
network (torchvision: always built; detectron2 / mmdet: built where importable, else the layout their
config's keys define, :mod:`soco_det.export.layouts`). Each target module documents its key table;
:func:`export` returns the mapping, the check result, the config keys the target needs and how to
build it, which ``soco-det export`` prints.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soco_det.errors import UserError
from soco_det.logs import get_logger

if TYPE_CHECKING:
    from soco_det.export.mapping import Mapping
    from soco_det.export.source import ExportSource

log = get_logger(__name__)

# target -> (module, default file suffix)
TARGETS: dict[str, tuple[str, str]] = {
    "torchvision": ("soco_det.export.torchvision", ".pth"),
    "detectron2": ("soco_det.export.detectron2", ".pkl"),
    "mmdet": ("soco_det.export.mmdet", ".pth"),
    "timm": ("soco_det.export.timm", ".pth"),
}


@dataclass
class ExportResult:
    """What an export wrote and how it was checked (``mapping``: per-tensor records).

    ``usage``: one line on how the target framework builds the model that loads the file;
    ``settings``: every config key (or builder argument) that model needs for this network;
    ``config``: the ready fine-tuning config written next to the file (detectron2 ``.yaml``, mmdet ``.py``).
    """

    path: Path
    target: str
    source: "ExportSource"
    mapping: "Mapping"
    check: str
    usage: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    config: Path | None = None

    def summary_lines(self) -> list[str]:
        # lazy: see export()
        from soco_det.export.mapping import format_summary

        lines = [f"source: {self.source.describe()}", f"target: {self.target} -> {self.path}", "key mapping:"]
        lines += format_summary(self.mapping, self.source.dropped)
        lines.append(f"check: {self.check}")
        where = f" (set in {self.config})" if self.config is not None else ""
        lines.append(f"{self.target} settings for this network{where}:")
        lines += [f"  {key}: {value}" for key, value in self.settings.items()]
        lines.append(f"use: {self.usage}")
        return lines


def default_output(src: str | Path, to: str) -> Path:
    """``RUN/export/soco_<to><ext>`` for a run folder, ``<ckpt stem>_<to><ext>`` next to a file."""
    check_target(to)
    src = Path(src)
    suffix = TARGETS[to][1]
    if src.is_dir():
        return src / "export" / f"soco_{to}{suffix}"
    return src.with_name(f"{src.stem}_{to}{suffix}")


def check_target(to: str) -> None:
    if to not in TARGETS:
        raise UserError(f"to: unknown export target {to!r} (choose from {', '.join(TARGETS)})")


def export(
    src: str | Path, to: str, out: str | Path | None = None, network: str = "online", check: bool = True
) -> ExportResult:
    """Export ``src`` for ``to`` into ``out`` (default: :func:`default_output`); see the module doc."""
    # lazy, like every submodule here: importing the package (for TARGETS) loads no torch
    from soco_det.export.source import load_source

    check_target(to)
    source = load_source(src, network=network)
    out = Path(out) if out is not None else default_output(src, to)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give the output file name (e.g. {out / default_output(src, to).name})")
    module = importlib.import_module(TARGETS[to][0])
    done = module.export(source, out, check=check)
    log.info("exported %s (%s network) for %s to %s", source.path, network, to, out)
    if done.config is not None:
        log.info("wrote the %s fine-tuning config %s", to, done.config)
    return ExportResult(
        path=out,
        target=to,
        source=source,
        mapping=done.mapping,
        check=done.check,
        usage=done.usage,
        settings=done.settings,
        config=done.config,
    )


def export_checkpoint(src: str | Path, to: str, out: str | Path, network: str = "online") -> Path:
    """Export ``src`` (checkpoint, run folder or official checkpoint) for ``to`` in
    ``torchvision|detectron2|mmdet|timm``; returns the written file."""
    return export(src, to, out, network=network).path


__all__ = ["TARGETS", "ExportResult", "default_output", "export", "export_checkpoint"]
