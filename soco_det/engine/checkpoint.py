"""Writing training checkpoints: atomic writes, the last N kept, the run-folder policy, exact resume.

Format (docs/architecture.md; reading and checking files: :mod:`soco_det.checkpoint_files`):
``torch.save`` of ::

    {"format": "soco-det/1", "model": state_dict of the unwrapped SoCo model, "optimizer",
     "scaler", "step": global optimizer step, "epoch": int, "sampler": {...}, "rng": {...},
     "config": resolved config dict}

written atomically to ``RUN/checkpoints/step_{step:08d}.pt``; ``RUN/checkpoints/last.pt`` is then
replaced (atomically) by a copy of it, so a killed run always leaves a complete ``last.pt`` and
damage to one file never reaches the other. Every file is checked against the CRC32s of its zip
records before it is used: loading a damaged file is an error, loading a run folder (``--resume
auto``, export of a run) falls back to the newest intact checkpoint with a warning, and pruning
keeps the newest intact files. Everything in the file is plain tensors and Python containers, so it
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from soco_det.atomic import atomic_save

# Reading and checking files lives below the engine; the names a resume needs are read from here too.
from soco_det.checkpoint_files import (  # noqa: F401 (find_resume, load_model_strict: re-exported)
    CKPT_DIR,
    FORMAT,
    LAST,
    checkpoint_candidates,
    damage,
    find_resume,
    load_checkpoint,
    load_model_strict,
    mark_intact,
    step_checkpoints,
    step_path,
)
from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.runlock import FolderLock, move_aside

log = get_logger(__name__)


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


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``state`` (must hold ``step``) atomically, make ``last.pt`` a copy of it (written
    atomically too), and prune old step files (the newest ``keep_last`` intact ones stay).

    A disk that fills up raises ``OSError(ENOSPC)`` naming the file; the previous checkpoints are
    untouched (the new file is written under a temporary name first)."""
    path = step_path(run_dir, int(state["step"]))
    crc, size = atomic_save(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    mark_intact(path)
    _replace_last(path, crc, size)
    prune(path.parent, keep_last)
    log.info("saved checkpoint %s", path)
    return path


def _replace_last(path: Path, crc: int, size: int) -> None:
    """``last.pt``: a real copy (damage to one file never damages the other), replaced atomically."""
    last = path.parent / LAST

    def copy(handle: IO[bytes]) -> None:
        with open(path, "rb") as src:
            shutil.copyfileobj(src, handle, 1 << 22)

    copied = atomic_save(last, copy)
    if copied != (crc, size):
        raise OSError(errno.EIO, f"copy of {path.name} does not match it", str(last))
    mark_intact(last)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` intact step files; remove older ones and damaged ones."""
    kept = 0
    for path in reversed(step_checkpoints(ckpt_dir)):
        reason = damage(path)
        if reason is None and kept < keep_last:
            kept += 1
            continue
        if reason is not None:
            log.warning("removing damaged checkpoint %s: %s", path, reason)
        path.unlink(missing_ok=True)


def clean_temporary_files(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files of writes that were killed (call while holding the run lock)."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    removed = []
    if ckpt_dir.is_dir():
        for tmp in ckpt_dir.iterdir():
            if tmp.name.startswith(".") and tmp.name.endswith(".tmp"):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted checkpoint write in %s", len(removed), ckpt_dir)
    return removed


def claim_run_folder(run_dir: str | Path, resume: Any, overwrite: bool) -> FolderLock:
    """The run-folder policy of pretraining and fine-tuning, for the main process: take the
    folder's lock (held until the caller releases it, at the end of the run), clean up after killed
    writes, and refuse to start a new run (``resume`` is ``None``) over a folder that holds
    checkpoints; ``overwrite`` moves the old run to ``RUN.old-<time>`` instead
    (:func:`soco_det.runlock.move_aside`)."""
    lock = FolderLock(run_dir, "run folder").acquire()
    try:
        clean_temporary_files(run_dir)
        existing = checkpoint_candidates(run_dir)
        if resume is None and existing:
            if not overwrite:
                raise UserError(
                    f"{run_dir}: already holds the checkpoints of a run ({existing[0].name}, ...); continue it "
                    "with --resume auto, write to a new -o folder, or pass --overwrite to move the old run aside"
                )
            aside = move_aside(run_dir)
            log.warning("--overwrite: moved the previous run of %s to %s", run_dir, aside)
    except BaseException:
        lock.release()
        raise
    return lock


def load_resume(run_dir: str | Path, resume: str | Path | None) -> dict[str, Any] | None:
    """The checkpoint a run in ``run_dir`` continues from, read on the CPU (pretraining and
    fine-tuning): ``None`` starts fresh; ``"auto"`` reads the folder's newest intact checkpoint, or
    starts fresh when it has none; anything else is a checkpoint file or run folder to read."""
    if resume is None:
        return None
    if resume == "auto":
        if not checkpoint_candidates(run_dir):
            log.info("no checkpoint in %s; starting a new run", run_dir)
            return None
        resume = run_dir
    return load_checkpoint(resume, map_location="cpu")
