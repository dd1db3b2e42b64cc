"""Checkpoint files: the format, finding a run's newest intact file, reading and checking one.

A soco-det checkpoint (pretraining or fine-tuning) is ``torch.save`` of a dict tagged
``"format": "soco-det/1"`` (docs/architecture.md, "Checkpoint format"), stored in a run folder as
``RUN/checkpoints/step_{step:08d}.pt`` plus ``RUN/checkpoints/last.pt``, a copy of the newest. This
module is what every stage that *reads* them shares (export, probe, evaluation, resume); writing,
pruning and the run-folder policy are the engine's (:mod:`soco_det.engine.checkpoint`).

Every file is checked against the CRC32s of its zip records before it is used (``torch.load``
does not check them): loading a damaged file is an error, and loading a run folder falls back to
the newest intact checkpoint with a warning. Everything in a file is plain tensors and Python
containers, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.torch_io import torch_load

log = get_logger(__name__)

FORMAT = "soco-det/1"
CKPT_DIR = "checkpoints"
LAST = "last.pt"
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


def step_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:08d}.pt"


def step_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """``step_*.pt`` files in step order."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if _STEP_FILE.match(p.name))


# (path, size, mtime_ns) -> intact? : each file is checked at most once per process.
_INTACT: dict[tuple[str, int, int], bool] = {}
_REASONS: dict[tuple[str, int, int], str] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def damage(path: str | Path) -> str | None:
    """Why the checkpoint file ``path`` is damaged, or ``None`` if it is intact: ``torch.save``
    writes a zip archive with a CRC32 per record, which are all checked here (``torch.load`` itself
    does not check them, and would load flipped bytes as weights)."""
    path = Path(path)
    try:
        key = _file_key(path)
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if key not in _INTACT:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            _INTACT[key] = bad is None
            reason = f"checksum of its record {bad} does not match" if bad else None
        except Exception as exc:  # noqa: BLE001 - zipfile raises many types on garbage
            _INTACT[key] = False
            reason = f"not a complete checkpoint archive ({type(exc).__name__}: {exc})"
        if reason:
            _REASONS[key] = reason
    return None if _INTACT[key] else _REASONS.get(key, "damaged")


def mark_intact(path: Path) -> None:
    """Record that ``path`` was just written whole (its checksums need no reading back)."""
    _INTACT[_file_key(path)] = True


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints of a run folder, newest first: ``last.pt``, then ``step_*.pt`` by step."""
    ckpt_dir = Path(run_dir) / CKPT_DIR
    last = [ckpt_dir / LAST] if (ckpt_dir / LAST).is_file() else []
    return last + list(reversed(step_checkpoints(ckpt_dir)))


def find_resume(run_dir: str | Path) -> Path | None:
    """The newest checkpoint file of ``run_dir`` (``last.pt``, else the newest ``step_*.pt``), or
    ``None``; not verified (:func:`load_checkpoint` of the folder falls back past damaged files)."""
    found = checkpoint_candidates(run_dir)
    return found[0] if found else None


def resolve_checkpoint(src: str | Path, intact: bool = False, expected: str = "") -> Path:
    """A checkpoint file, or a run folder (its ``checkpoints/last.pt``, else its newest ``step_*.pt``).

    ``intact``: of a run folder, the newest checkpoint that is not damaged (a damaged ``last.pt``
    falls back to the step file it copies, with a warning), and a zip-format file is checked too.
    ``expected`` is added to the messages (what ``src`` should have been).
    """
    src = Path(src)
    hint = f" (expected {expected})" if expected else ""
    if src.is_dir():
        candidates = checkpoint_candidates(src)
        if not candidates:
            raise UserError(f"{src}: run folder has no checkpoints/{LAST} or step_*.pt{hint}")
        if not intact:
            return candidates[0]
        for candidate in candidates:
            reason = damage(candidate)
            if reason is None:
                if candidate != candidates[0]:
                    log.warning("using %s: the newer checkpoint file(s) of %s are damaged", candidate, src)
                return candidate
            log.warning("%s: checkpoint is damaged (%s); trying an older one", candidate, reason)
        raise UserError(f"{src}: every checkpoint in {src / CKPT_DIR} is damaged")
    if not src.is_file():
        raise UserError(
            f"{src}: no such file or folder{hint}" if not src.exists() else f"{src}: not a checkpoint file{hint}"
        )
    if intact and zipfile.is_zipfile(src):  # torch's format; a legacy pickle has no checksums to check
        reason = damage(src)
        if reason is not None:
            raise UserError(f"{src}: checkpoint is damaged ({reason})")
    return src


def _load_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    reason = damage(path)
    if reason is not None:
        raise UserError(f"{path}: checkpoint is damaged ({reason})")
    ckpt = torch_load(path, map_location=map_location, what="cannot read checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: not a soco-det checkpoint (format {found!r}, expected {FORMAT!r})")
    ckpt["path"] = str(path)
    return ckpt


def load_checkpoint(src: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a soco-det checkpoint file (checked against its recorded checksum, and its format tag),
    or the newest intact checkpoint of a run folder: a damaged ``last.pt`` or step file is skipped
    with a warning and the next older one is used."""
    src = Path(src)
    if not src.is_dir():
        return _load_file(resolve_checkpoint(src), map_location)
    candidates = checkpoint_candidates(src)
    if not candidates:
        raise UserError(f"{src}: run folder has no checkpoints/{LAST} or step_*.pt")
    errors = []
    for path in candidates:
        try:
            ckpt = _load_file(path, map_location)
        except UserError as exc:
            errors.append(str(exc))
            log.warning("%s; trying an older checkpoint", exc)
            continue
        if errors:
            log.warning("using %s (step %s): the newer checkpoint file(s) are damaged", path, ckpt.get("step"))
        return ckpt
    raise UserError(f"{src}: every checkpoint is damaged ({'; '.join(errors)})")


def load_model_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with an error that lists the missing and unexpected keys, or
    the tensors whose shapes differ."""
    own = set(model.state_dict())
    given = set(state_dict)
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        raise UserError(
            f"{source}: model keys do not match (missing {len(missing)}: {missing[:8]}, "
            f"unexpected {len(unexpected)}: {unexpected[:8]}); was it written with another model config?"
        )
    own_state = model.state_dict()
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in own_state.items()
        if tuple(getattr(state_dict[k], "shape", ())) != tuple(v.shape)
    ]
    if shapes:
        raise UserError(
            f"{source}: {len(shapes)} tensor shape(s) differ from the model's ({'; '.join(shapes[:4])}); "
            "was it written with another model config?"
        )
    model.load_state_dict(state_dict, strict=True)
