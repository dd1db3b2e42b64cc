"""Training checkpoints: atomic writes, the last N kept, strict and exact resume.

Format (docs/architecture.md): ``torch.save`` of ::

    {"format": "soco-det/1", "model": state_dict of the unwrapped SoCo model, "optimizer",
     "scaler", "step": global optimizer step, "epoch": int, "sampler": {...}, "rng": {...},
     "config": resolved config dict}

written atomically to ``RUN/checkpoints/step_{step:08d}.pt``; ``RUN/checkpoints/last.pt`` is then
replaced by a hard link to it (a copy where links are not supported), so a killed run always
leaves a complete ``last.pt``. Everything in the file is plain tensors and Python containers, so it
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from soco_det.atomic import atomic_save
from soco_det.errors import UserError
from soco_det.logs import get_logger

log = get_logger(__name__)

FORMAT = "soco-det/1"
CKPT_DIR = "checkpoints"
LAST = "last.pt"
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


def capture_rng() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU, every CUDA device) as plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def step_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``state`` (must hold ``step``) atomically, point ``last.pt`` at it, prune old files."""
    path = step_path(run_dir, int(state["step"]))
    atomic_save(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    _replace_last(path)
    prune(path.parent, keep_last)
    log.info("saved checkpoint %s", path)
    return path


def _replace_last(path: Path) -> None:
    last = path.parent / LAST
    tmp = path.parent / f".{LAST}.{os.getpid()}.tmp"
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, last)


def step_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """``step_*.pt`` files in step order."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if _STEP_FILE.match(p.name))


def prune(ckpt_dir: Path, keep_last: int) -> None:
    for old in step_checkpoints(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)


def find_resume(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume ``run_dir`` from (``--resume auto``): ``last.pt``, else the newest
    ``step_*.pt``, else ``None``."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    if (ckpt_dir / LAST).is_file():
        return ckpt_dir / LAST
    steps = step_checkpoints(ckpt_dir)
    return steps[-1] if steps else None


def resolve_checkpoint(src: str | Path) -> Path:
    """A checkpoint file, or a run folder (its ``checkpoints/last.pt``)."""
    src = Path(src)
    if src.is_dir():
        found = find_resume(src)
        if found is None:
            raise UserError(f"{src}: run folder has no checkpoints/{LAST} or step_*.pt")
        return found
    if not src.is_file():
        raise UserError(f"{src}: checkpoint not found")
    return src


def load_checkpoint(src: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a soco-det checkpoint (file or run folder); checks the format tag."""
    path = resolve_checkpoint(src)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: not a soco-det checkpoint (format {found!r}, expected {FORMAT!r})")
    ckpt["path"] = str(path)
    return ckpt


def load_model_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with an error that lists the missing and unexpected keys."""
    own = set(model.state_dict())
    given = set(state_dict)
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        raise UserError(
            f"{source}: model keys do not match (missing {len(missing)}: {missing[:8]}, "
            f"unexpected {len(unexpected)}: {unexpected[:8]}); was it written with another model config?"
        )
    model.load_state_dict(state_dict, strict=True)
