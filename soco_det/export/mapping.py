"""Key mappings from soco-det names to a target framework's names, and their printed summary.

Every exporter turns the three parts of a pretrained network (encoder, neck, box head; see
:class:`~soco_det.export.source.ExportSource`) into one flat ``{target_name: tensor}`` dict by a
per-part renaming rule. :func:`map_parts` applies the rules and insists that the mapping is total
(every tensor of an exported part gets a name, so nothing is silently dropped) and injective (no
two tensors land on the same name). The resulting :class:`Mapping` keeps one record per tensor so
that the command can print what went where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping as TMapping, Optional

import torch

from soco_det.errors import UserError

# A renaming rule gets a key of one part (e.g. "layer1.0.bn1.weight") and returns the target name,
# or None when the key has no place in the target (that is an error: see map_parts).
Rule = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class KeyRecord:
    """One exported tensor: which group it belongs to, its soco-det name and its target name."""

    group: str
    source: str
    target: str


@dataclass
class Mapping:
    """The exported tensors and where each came from.

    ``state_dict``: target name -> tensor (CPU, values unchanged); ``records``: one per tensor,
    in source order.
    """

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[KeyRecord] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of exported tensors per group, in first-seen order."""
        out: dict[str, int] = {}
        for rec in self.records:
            out[rec.group] = out.get(rec.group, 0) + 1
        return out

    def examples(self, group: str) -> list[KeyRecord]:
        """A few telling records of ``group``: its first weight, its first BatchNorm running mean
        and its last weight (e.g. the box head's fc)."""
        recs = [r for r in self.records if r.group == group]
        weights = [r for r in recs if r.source.endswith(".weight")]
        stats = [r for r in recs if r.source.endswith(".running_mean")]
        picked: list[KeyRecord] = []
        for rec in (weights[:1] + stats[:1] + weights[-1:]) or recs[:1]:
            if rec not in picked:
                picked.append(rec)
        return picked


@dataclass
class TargetExport:
    """What a target module's ``export(source, out, check)`` did: the ``mapping`` it wrote, the
    check's one-line result, ``usage`` (one line: how the target framework builds the matching
    model), ``settings`` (every config key or builder argument that model needs for this network,
    in order) and ``config``, the ready fine-tuning config written next to the export (if any)."""

    mapping: Mapping
    check: str
    usage: str
    settings: dict[str, Any] = field(default_factory=dict)
    config: Optional[Path] = None


def config_path(out: Path, suffix: str) -> Path:
    """The fine-tuning config written next to the export ``out``: same stem, ``suffix``
    (``soco_detectron2.pkl`` -> ``soco_detectron2.yaml``), never the export file itself."""
    path = out.with_suffix(suffix)
    return path if path != out else out.with_name(out.name + suffix)


def map_parts(parts: Iterable[tuple[str, str, TMapping[str, torch.Tensor], Rule]]) -> Mapping:
    """Rename the tensors of each part.

    ``parts`` yields ``(group, source_prefix, tensors, rule)``: ``tensors`` are the part's
    tensors named relative to the part, ``source_prefix`` is prepended to those names in the
    records (e.g. ``"online.encoder."``). Raises :class:`UserError` naming the key when a rule
    has no target name for it or when two keys map to the same name.
    """
    out = Mapping()
    for group, prefix, tensors, rule in parts:
        for key, value in tensors.items():
            target = rule(key)
            if target is None:
                raise UserError(
                    f"{prefix}{key}: no {group} name for this key in the target format "
                    f"(is the checkpoint from a different model layout?)"
                )
            if target in out.state_dict:
                raise UserError(f"{prefix}{key}: maps to {target!r}, which another key already took")
            out.state_dict[target] = value
            out.records.append(KeyRecord(group, prefix + key, target))
    return out


def format_summary(mapping: Mapping, dropped: TMapping[str, int]) -> list[str]:
    """Human-readable lines: tensors per group with a few ``source -> target`` examples, then the
    prefixes that were not exported and how many tensors each had."""
    lines = []
    total = 0
    for group, count in mapping.counts().items():
        total += count
        lines.append(f"  {group:<10} {count:4d} tensors")
        for rec in mapping.examples(group):
            lines.append(f"      {rec.source} -> {rec.target}")
    lines.append(f"  {'total':<10} {total:4d} tensors")
    if dropped:
        what = ", ".join(f"{prefix}* ({count})" for prefix, count in dropped.items())
        lines.append(f"  not exported: {what}")
    return lines
