"""An exclusive lock on an output folder (a run folder, a proposal job), so that it belongs to one
process at a time.

The lock is an ``flock`` on ``FOLDER/.lock``, which holds the owner's pid, host and start time.
The kernel releases it when the owner exits, however it exits (SIGKILL included), so a crashed run
never leaves a stale lock; a second process gets a :class:`~soco_det.errors.UserError` naming the
holder. On systems without ``fcntl`` the lock is a no-op.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from soco_det.errors import UserError

LOCK_NAME = ".lock"

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


def move_aside(folder: str | Path, keep: tuple[str, ...] = (LOCK_NAME,)) -> Path:
    """Move the contents of ``folder`` (except ``keep``) into a new sibling folder
    ``NAME.old-YYYYmmdd-HHMMSS`` and return it (``--overwrite``: the old run is kept, out of the way)."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    aside.mkdir()
    for entry in sorted(folder.iterdir()):
        if entry.name not in keep:
            os.replace(entry, aside / entry.name)
    return aside
