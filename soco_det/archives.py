"""Images inside tar shards and zip archives, read without extracting.

Large image sets often live in archives: WebDataset-style tar shards (``shard-000000.tar`` holding
``key.jpg``, ``key.cls``, ...) or zip files (the official runs read ImageNet from ``train.zip``).
The ``proposals`` and ``pretrain`` stages take them as they are:

* **addressing**: an image inside an archive is ``ARCHIVE::MEMBER``, e.g.
  ``shards/shard-000.tar::n01440764/n01440764_10026.JPEG``; ``ARCHIVE`` is a path (relative to the
  images root in a proposal store's keys, so the store stays valid when the root moves) and
  ``MEMBER`` the member's name inside it (a leading ``./`` dropped);
* **listing** (:func:`list_members`; :func:`soco_det.imageio.list_sources` lists a whole images
  root with it): an images root may be a folder, whose loose images and the image members of
  every ``.tar`` / ``.zip`` under it are listed (sorted, archives in sorted order), or a single
  archive, whose root is then its folder. Both stages list with that one function, so the proposal
  store's keys are the keys the training data looks up;
* **reading** (:func:`read_bytes`): each process opens each archive once and keeps the handle
  (a tar's member index is read once on opening, a zip has its own). A handle opened before a
  ``fork`` is never used by the child (file offsets would be shared): the child reopens;
* **bad input**: a missing or unreadable member raises ``FileNotFoundError`` / ``OSError`` like a
  bad loose file, so :func:`soco_det.imageio.load_rgb` turns it into an
  :class:`~soco_det.errors.ImageError`, which the proposal job records as a failed image and the
  pretraining loader skips and counts.

Compressed tars (``.tar.gz``) are not listed: a gzip stream has no random access, so every read
would decompress from the start. Use uncompressed shards (as WebDataset does) or zip.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from soco_det.errors import UserError

SEP = "::"
ARCHIVE_SUFFIXES = (".tar", ".zip")

# archive path -> (pid that opened it, handle, {member name: tar member or zip name})
_HANDLES: dict[str, tuple[int, Any, dict[str, Any]]] = {}
OPEN_COUNT = {"n": 0}  # archives opened by this process (tests check "once per process")


def is_member_path(path: str | Path) -> bool:
    """Whether ``path`` addresses a member of an archive (``ARCHIVE::MEMBER``)."""
    return SEP in str(path)


def split(path: str | Path) -> tuple[str, str]:
    """``("ARCHIVE", "MEMBER")`` of ``ARCHIVE::MEMBER``."""
    archive, _, member = str(path).partition(SEP)
    return archive, member


def _normalise(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def _open(archive: str) -> tuple[Any, dict[str, Any]]:
    """This process's handle and member index of ``archive`` (opened on first use)."""
    key = os.path.abspath(archive)
    cached = _HANDLES.get(key)
    if cached is not None and cached[0] == os.getpid():
        return cached[1], cached[2]
    if not os.path.isfile(key):
        raise FileNotFoundError(f"archive {archive} not found")
    try:
        if key.lower().endswith(".zip"):
            handle: Any = zipfile.ZipFile(key)
            index = {_normalise(n): n for n in handle.namelist() if not n.endswith("/")}
        else:
            handle = tarfile.open(key, "r:")  # uncompressed only: random access
            index = {_normalise(m.name): m for m in handle.getmembers() if m.isfile()}
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise OSError(f"unreadable archive {archive}: {exc}") from exc
    OPEN_COUNT["n"] += 1
    _HANDLES[key] = (os.getpid(), handle, index)
    return handle, index


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a loose file or of an ``ARCHIVE::MEMBER``.

    Raises ``FileNotFoundError`` (no such file, archive or member) or ``OSError`` (unreadable).
    """
    if not is_member_path(path):
        return Path(path).read_bytes()
    archive, member = split(path)
    handle, index = _open(archive)
    entry = index.get(_normalise(member))
    if entry is None:
        raise FileNotFoundError(f"no member {member!r} in {archive}")
    try:
        if isinstance(handle, zipfile.ZipFile):
            return handle.read(entry)
        data = handle.extractfile(entry)
        if data is None:
            raise OSError(f"{member} in {archive} is not a regular file")
        return data.read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise OSError(f"unreadable member {member!r} of {archive}: {exc}") from exc


def list_members(archive: str | Path, suffixes: tuple[str, ...]) -> list[str]:
    """Members of ``archive`` whose name ends in one of ``suffixes`` (lower case; hidden files
    skipped), sorted."""
    try:
        _, index = _open(str(archive))
    except (OSError, FileNotFoundError) as exc:
        raise UserError(f"{archive}: {exc}") from exc
    return sorted(
        name
        for name in index
        if PurePosixPath(name).suffix.lower() in suffixes and not PurePosixPath(name).name.startswith(".")
    )
