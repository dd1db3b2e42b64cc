"""Export the backbone alone, for timm or a plain torchvision ResNet.

The file is a plain state dict (``torch.save``) of the encoder with torchvision ResNet names
(``conv1``, ``bn1``, ``layer1..4``), which timm's ResNet uses too. It has **no classifier**, so
load it strictly into a model without one::

    model = timm.create_model("resnet50", pretrained=False, num_classes=0)   # fc = Identity
    model.load_state_dict(torch.load(path), strict=True)

    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()                                          # drop the classifier
    model.load_state_dict(torch.load(path), strict=True)

The export checks the second form (torchvision is always installed). The FPN and box head are not
in this file; use the torchvision, detectron2 or mmdet export for a whole detector.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from soco_det.atomic import atomic_save
from soco_det.errors import UserError
from soco_det.export.mapping import Mapping, TargetExport, map_parts
from soco_det.export.source import ExportSource


def map_source(source: ExportSource) -> Mapping:
    """The encoder under its own (torchvision = timm) names."""
    return map_parts([("backbone", f"{source.network}.encoder.", source.encoder, lambda k: k)])


def check_load(state_dict: dict[str, torch.Tensor], depth: int, where: object) -> str:
    """Strict load into ``torchvision.models.resnet{depth}`` with ``fc`` removed."""
    import torchvision

    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    model.fc = nn.Identity()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{where}: the backbone does not load strictly into a ResNet-{depth}: {exc}") from exc
    return (
        f"loads strictly into torchvision resnet{depth} with fc=Identity "
        f"(and timm.create_model('resnet{depth}', num_classes=0))"
    )


def export(source: ExportSource, out: Path, check: bool = True) -> TargetExport:
    mapping = map_source(source)
    note = check_load(mapping.state_dict, source.depth, source.path) if check else "not checked"
    atomic_save(out, lambda f: torch.save(mapping.state_dict, f))
    arch = f"resnet{source.depth}"
    usage = (
        f"model = timm.create_model('{arch}', num_classes=0) (or torchvision.models.{arch}() with "
        f"model.fc = torch.nn.Identity()); model.load_state_dict(torch.load('{out}'), strict=True)"
    )
    return TargetExport(mapping, note, usage, {"model_name": arch, "num_classes": 0})
