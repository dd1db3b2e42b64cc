"""Images inside tar shards and zip archives, read without extracting.

Large image sets often live in archives: WebDataset-style tar shards (``shard-000000.tar`` holding
``key.jpg``, ``key.cls``, ...) or zip files (the official runs read ImageNet from ``train.zip``).
The ``proposals`` and ``pretrain`` stages take them as they are:

* **addressing**: an image inside an archive is ``ARCHIVE::MEMBER``, e.g.
  ``shards/shard-000.tar::n01440764/n01440764_10026.JPEG``; ``ARCHIVE`` is a path (relative to the
  images root in a proposal store's keys, so the store stays valid when the root moves) and
  ``MEMBER`` the member's name inside it (leading ``./`` dropped);
* **listing** (:func:`list_members`; :func:`soco_det.imageio.list_sources` lists whole inputs with
  it): the image members of an archive, and the ones refused at listing time with the reason:
  unsafe names (absolute, with a ``..`` component, holding ``::``) and names that two members share
  once ``./`` and empty components are dropped (which one is the image is ambiguous). Refused
  members never become keys, so they never enter a proposal store or the training data;
* **reading** (:func:`read_bytes`): each archive's member index (name -> where its bytes are) is
  read once per process; the bytes are read with ``pread`` on a file descriptor from a bounded
  pool (least recently used closed first, :func:`max_open_archives`), so a folder of thousands of
  shards never runs out of file descriptors. ``pread`` uses no file offset, and a child process
  opens its own descriptors, so readers in forked workers never interfere;
* **bad input**: a member that cannot be an image is an ``OSError`` naming the problem, which
  :func:`soco_det.imageio.load_rgb` turns into an :class:`~soco_det.errors.ImageError` (a failed
  image in the proposal job, a skipped and counted one in the pretraining loader): above the size
  limit (:func:`max_member_bytes`, checked on the declared and the stored size before anything is
  read, and again while inflating), a sparse tar member (a few KB declaring gigabytes), a member
  cut off by a truncated archive, a damaged zip member (CRC32). An archive that cannot be opened
  at all (not a tar or zip, a zip whose end is cut off) fails its own members only.

Compressed tars (``.tar.gz``) are not listed: a gzip stream has no random access, so every read
would decompress from the start. Use uncompressed shards (as WebDataset does) or zip.
"""

from __future__ import annotations

import collections
import os
import posixpath
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from soco_det.errors import UserError

SEP = "::"
ARCHIVE_SUFFIXES = (".tar", ".zip")

# A member (or loose file) larger than this is not read: no image the pipeline decodes needs more
# (a 64-Mpx 16-bit RGBA PNG stored uncompressed is 512 MB; a 64-Mpx JPEG is ~30 MB).
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
MAX_MEMBER_ENV = "SOCO_DET_MAX_MEMBER_BYTES"
MAX_OPEN_ENV = "SOCO_DET_MAX_OPEN_ARCHIVES"

_STORED, _DEFLATED, _TAR = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, -1
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's structFileHeader (30 bytes)


class Member(NamedTuple):
    """Where a member's bytes are: ``offset`` (tar: of the data; zip: of the local header),
    ``size`` (declared, uncompressed), ``stored`` (bytes in the archive), ``method`` (zip
    compression, -1 for tar), ``crc`` (zip CRC32) and ``problem`` (why it cannot be read, or '')."""

    offset: int
    size: int
    stored: int
    method: int
    crc: int
    problem: str


class ArchiveIndex(NamedTuple):
    """One archive's readable members by key, the refused ones (raw name -> reason), and
    ``error``: why the archive cannot be opened at all ('' when it can)."""

    members: dict[str, Member]
    refused: dict[str, str]
    error: str
    stat: tuple[int, int]  # (size, mtime_ns) the index was read from


# archive path -> its index (plain data, valid in forked children too)
_INDEXES: dict[str, ArchiveIndex] = {}
# archive path -> file descriptor of this process, least recently used first; _OWNER: the pid
# that opened them (a forked child finds its parent's pid there and opens its own)
_FDS: collections.OrderedDict[str, int] = collections.OrderedDict()
_OWNER = {"pid": os.getpid()}
OPEN_COUNT = {"n": 0}  # archive indexes read by this process (tests check "once per process")


def max_member_bytes() -> int:
    """The size limit of one member or loose image file, in bytes: ``$SOCO_DET_MAX_MEMBER_BYTES``
    (0: no limit), else :data:`DEFAULT_MAX_MEMBER_BYTES`."""
    return _env_int(MAX_MEMBER_ENV, DEFAULT_MAX_MEMBER_BYTES) or (1 << 62)


def max_open_archives() -> int:
    """How many archives a process keeps open: ``$SOCO_DET_MAX_OPEN_ARCHIVES``, else a quarter of
    the soft open-files limit (64 under ``ulimit -n 256``), between 8 and 256."""
    default = 64
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            default = soft // 4
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        pass
    return max(1, _env_int(MAX_OPEN_ENV, max(8, min(256, default))))


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"${name}={text!r}: expected a whole number") from None
    if value < 0:
        raise UserError(f"${name}={text!r}: must be >= 0")
    return value


def is_member_path(path: str | Path) -> bool:
    """Whether ``path`` addresses a member of an archive (``ARCHIVE::MEMBER``)."""
    return SEP in str(path)


def split(path: str | Path) -> tuple[str, str]:
    """``("ARCHIVE", "MEMBER")`` of ``ARCHIVE::MEMBER``."""
    archive, _, member = str(path).partition(SEP)
    return archive, member


def member_key(name: str) -> str:
    """The key of a member name: leading ``./`` dropped (WebDataset writes ``./key.jpg``)."""
    while name.startswith("./"):
        name = name[2:]
    return name


def unsafe_reason(name: str) -> str:
    """Why a member name cannot be a key inside the images root, or '' when it can."""
    if not name or not member_key(name).strip("/."):
        return "empty member name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute member name"
    if ".." in name.replace("\\", "/").split("/"):
        return "member name with a '..' component (would point outside the archive)"
    if SEP in name or "\x00" in name:
        return f"member name holding {SEP!r} or a NUL byte"
    return ""


def _canonical(key: str) -> str:
    """The name two members must not share: no empty or ``.`` components."""
    return "/".join(p for p in key.split("/") if p not in ("", "."))


def _finish_index(entries: list[tuple[str, Member]], error: str, stat: tuple[int, int]) -> ArchiveIndex:
    """Keys of the regular-file members; unsafe and shared names go to ``refused``."""
    refused: dict[str, str] = {}
    by_name: dict[str, list[str]] = collections.defaultdict(list)
    safe: dict[str, Member] = {}
    for raw, member in entries:
        reason = unsafe_reason(raw)
        if reason:
            refused[raw] = reason
            continue
        key = member_key(raw)
        by_name[_canonical(key)].append(key)
        safe[key] = member
    members = {}
    for keys in by_name.values():
        if len(keys) > 1:
            for key in keys:
                refused[key] = f"{len(keys)} members are named {_canonical(key)!r}: which one is the image is ambiguous"
            continue
        members[keys[0]] = safe[keys[0]]
    return ArchiveIndex(members, refused, error, stat)


def _tar_entries(path: str, size: int) -> tuple[list[tuple[str, Member]], str]:
    """Regular-file members of an uncompressed tar, read up to where the archive is cut off."""
    entries: list[tuple[str, Member]] = []
    with open(path, "rb") as handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r:")
        except (tarfile.TarError, EOFError, ValueError) as exc:
            return [], f"not a readable uncompressed tar ({exc})"
        try:
            while (info := tar.next()) is not None:
                if not info.isfile():
                    continue
                problem = ""
                if info.issparse():
                    problem = f"sparse tar member declaring {info.size} bytes (a tar bomb?)"
                elif info.offset_data + info.size > size:
                    problem = "truncated archive: it ends inside this member"
                entries.append((info.name, Member(info.offset_data, info.size, info.size, _TAR, 0, problem)))
        except (tarfile.TarError, EOFError, ValueError):
            pass  # cut off inside a header: the members read so far stay usable
    return entries, ""


def _zip_entries(path: str, size: int) -> tuple[list[tuple[str, Member]], str]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        return [], f"not a readable zip ({exc}; a zip cut off at the end loses its table of contents)"
    entries = []
    for info in infos:
        if info.is_dir():
            continue
        problem = ""
        if info.flag_bits & 0x1:
            problem = "encrypted zip member"
        elif info.compress_type not in (_STORED, _DEFLATED):
            problem = f"zip compression method {info.compress_type} is not supported (use stored or deflate)"
        elif info.header_offset + info.compress_size > size:
            problem = "truncated archive: it ends inside this member"
        member = Member(info.header_offset, info.file_size, info.compress_size, info.compress_type, info.CRC, problem)
        entries.append((info.filename, member))
    return entries, ""


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def archive_index(archive: str | Path) -> ArchiveIndex:
    """The member index of ``archive`` (read on first use in this process, again if the file
    changed). Raises ``FileNotFoundError`` for a missing archive."""
    key = os.path.abspath(archive)
    try:
        stat = _stat(key)
    except FileNotFoundError:
        raise FileNotFoundError(f"archive {archive} not found") from None
    cached = _INDEXES.get(key)
    if cached is not None and cached.stat == stat:
        return cached
    reader = _zip_entries if key.lower().endswith(".zip") else _tar_entries
    entries, error = reader(key, stat[0])
    OPEN_COUNT["n"] += 1
    _INDEXES[key] = index = _finish_index(entries, error, stat)
    _own_pool()
    _close_fd(key)  # the file may have been replaced: a descriptor of the old one must not be used
    return index


def _own_pool() -> None:
    """After a fork the pool holds the parent's descriptors (copies): close them in the child."""
    if _OWNER["pid"] != os.getpid():
        _OWNER["pid"] = os.getpid()
        close_all()


def _close_fd(key: str) -> None:
    fd = _FDS.pop(key, None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _fd(key: str) -> int:
    """A descriptor of ``key`` from this process's bounded pool (least recently used closed first)."""
    _own_pool()
    fd = _FDS.get(key)
    if fd is not None:
        _FDS.move_to_end(key)
        return fd
    limit = max_open_archives()
    while len(_FDS) >= limit:
        _close_fd(next(iter(_FDS)))
    fd = os.open(key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    _FDS[key] = fd
    return fd


def open_count() -> int:
    """Archive descriptors this process holds now (at most :func:`max_open_archives`)."""
    _own_pool()
    return len(_FDS)


def close_all() -> None:
    """Close this process's archive descriptors (the member indexes stay cached)."""
    for key in list(_FDS):
        _close_fd(key)


def _pread(fd: int, n: int, offset: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = os.pread(fd, min(n - got, 1 << 24), offset + got)
        if not data:
            raise OSError(f"{what}: truncated archive (ends {n - got} bytes before the member's end)")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _check_limit(size: int, stored: int, what: str) -> int:
    limit = max_member_bytes()
    if max(size, stored) > limit:
        raise OSError(
            f"{what} is {max(size, stored)} bytes, above the limit of {limit} bytes for one image "
            f"(raise it with ${MAX_MEMBER_ENV})"
        )
    return limit


def _read_zip_member(fd: int, member: Member, limit: int, what: str) -> bytes:
    header = _pread(fd, _ZIP_LOCAL_HEADER.size, member.offset, what)
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    if fields[0] != zipfile.stringFileHeader:
        raise OSError(f"{what}: damaged zip (no local header where the table of contents says)")
    start = member.offset + _ZIP_LOCAL_HEADER.size + fields[10] + fields[11]  # + name and extra fields
    raw = _pread(fd, member.stored, start, what)
    if member.method == _STORED:
        data = raw
    else:
        inflater = zlib.decompressobj(-15)
        try:
            data = inflater.decompress(raw, min(limit, member.size) + 1)
        except zlib.error as exc:
            raise OSError(f"{what}: damaged deflate data ({exc})") from None
    if len(data) != member.size:
        raise OSError(f"{what}: inflates to other than its declared {member.size} bytes (damaged or a zip bomb)")
    if zlib.crc32(data) != member.crc:
        raise OSError(f"{what}: CRC32 mismatch (damaged member)")
    return data


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a loose file or of an ``ARCHIVE::MEMBER``, at most :func:`max_member_bytes`.

    Raises ``FileNotFoundError`` (no such file, archive or member) or ``OSError`` (unreadable,
    too large, sparse, truncated, damaged; the message says which).
    """
    if not is_member_path(path):
        size = os.stat(path).st_size
        _check_limit(size, size, f"{path}")
        with open(path, "rb") as handle:
            return handle.read()
    archive, name = split(path)
    what = f"member {name!r} of {archive}"
    index = archive_index(archive)
    if index.error:
        raise OSError(f"unreadable archive {archive}: {index.error}")
    member = index.members.get(member_key(name))
    if member is None:
        reason = index.refused.get(name) or index.refused.get(member_key(name))
        if reason:
            raise OSError(f"{what}: refused ({reason})")
        raise FileNotFoundError(f"no member {name!r} in {archive}")
    if member.problem:
        raise OSError(f"{what}: {member.problem}")
    limit = _check_limit(member.size, member.stored, what)
    fd = _fd(os.path.abspath(archive))
    if member.method == _TAR:
        return _pread(fd, member.size, member.offset, what)
    return _read_zip_member(fd, member, limit, what)


class Listing(NamedTuple):
    """Image members of one archive: ``names`` (keys, sorted) and ``refused`` (name -> reason:
    unsafe or shared names, or the whole archive under the name ``''`` when it cannot be opened)."""

    names: list[str]
    refused: dict[str, str]


def list_members(archive: str | Path, suffixes: tuple[str, ...]) -> Listing:
    """Members of ``archive`` whose name ends in one of ``suffixes`` (lower case; hidden files
    skipped), sorted; an unreadable archive lists nothing and is refused as a whole."""
    try:
        index = archive_index(archive)
    except OSError as exc:
        return Listing([], {"": f"unreadable archive ({exc})"})
    if index.error:
        return Listing([], {"": f"unreadable archive: {index.error}"})

    def image(name: str) -> bool:
        base = PurePosixPath(posixpath.normpath(name.replace("\\", "/")) if name else "")
        return base.suffix.lower() in suffixes and not base.name.startswith(".")

    names = sorted(name for name in index.members if image(name))
    refused = {name: reason for name, reason in sorted(index.refused.items()) if image(name)}
    return Listing(names, refused)
