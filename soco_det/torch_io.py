"""Small torch helpers shared by every stage: device choice and the one safe reader of weight files.

Weight files are read as data, never as code (:func:`torch_load`): torch's own files (zip format,
and the legacy format) with ``torch.load(weights_only=True)``, plain pickles (detectron2 ``.pkl``,
any protocol) with a restricted unpickler. Both accept tensors, the plain containers, and the
numpy arrays, scalars and dtypes that detectron2 and mmdetection files hold (and the
``argparse.Namespace`` of the official SoCo checkpoints), never any other global. Errors are in our
own words: they name the file and what it holds that is not data, and never advise loading it the
unsafe way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from soco_det.errors import UserError

# Besides tensors and plain containers, a checkpoint may hold the argparse.Namespace of the official
# SoCo checkpoints' options.
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first record of a legacy (non-zip) torch.save file


def _numpy_globals() -> dict[str, Any]:
    """``"module.name" -> object`` for the numpy pieces of pickled arrays, scalars and dtypes, under
    the names numpy 1 and numpy 2 write (``numpy.core`` / ``numpy._core``)."""
    core = getattr(np, "_core", None) or np.core  # type: ignore[attr-defined]
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core", "numpy._core"):
        out[f"{module}.multiarray._reconstruct"] = core.multiarray._reconstruct
        out[f"{module}.multiarray.scalar"] = core.multiarray.scalar
        out[f"{module}.numeric._frombuffer"] = core.numeric._frombuffer
    for name, cls in vars(getattr(np, "dtypes", object)).items():
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            out[f"numpy.dtypes.{name}"] = cls
    return out


def _torch_allowlist(allow: Iterable[Any]) -> list[Any]:
    return list(allow) + [(obj, name) for name, obj in _numpy_globals().items()]


class _DataUnpickler(pickle.Unpickler):
    """Plain pickles of weights (detectron2 ``.pkl``): containers, numpy data, nothing executable."""

    def __init__(self, handle: Any, allow: Iterable[Any]) -> None:
        super().__init__(handle, encoding="latin1")  # Python 2 pickles (detectron2's model zoo)
        self.allowed = {
            **_numpy_globals(),
            "collections.OrderedDict": collections.OrderedDict,
            "_codecs.encode": _latin1_encode,  # how protocol 2 writes bytes
            **{f"{o.__module__}.{o.__qualname__}": o for o in allow},
        }

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get(f"{module}.{name}")
        if found is None:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id (tensor storage) outside a torch file")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def describe_load_error(exc: BaseException) -> str:
    """What went wrong reading a weights file, in our words: the global it holds that is not data,
    or torch's / pickle's first line, without ANSI escapes and without advice to load it unsafely."""
    text = _ANSI.sub("", str(exc))
    found = _GLOBAL.search(text)
    if found:
        return f"it holds {found.group(1)}, which is not weights data; refused without running it"
    first = next((line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line), "")
    first = first.split(". This file can still be loaded")[0]
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


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
    """A weights file read as data (module docstring): torch's formats with ``weights_only=True``,
    plain pickles with a restricted unpickler, ``allow`` and numpy data accepted in both; any
    failure is raised as ``error(f"{path}: {what} (...)")`` in our words
    (:func:`describe_load_error`). ``mmap``: map the tensors of a zip-format file instead of
    reading them (only those used are read from disk)."""
    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as handle:
                first = _DataUnpickler(handle, allow).load()
            if first != _LEGACY_MAGIC:
                return first  # a plain pickle (detectron2 .pkl)
            mmap = False  # a legacy torch file cannot be mapped
        with safe_globals(_torch_allowlist(allow)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - torch and pickle raise many types (UnpicklingError, RuntimeError, EOFError)
        raise error(f"{path}: {what} ({describe_load_error(exc)})") from exc


def check_finite(tensors: Mapping[str, Any], where: str) -> None:
    """Refuse weights with NaN or infinite values, naming the first such tensor (a diverged run's
    checkpoint would otherwise load silently and the first step would blame the learning rate)."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise UserError(
                    f"{where}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf) of {value.numel()}; "
                    "the file is damaged or comes from a run that diverged"
                )
