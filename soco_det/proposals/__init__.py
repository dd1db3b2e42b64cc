"""Selective-search proposals (offline): methods, filters, the proposal store and the job runner.

``compute_store`` runs (or resumes) the proposal job and ``ProposalStore.open`` reads its result;
both are imported lazily so that ``soco-det --help`` does not load numpy.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "compute_store": "soco_det.proposals.runner",
    "merge_stores": "soco_det.proposals.runner",
    "ProposalStore": "soco_det.proposals.store",
    "parse_filter": "soco_det.proposals.filters",
    "FilterSpec": "soco_det.proposals.filters",
    "METHODS": "soco_det.proposals.methods",
    "register_method": "soco_det.proposals.methods",
    "run_method": "soco_det.proposals.methods",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
