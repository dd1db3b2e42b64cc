"""Small torch helpers shared by every stage: device choice and checked ``torch.load``."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterable

import torch

from soco_det.errors import UserError

# Besides tensors and plain containers, a checkpoint may hold the argparse.Namespace of the official
# SoCo checkpoints' options.
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)


def resolve_device(choice: str | torch.device | None, option: str = "device") -> str:
    """``auto``/``None`` -> ``cuda`` when available, else ``cpu``; any other choice as given.

    Raises :class:`UserError` for a CUDA device when no CUDA device is available (``option`` names
    the setting in the message).
    """
    if choice is None or choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    choice = str(choice)
    try:
        kind = torch.device(choice).type
    except RuntimeError as exc:
        raise UserError(f"{option}: not a device: {choice!r} ({exc})") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}={choice} but no CUDA device is available")
    return choice


def safe_globals(allow: Iterable[Any] = SAFE_GLOBALS) -> contextlib.AbstractContextManager:
    """A context in which ``torch.load(weights_only=True)`` also accepts ``allow`` (torch < 2.5:
    they are added for good, as that torch has no scoped form)."""
    allow = list(allow)
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(allow)
    torch.serialization.add_safe_globals(allow)
    return contextlib.nullcontext()


def torch_load(
    path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
    allow: Iterable[Any] = SAFE_GLOBALS,
    error: type[UserError] = UserError,
    what: str = "cannot be read as a PyTorch checkpoint",
) -> Any:
    """``torch.load(path, weights_only=True)`` with ``allow`` as safe globals; any failure is raised
    as ``error(f"{path}: {what} (...)")``. ``mmap``: map the tensors instead of reading them (only
    those used are read from disk); a legacy (non-zip) file, which cannot be mapped, is read."""
    try:
        with safe_globals(allow):
            if mmap:
                try:
                    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types (UnpicklingError, RuntimeError, EOFError)
        raise error(f"{path}: {what} ({type(exc).__name__}: {exc})") from exc
