"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
half-written file, even when the writer is killed. The finished file gets the permissions any new
file gets (``0o666`` less the process umask at the time of the write), as ``open(path, "w")`` would.

Every failure to write (a full disk, a read-only file system, a quota) is an ``OSError`` that names
the file, whichever writer ran: :func:`atomic_save` keeps the first ``OSError`` of the file under a
writer such as ``torch.save``, which would otherwise replace it by its own opaque error
(``inline_container.cc ... unexpected pos``); the command line prints it as one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import zlib
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


def named_os_error(exc: OSError, path: str | Path) -> OSError:
    """``exc`` as an ``OSError`` of the same errno (and subclass) that names a file: its own, or ``path``."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; it replaces ``path`` when the block ends
    without an exception, and is removed otherwise. An ``OSError`` without a file name (a write,
    ``fsync`` or ``close`` on a full disk) is raised naming ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports 'w' and 'wb', not {mode!r}")
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_sibling(path)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise named_os_error(exc, path) from exc
        raise


class CountingWriter:
    """A binary handle for a writer such as ``torch.save``: keeps the CRC32 and size of what was
    written, and the first ``OSError`` of the file under it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.crc, self.size = handle, 0, 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            n = self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return n

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **kwargs: Any) -> None:
    atomic_write_text(path, json.dumps(obj, **kwargs))


def atomic_save(path: str | Path, writer: Callable[[IO], None]) -> tuple[int, int]:
    """Call ``writer(handle)`` on a binary temporary file, then move it into place
    (e.g. ``atomic_save(p, lambda f: torch.save(obj, f))``); returns the ``(CRC32, size)`` of what
    was written. A failed write is an ``OSError`` naming ``path`` (e.g. ENOSPC), whatever error the
    writer turned it into."""
    counter: CountingWriter | None = None
    try:
        with atomic_open(path, "wb") as handle:
            counter = CountingWriter(handle)
            writer(counter)  # type: ignore[arg-type]
    except OSError:
        raise
    except Exception as exc:
        if counter is not None and counter.error is not None:
            raise named_os_error(counter.error, path) from exc
        raise
    assert counter is not None
    return counter.crc, counter.size
