"""Training checkpoints: atomic writes, the last N kept, strict and exact resume.

Format (docs/architecture.md): ``torch.save`` of ::

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
import re
import shutil
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
from torch import nn

from soco_det.atomic import atomic_open
from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.runlock import FolderLock, move_aside
from soco_det.torch_io import torch_load

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


class _CountingWriter:
    """A binary handle for ``torch.save`` that keeps the CRC32 and size of what was written, and the
    first ``OSError`` of the underlying file (torch turns it into an opaque "unexpected pos")."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.crc, self.size, self.error = handle, 0, 0, None

    def write(self, data: bytes) -> int:
        try:
            n = self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return n

    def flush(self) -> None:
        self.handle.flush()


def _write_file(path: Path, write: Callable[[IO[bytes]], None]) -> tuple[int, int]:
    """Write ``path`` atomically through ``write(handle)``; returns ``(crc32, size)``. A failed write
    is an ``OSError`` naming ``path`` (e.g. ENOSPC), never torch's "unexpected pos"."""
    counter: _CountingWriter | None = None
    try:
        with atomic_open(path, "wb") as handle:
            counter = _CountingWriter(handle)
            write(counter)  # type: ignore[arg-type]
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except Exception as exc:
        if counter is not None and counter.error is not None:
            err = counter.error
            raise OSError(err.errno, err.strerror or str(err), str(path)) from exc
        raise
    assert counter is not None
    return counter.crc, counter.size


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``state`` (must hold ``step``) atomically, make ``last.pt`` a copy of it (written
    atomically too), and prune old step files (the newest ``keep_last`` intact ones stay).

    A disk that fills up raises ``OSError(ENOSPC)`` naming the file; the previous checkpoints are
    untouched (the new file is written under a temporary name first)."""
    path = step_path(run_dir, int(state["step"]))
    crc, size = _write_file(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    _INTACT[_file_key(path)] = True
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

    copied = _write_file(last, copy)
    if copied != (crc, size):
        raise OSError(errno.EIO, f"copy of {path.name} does not match it", str(last))
    _INTACT[_file_key(last)] = True


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
