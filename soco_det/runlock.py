"""An exclusive lock on an output folder (a run folder, a proposal job), so that it belongs to one
process at a time.

The lock is an ``flock`` on ``FOLDER/.lock``, which holds the owner's pid, host and start time.
The kernel releases it when the owner exits, however it exits (SIGKILL included), so a crashed run
never leaves a stale lock; a second process gets a :class:`~soco_det.errors.UserError` naming the
holder. On systems without ``fcntl`` the lock is a no-op.

The output policy of every command that writes (``evaluate``, ``export``, ``probe``, ``proposals
merge|import|export``; ``pretrain`` and ``finetune`` have the run-folder policy of
:func:`soco_det.engine.checkpoint.claim_run_folder`, ``proposals compute`` resumes):
:func:`output_file` and :func:`output_folder` refuse an existing output unless ``overwrite``,
which moves it aside to ``NAME.old-<time>`` (put back if the command then fails), and refuse the
files of a pretraining or fine-tuning run folder (its checkpoints, config, metrics, evaluations:
:func:`run_folder_of`) whatever ``overwrite`` says. The writes themselves are atomic
(:mod:`soco_det.atomic`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from soco_det.errors import UserError
from soco_det.logs import get_logger

LOCK_NAME = ".lock"
# What a pretraining or fine-tuning run writes into its folder (docs/architecture.md, "Run folders").
RUN_ENTRIES = (
    "checkpoints",
    "eval",
    "config.yaml",
    "metrics.jsonl",
    "metrics.json",
    "init_weights.json",
    "loss.png",
    "tensorboard",
    "wandb",
    "mlruns",
    "tracking.json",
    "views.png",
    "train_samples.png",
    LOCK_NAME,
)

log = get_logger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def check_output_folder(folder: str | Path, what: str = "output folder") -> Path:
    """``folder`` may be created or reused as a folder: refuse an existing file (a one-line error)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder (the {what} must be a folder)")
    check_parent_folders(folder)
    return folder


def check_parent_folders(path: Path) -> None:
    """The nearest existing parent of ``path`` must be a folder (``mkdir`` would fail on a file)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{path}: {parent} is a file, not a folder")
            return


class FolderLock:
    """``with FolderLock(folder, what="run folder"):`` holds ``folder/.lock`` exclusively.

    The folder is created if needed; if this lock created it and it is empty when the lock is
    released (the run failed before writing anything), it is removed again.
    """

    def __init__(self, folder: str | Path, what: str = "run folder") -> None:
        self.folder = check_output_folder(folder, what)
        self.what = what
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> "FolderLock":
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(
                    f"{self.folder}: {self.what} is in use by another process ({holder}); wait for it to finish, "
                    "stop it, or choose another output folder"
                ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self._created and {p.name for p in self.folder.iterdir()} <= {LOCK_NAME}:
                (self.folder / LOCK_NAME).unlink(missing_ok=True)
                self.folder.rmdir()
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def aside_name(path: str | Path) -> Path:
    """A new sibling name ``NAME.old-YYYYmmdd-HHMMSS`` (``-2``, ``-3``, ... if taken)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{path.name}.old-{stamp}-{n}")
    return aside


def move_aside(folder: str | Path, keep: tuple[str, ...] = (LOCK_NAME,)) -> Path:
    """Move the contents of ``folder`` (except ``keep``) into a new sibling folder
    ``NAME.old-YYYYmmdd-HHMMSS`` and return it (``--overwrite``: the old run is kept, out of the way)."""
    folder = Path(folder)
    aside = aside_name(folder)
    aside.mkdir()
    for entry in sorted(folder.iterdir()):
        if entry.name not in keep:
            os.replace(entry, aside / entry.name)
    return aside


def _put_back(aside: Path, folder: Path) -> None:
    """Undo :func:`move_aside` for the entries that nothing has replaced since."""
    for entry in sorted(aside.iterdir()):
        if not (folder / entry.name).exists():
            os.replace(entry, folder / entry.name)
    with contextlib.suppress(OSError):
        aside.rmdir()


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a pretraining or fine-tuning run: ``config.yaml`` with ``checkpoints/``
    or ``metrics.jsonl``."""
    folder = Path(folder)
    return (folder / "config.yaml").is_file() and (
        (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").exists()
    )


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder whose own files ``path`` is (the folder itself, or one of
    :data:`RUN_ENTRIES` in it or below them), else ``None``."""
    path = Path(path).absolute()
    if is_run_folder(path):
        return path
    for parent in path.parents:
        if is_run_folder(parent):
            return parent if path.relative_to(parent).parts[0] in RUN_ENTRIES else None
    return None


def _refuse_run_files(path: Path, what: str) -> None:
    run = run_folder_of(path)
    if run is not None:
        where = "is the run folder" if run == path.absolute() else "is among the files of the run folder"
        raise UserError(
            f"{path}: {where} {run} (its checkpoints and results are the run's own); write the {what} to a "
            f"folder of its own, e.g. {run / ('eval-' + time.strftime('%Y%m%d'))}"
        )


@contextlib.contextmanager
def output_file(path: str | Path, overwrite: bool = False, what: str = "output file") -> Iterator[Path]:
    """``with output_file(out, overwrite) as out:`` write ``out`` (atomically) inside the block.

    Refused (a one-line :class:`UserError`) before anything runs: a folder, a path under a file,
    a file of a run folder, and an existing file unless ``overwrite``, which moves it aside to
    ``NAME.old-<time>``; if the block then fails without writing ``out``, the old file is put back."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name for the {what}")
    check_parent_folders(path)
    _refuse_run_files(path, what)
    aside = None
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"{path}: file exists; pass --overwrite to move it aside, or choose another -o")
        aside = aside_name(path)
        os.replace(path, aside)
    try:
        yield path
    except BaseException:
        if aside is not None and not path.exists():
            os.replace(aside, path)
        raise
    if aside is not None:
        log.warning("--overwrite: the previous %s is kept as %s", what, aside)


@contextlib.contextmanager
def output_folder(
    folder: str | Path, results: tuple[str, ...], overwrite: bool = False, what: str = "output folder"
) -> Iterator[Path]:
    """``with output_folder(out, ("metrics.json", ...), overwrite) as out:`` write the ``results``
    files into ``out`` inside the block, holding its lock (:class:`FolderLock`).

    Refused before anything runs: a file, a run folder or a folder among a run's files, and a
    folder that already holds one of ``results`` unless ``overwrite``, which moves its contents
    aside to ``NAME.old-<time>`` (put back if the block fails)."""
    folder = check_output_folder(folder, what)
    _refuse_run_files(folder, what)
    with FolderLock(folder, what):
        aside = None
        existing = [name for name in results if (folder / name).exists()]
        if existing:
            if not overwrite:
                raise UserError(
                    f"{folder}: already holds {', '.join(existing)}; pass --overwrite to move the old results aside, "
                    "or choose another -o"
                )
            aside = move_aside(folder)
        try:
            yield folder
        except BaseException:
            if aside is not None:
                _put_back(aside, folder)
            raise
        if aside is not None:
            log.warning("--overwrite: the previous contents of %s are kept in %s", folder, aside)
