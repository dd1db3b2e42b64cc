"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file, even when the writer is killed. The finished file gets the permissions any new
file gets (``0o666`` less the process umask at the time of the write), as ``open(path, "w")`` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Iterator, IO


def _create_sibling(path: Path) -> tuple[int, Path]:
    """Create a new, uniquely named temporary file next to ``path``; ``(fd, its path)``.

    Opened with mode ``0o666`` like ``open()``: the kernel applies the umask, so it never has to be
    read (reading it means setting it, which is not thread-safe). ``tempfile.mkstemp`` would give
    ``0o600``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; it replaces ``path`` when the block ends
    without an exception, and is removed otherwise."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports 'w' and 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_sibling(path)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(obj, **kwargs))


def atomic_save(path: str | Path, writer: Callable[[IO], None]) -> None:
    """Call ``writer(handle)`` on a binary temporary file, then move it into place
    (e.g. ``atomic_save(p, lambda f: torch.save(obj, f))``)."""
    with atomic_open(path, "wb") as handle:
        writer(handle)
