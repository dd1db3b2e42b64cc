"""The proposal store: every image's filtered proposals in a few memory-mapped arrays.

Layout of a store folder (all arrays are ``.npy``, opened with ``mmap_mode="r"`` so data-loader
workers share the pages instead of copying them)::

    meta.json          format, images root, method + params, filter, exif_transpose, max_side,
                       max_pixels, shard, image count, and ``checksums`` (size and CRC32 of every
                       other file); written LAST: a folder without it is not a finished store (the
                       writer removes it first when it rewrites a store)
    paths.npy          uint8 [B]      the relative image paths, utf-8, concatenated (sorted)
    path_offsets.npy   int64 [N + 1]  path i is paths[path_offsets[i]:path_offsets[i + 1]]
    sizes.npy          int32 [N, 2]   decoded RGB (W, H) (after EXIF transpose if recorded); 0 if failed
    offsets.npy        int64 [N + 1]  CSR: image i's boxes are boxes[offsets[i]:offsets[i + 1]]
    boxes.npy          int32 [M, 4]   filtered rects (x, y, w, h), official convention w = max_x - min_x
    status.npy         int8  [N]      0 ok, 1 failed (unreadable, ...), 2 missing (import: no entry)
    stage.npy          int8  [N]      filter stage that produced the boxes (filters.STAGE_*)
    raw_counts.npy     int32 [N]      number of rects before filtering (-1: unknown)
    raw_offsets.npy, raw_boxes.npy    optional (``--keep-raw``): the unfiltered rects, same layout
    failures.json      {relpath: reason} for failed / missing images
    summary.json       the run summary (counts, boxes per image, fallbacks, bytes per image)

Label maps are never stored. The read API is the one of ``docs/architecture.md``.

Opening a store checks it once per process (the loader workers that re-open a pickled store skip
it): every file against its recorded size and CRC32, the arrays' shapes and offsets against each
other, every image path (relative, inside the images root) and every box (inside its image, none
for a failed image). A store that fails is "damaged, recompute it" (a
:class:`~soco_det.errors.UserError`), never read. A store written before checksums were recorded
is checked the same way (its JSON files too) and then gets them (``meta.json`` rewritten
atomically); where its folder cannot be written, it is refused with the command that writes a
checked copy (``soco-det proposals merge OLD -o NEW``).

Merges and imports never leave a half-written store where the store goes: they write
``.NAME.partial`` next to it, under its lock (a second writer gets "in use"), and rename it into
place at the end (:func:`write_new_store`); an interrupted one is redone by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from soco_det.atomic import atomic_open, atomic_write_json
from soco_det.errors import UserError
from soco_det.imageio import check_relative_path
from soco_det.logs import get_logger
from soco_det.proposals.filters import STAGE_NAMES, STAGE_NONE
from soco_det.runlock import LOCK_NAME, FolderLock, aside_name, check_parent_folders

log = get_logger(__name__)

FORMAT = "soco-det-proposals/1"
STATUS_OK, STATUS_FAILED, STATUS_MISSING = 0, 1, 2
STATUS_NAMES = {STATUS_OK: "ok", STATUS_FAILED: "failed", STATUS_MISSING: "missing"}
_ARRAYS = ("paths", "path_offsets", "sizes", "offsets", "boxes", "status", "stage", "raw_counts")
_RAW_ARRAYS = ("raw_offsets", "raw_boxes")


# --- in-memory table (chunks, merges, imports) -------------------------------------------------


@dataclass
class ProposalTable:
    """Per-image results in columnar form (the store's content, fully in memory).

    ``boxes`` / ``raw_boxes`` are lists of ``int32 [n_i, 4]`` rects; ``raw_boxes`` is ``None`` when
    raw rects are not kept.
    """

    paths: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    stage: list[int] = field(default_factory=list)
    raw_counts: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    raw_boxes: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def append(
        self,
        path: str,
        size: tuple[int, int],
        status: int,
        reason: str,
        stage: int,
        raw_count: int,
        boxes: np.ndarray,
        raw: np.ndarray | None = None,
    ) -> None:
        self.paths.append(path)
        self.sizes.append((int(size[0]), int(size[1])))
        self.status.append(int(status))
        self.reasons.append(reason)
        self.stage.append(int(stage))
        self.raw_counts.append(int(raw_count))
        self.boxes.append(np.asarray(boxes, np.int32).reshape(-1, 4))
        if self.raw_boxes is not None:
            self.raw_boxes.append(np.asarray(raw if raw is not None else np.zeros((0, 4)), np.int32).reshape(-1, 4))

    def rows(self) -> Iterable[tuple]:
        raw = self.raw_boxes if self.raw_boxes is not None else [None] * len(self)
        return zip(self.paths, self.sizes, self.status, self.reasons, self.stage, self.raw_counts, self.boxes, raw)

    def reordered(self, paths: Sequence[str], keep_raw: bool | None = None) -> "ProposalTable":
        """A table with exactly ``paths`` in that order (each must be present)."""
        where = {p: i for i, p in enumerate(self.paths)}  # last occurrence wins (a recomputed image)
        keep_raw = self.raw_boxes is not None if keep_raw is None else keep_raw
        out = ProposalTable(raw_boxes=[] if keep_raw else None)
        rows = list(self.rows())
        for p in paths:
            out.append(*rows[where[p]])
        return out

    @staticmethod
    def concat(tables: Sequence["ProposalTable"]) -> "ProposalTable":
        keep_raw = bool(tables) and all(t.raw_boxes is not None for t in tables)
        out = ProposalTable(raw_boxes=[] if keep_raw else None)
        for t in tables:
            for row in t.rows():
                out.append(*row)
        return out

    # chunk files: one npz per chunk of images, written atomically by the worker that computed it
    def save_npz(self, path: str | Path, extra: dict[str, np.ndarray] | None = None) -> None:
        """``extra``: more arrays for the same file (``load_npz`` ignores them)."""
        arrays = {**_to_arrays(self), **(extra or {})}
        arrays["paths"] = np.array(self.paths, dtype=str)
        arrays["reasons"] = np.array(self.reasons, dtype=str)
        del arrays["path_offsets"]
        with atomic_open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @staticmethod
    def load_npz(path: str | Path) -> "ProposalTable":
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        keep_raw = "raw_boxes" in a
        t = ProposalTable(raw_boxes=[] if keep_raw else None)
        for i, p in enumerate(a["paths"].tolist()):
            raw = a["raw_boxes"][a["raw_offsets"][i] : a["raw_offsets"][i + 1]] if keep_raw else None
            t.append(
                p,
                tuple(a["sizes"][i]),
                a["status"][i],
                str(a["reasons"][i]),
                a["stage"][i],
                a["raw_counts"][i],
                a["boxes"][a["offsets"][i] : a["offsets"][i + 1]],
                raw,
            )
        return t


def _csr(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(parts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in parts])
    flat = np.concatenate(parts).astype(np.int32) if parts else np.zeros((0, 4), np.int32)
    return offsets, flat.reshape(-1, 4)


def _to_arrays(table: ProposalTable) -> dict[str, np.ndarray]:
    encoded = [p.encode("utf-8") for p in table.paths]
    path_offsets = np.zeros(len(encoded) + 1, np.int64)
    path_offsets[1:] = np.cumsum([len(e) for e in encoded])
    offsets, boxes = _csr(table.boxes)
    arrays = {
        "paths": np.frombuffer(b"".join(encoded), np.uint8).copy(),
        "path_offsets": path_offsets,
        "sizes": np.asarray(table.sizes, np.int32).reshape(-1, 2),
        "offsets": offsets,
        "boxes": boxes,
        "status": np.asarray(table.status, np.int8),
        "stage": np.asarray(table.stage, np.int8),
        "raw_counts": np.asarray(table.raw_counts, np.int32),
    }
    if table.raw_boxes is not None:
        arrays["raw_offsets"], arrays["raw_boxes"] = _csr(table.raw_boxes)
    return arrays


def paths_digest(paths: Iterable[str]) -> str:
    """sha1 of the sorted relative path list (tells whether a store covers the same images)."""
    h = hashlib.sha1()
    for p in paths:
        h.update(p.encode("utf-8") + b"\n")
    return h.hexdigest()


def summarize(table: ProposalTable, store_bytes: int | None = None) -> dict[str, Any]:
    """Counts of a table: images, failures (with reasons), boxes per image before/after filtering,
    images per fallback stage, bytes per image."""
    n = len(table)
    status = np.asarray(table.status, np.int8)
    ok = status == STATUS_OK
    kept = np.array([len(b) for b in table.boxes], np.int64)[ok]
    raw = np.asarray(table.raw_counts, np.int64)[ok]
    raw = raw[raw >= 0]
    stage = np.asarray(table.stage, np.int8)[ok]

    def stats(v: np.ndarray) -> dict[str, float]:
        return (
            {"mean": round(float(v.mean()), 2), "median": float(np.median(v))}
            if len(v)
            else {"mean": 0.0, "median": 0.0}
        )

    out = {
        "images": n,
        "ok": int(ok.sum()),
        "failed": int((status == STATUS_FAILED).sum()),
        "missing": int((status == STATUS_MISSING).sum()),
        "failures": {p: r for p, s, r in zip(table.paths, table.status, table.reasons) if s != STATUS_OK},
        "raw_boxes_per_image": stats(raw),
        "boxes_per_image": stats(kept),
        "stages": {STAGE_NAMES[s]: int((stage == s).sum()) for s in STAGE_NAMES if s != STAGE_NONE},
        "boxes_total": int(kept.sum()),
    }
    if store_bytes is not None:
        out["store_bytes"] = int(store_bytes)
        out["bytes_per_image"] = round(store_bytes / max(n, 1), 1)
    return out


def format_summary(s: dict[str, Any], max_failures: int = 20) -> str:
    """A few human-readable lines for the log / ``soco-det proposals info``."""
    lines = [
        f"images: {s['images']} (ok {s['ok']}, failed {s['failed']}"
        + (f", missing {s['missing']}" if s.get("missing") else "")
        + ")",
        f"boxes per image before filtering: mean {s['raw_boxes_per_image']['mean']}, median {s['raw_boxes_per_image']['median']}",
        f"boxes per image after filtering:  mean {s['boxes_per_image']['mean']}, median {s['boxes_per_image']['median']}",
        "filter stage per image: " + ", ".join(f"{k} {v}" for k, v in s["stages"].items()),
    ]
    if "bytes_per_image" in s:
        lines.append(f"store: {s['store_bytes']} bytes, {s['bytes_per_image']} bytes per image")
    if "computed" in s:
        lines.append(
            f"this run: computed {s['computed']} images, reused {s['reused']}"
            + (f", {s['images_per_s']} images/s" if s.get("images_per_s") else "")
        )
    refused = s.get("refused") or {}
    if refused:
        lines.append(
            f"left out when listing: {len(refused)} archive member(s) or archive(s) (unsafe or shared member names, "
            "archives that cannot be opened; never stored)"
        )
    for i, (p, r) in enumerate([*refused.items(), *s["failures"].items()]):
        if i == max_failures:
            lines.append(f"  ... and {len(refused) + len(s['failures']) - max_failures} more (see summary.json)")
            break
        lines.append(f"  not used: {p}: {r}")
    return "\n".join(lines)


# --- writing -----------------------------------------------------------------------------------


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def file_checksum(path: str | Path, chunk: int = 1 << 22) -> dict[str, int]:
    """``{"size", "crc32"}`` of a file (zlib's CRC32, about 1 GB/s)."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while data := handle.read(chunk):
            crc = zlib.crc32(data, crc)
            size += len(data)
    return {"size": size, "crc32": crc}


def check_new_output(out: str | Path, overwrite: bool, what: str = "proposal store") -> Path:
    """Before a merge / import writes ``out``: refuse to replace an existing store (or to write
    into a folder that holds other things) unless ``overwrite``; refuse a file where the folder goes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (a {what} is a folder)")
    if out.is_dir():
        entries = [e.name for e in out.iterdir()]
        if (out / "meta.json").is_file() or (out / "parts").is_dir():
            if not overwrite:
                raise UserError(
                    f"{out}: a proposal store is already there; pass --overwrite to replace it, or choose another -o"
                )
        elif entries:
            raise UserError(
                f"{out}: folder is not empty ({len(entries)} entries, e.g. {sorted(entries)[0]!r}) and "
                f"is not a proposal store; choose another -o"
            )
    check_parent_folders(out)
    return out


def write_store(out: str | Path, table: ProposalTable, meta: dict[str, Any], extra_summary: dict | None = None) -> Path:
    """Write ``table`` (rows already in the wanted order) as a store folder.

    Every file is written atomically, and ``meta.json`` — the mark of a finished store — is
    removed first and written last, so a reader never sees a mixed or half-written store.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder (a proposal store is a folder)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    arrays = _to_arrays(table)
    for name in _RAW_ARRAYS:
        if name not in arrays:
            (out / f"{name}.npy").unlink(missing_ok=True)
    for name, array in arrays.items():
        _save_npy(out / f"{name}.npy", array)
    failures = {p: r for p, s, r in zip(table.paths, table.status, table.reasons) if s != STATUS_OK}
    atomic_write_json(out / "failures.json", failures, indent=1)
    nbytes = sum((out / f"{name}.npy").stat().st_size for name in arrays) + (out / "failures.json").stat().st_size
    summary = summarize(table, nbytes)
    summary.update(extra_summary or {})
    atomic_write_json(out / "summary.json", summary, indent=1)
    files = [f"{name}.npy" for name in arrays] + ["failures.json", "summary.json"]
    meta = {
        **meta,
        "format": FORMAT,
        "n_images": len(table),
        "keep_raw": table.raw_boxes is not None,
        "images_sha1": paths_digest(table.paths),
        "checksums": {f: file_checksum(out / f) for f in files},
    }
    atomic_write_json(out / "meta.json", meta, indent=1)
    return out


def write_new_store(
    out: str | Path,
    table: ProposalTable,
    meta: dict[str, Any],
    extra_summary: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a store (a merge, an import) that replaces nothing silently and is never seen half
    written: into ``.NAME.partial`` next to ``out``, holding that folder's lock, then renamed to
    ``out``. An existing store at ``out`` is refused unless ``overwrite``, which moves it aside to
    ``NAME.old-<time>``; the leftovers of an interrupted write are removed first."""
    out = check_new_output(out, overwrite)
    partial = out.with_name(f".{out.name}.partial")
    with FolderLock(partial, "proposal store being written"):
        check_new_output(out, overwrite)  # again: another writer may have finished in the meantime
        for entry in partial.iterdir():
            if entry.name != LOCK_NAME:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        write_store(partial, table, meta, extra_summary)
        aside = None
        if out.is_dir() and any(out.iterdir()):
            aside = aside_name(out)
            os.replace(out, aside)
        elif out.is_dir():
            out.rmdir()
        os.replace(partial, out)
        (out / LOCK_NAME).unlink(missing_ok=True)
    if aside is not None:
        log.warning("--overwrite: the previous store %s is kept as %s", out, aside)
    return out


# --- reading -----------------------------------------------------------------------------------


# (file, size, mtime_ns) -> the checksum it was verified against, in this process.
_VERIFIED: dict[tuple[str, int, int], dict[str, int]] = {}
# (file, size, mtime_ns) of sizes/offsets/boxes/status whose boxes were checked, in this process.
_BOXES_CHECKED: set[tuple] = set()


class _PathList(Sequence):
    """``store.paths``: relative paths decoded on access from the memory-mapped utf-8 blob."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self._blob, self._offsets = blob, offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self._blob[self._offsets[i] : self._offsets[i + 1]]).decode("utf-8")


class ProposalStore:
    """Read access to a finished store (see the module docstring for the layout).

    ``boxes(i)`` returns ``int32 [n, 4]`` rects ``(x, y, w, h)`` in the official convention
    (``w = max_x - min_x``); ``n`` may be 0 (the data loader then uses the whole image). Opening is
    cheap (arrays are memory-mapped); pickling a store (to spawn-started workers) sends only its
    location, and the copy re-opens it.
    """

    def __init__(
        self, path: Path, meta: dict[str, Any], root: str | None = None, verify: bool = True, upgrade: bool = True
    ) -> None:
        self.path = path
        self.meta = meta
        try:
            self._root = str(root) if root is not None else str(meta["root"])
            n = int(meta["n_images"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self.damaged(f"meta.json lacks a valid {exc}") from None
        arrays = _ARRAYS + (_RAW_ARRAYS if meta.get("keep_raw") else ())
        legacy = meta.get("checksums") is None  # written before checksums were recorded
        if verify:
            self._verify_checksums(arrays)
        try:
            self._a = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in arrays}
        except Exception as exc:  # noqa: BLE001 - a damaged .npy header raises many types
            raise self.damaged(f"{type(exc).__name__}: {exc}") from exc
        self._check_arrays(n, verify)
        self._paths = _PathList(self._a["paths"], self._a["path_offsets"])
        self._index: dict[str, int] | None = None
        self._failures: dict[str, str] | None = None
        if verify:
            for relpath in self._paths:
                check_relative_path(relpath, str(path))
            self._check_boxes()
            if legacy:
                self._record_checksums(arrays, upgrade)

    def damaged(self, reason: str) -> UserError:
        return UserError(f"{self.path}: proposal store is damaged ({reason}); recompute it")

    def _verify_checksums(self, arrays: Sequence[str]) -> None:
        """Every file against the size and CRC32 recorded in meta.json (a store written before
        checksums were recorded has none: :meth:`_record_checksums` then)."""
        recorded = self.meta.get("checksums")
        if recorded is None:
            return
        if not isinstance(recorded, dict) or not all(f"{a}.npy" in recorded for a in arrays):
            raise self.damaged("meta.json's checksums do not list every array")
        for name, want in recorded.items():
            file = self.path / name
            try:
                st = file.stat()
                key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
                if _VERIFIED.get(key) != want:
                    got = file_checksum(file) if st.st_size == want.get("size") else {"size": st.st_size}
                    if got != want:
                        raise self.damaged(
                            f"{name} differs from the file that was written "
                            f"({'size' if got.get('size') != want.get('size') else 'CRC32'} mismatch)"
                        )
                    _VERIFIED[key] = want
            except OSError as exc:
                raise self.damaged(f"{name}: {exc.strerror}") from exc
            except AttributeError:
                raise self.damaged("meta.json's checksums are malformed") from None

    def _check_boxes(self, chunk: int = 1 << 22) -> None:
        """Every box inside its image (``0 <= x``, ``x + w <= W - 1``, the same for y), no box for
        an image that failed; once per process and file, ``chunk`` boxes at a time."""
        a = self._a
        try:
            key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in self._box_files())
        except OSError as exc:
            raise self.damaged(f"{exc.filename}: {exc.strerror}") from exc
        if key in _BOXES_CHECKED:
            return
        offsets = np.asarray(a["offsets"], np.int64)
        counts = np.diff(offsets)
        sizes = np.asarray(a["sizes"], np.int64)
        not_ok = np.flatnonzero((np.asarray(a["status"]) != STATUS_OK) & (counts > 0))
        if len(not_ok):
            i = int(not_ok[0])
            raise self.damaged(f"image {i} ({self._paths[i]!r}) is {self.status(i)} but has {counts[i]} boxes")
        start, n = 0, len(counts)
        while start < n:
            stop = max(start + 1, int(np.searchsorted(offsets, offsets[start] + chunk, side="right")) - 1)
            boxes = np.asarray(a["boxes"][offsets[start] : offsets[stop]], np.int64)
            wh = np.repeat(sizes[start:stop], counts[start:stop], axis=0)
            bad = (boxes < 0).any(axis=1) | (boxes[:, :2] + boxes[:, 2:] > wh - 1).any(axis=1)
            if bad.any():
                j = int(np.argmax(bad))
                i = int(np.searchsorted(offsets, offsets[start] + j, side="right")) - 1
                raise self.damaged(
                    f"image {i} ({self._paths[i]!r}): box {boxes[j].tolist()} (x, y, w, h) lies outside its "
                    f"{sizes[i][0]}x{sizes[i][1]} image"
                )
            start = stop
        _BOXES_CHECKED.add(key)

    def _box_files(self) -> list[Path]:
        return [self.path / f"{name}.npy" for name in ("sizes", "offsets", "boxes", "status")]

    def _record_checksums(self, arrays: Sequence[str], upgrade: bool) -> None:
        """A store written before checksums were recorded, checked like any other (its JSON files
        too): record them in meta.json (``upgrade``) or refuse it if that cannot be written."""
        for name in ("failures.json", "summary.json"):
            self._read_json(name)
        if not upgrade:
            return
        files = [f"{name}.npy" for name in arrays] + ["failures.json", "summary.json"]
        checksums = {name: file_checksum(self.path / name) for name in files}
        try:
            atomic_write_json(self.path / "meta.json", {**self.meta, "checksums": checksums}, indent=1)
        except OSError as exc:
            raise UserError(
                f"{self.path}: proposal store has no checksums (written by an older soco-det) and they cannot be "
                f"added to its meta.json ({exc.strerror}); write a checked copy with "
                f"`soco-det proposals merge {self.path} -o NEW_STORE` and use that"
            ) from None
        self.meta["checksums"] = checksums
        log.warning(
            "%s: store written without checksums (an older soco-det): its structure and boxes are checked and "
            "checksums are now recorded in its meta.json",
            self.path,
        )

    def _check_arrays(self, n: int, full: bool) -> None:
        """Shapes, dtypes and CSR offsets agree with each other and with meta.json."""
        a = self._a

        def csr_ok(offsets: np.ndarray, rows: int, count: int) -> bool:
            if offsets.ndim != 1 or len(offsets) != rows + 1 or offsets.dtype.kind not in "iu":
                return False
            if not len(offsets):
                return False
            if int(offsets[0]) != 0 or int(offsets[-1]) != count:
                return False
            return not full or bool(np.all(np.diff(np.asarray(offsets)) >= 0))

        problems = []
        if not csr_ok(a["path_offsets"], n, len(a["paths"])) or a["paths"].dtype != np.uint8:
            problems.append("paths / path_offsets")
        if a["boxes"].ndim != 2 or a["boxes"].shape[1:] != (4,) or not csr_ok(a["offsets"], n, len(a["boxes"])):
            problems.append("boxes / offsets")
        if a["sizes"].shape != (n, 2):
            problems.append("sizes")
        for name in ("status", "stage", "raw_counts"):
            if a[name].shape != (n,):
                problems.append(name)
        if full and len(a["status"]) and not np.isin(np.asarray(a["status"]), list(STATUS_NAMES)).all():
            problems.append("status values")
        if "raw_boxes" in a and (a["raw_boxes"].ndim != 2 or not csr_ok(a["raw_offsets"], n, len(a["raw_boxes"]))):
            problems.append("raw_boxes / raw_offsets")
        if problems:
            raise self.damaged(f"{', '.join(problems)} do not match each other or meta.json ({n} images)")

    @classmethod
    def open(
        cls, path: str | Path, root: str | Path | None = None, verify: bool = True, upgrade: bool = True
    ) -> "ProposalStore":
        """Open the store folder ``path`` (or its ``meta.json``); ``root`` overrides the recorded
        images root (for a dataset that was moved). ``verify``: check the files' checksums, the
        arrays' structure and the boxes (once per process and file; see the module docstring).
        ``upgrade``: record checksums in a store written without them (else it is only checked)."""
        path = Path(path)
        if path.name == "meta.json":
            path = path.parent
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            if (path / "parts").is_dir():
                raise UserError(
                    f"{path}: proposal run is not finished (only partial results in parts/); rerun the same "
                    "`soco-det proposals` command to resume it"
                )
            raise UserError(f"{path}: not a proposal store (no meta.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: proposal store is damaged (meta.json: {exc}); recompute it") from exc
        if not isinstance(meta, dict):
            raise UserError(f"{path}: proposal store is damaged (meta.json is not an object); recompute it")
        if meta.get("format") != FORMAT:
            raise UserError(f"{path}: unknown proposal store format {meta.get('format')!r} (expected {FORMAT})")
        return cls(path, meta, root, verify=verify, upgrade=upgrade)

    def __getstate__(self) -> dict:
        return {"path": self.path, "root": self._root}

    def __setstate__(self, state: dict) -> None:
        # A copy sent to a loader worker: the parent has checked the store already.
        other = ProposalStore.open(state["path"], state["root"], verify=False)
        self.__dict__.update(other.__dict__)

    def __len__(self) -> int:
        return int(self.meta["n_images"])

    def __repr__(self) -> str:
        return f"ProposalStore({str(self.path)!r}, images={len(self)}, method={self.meta.get('method')!r})"

    @property
    def root(self) -> str:
        return self._root

    @property
    def paths(self) -> Sequence[str]:
        return self._paths

    @property
    def exif_transpose(self) -> bool:
        return bool(self.meta.get("exif_transpose", False))

    def index(self, relpath: str) -> int | None:
        """Position of ``relpath`` (posix, relative to ``root``), or ``None``; O(1) after the first call."""
        if self._index is None:
            self._index = {p: i for i, p in enumerate(self._paths)}
        return self._index.get(relpath)

    def size(self, i: int) -> tuple[int, int]:
        """Decoded RGB ``(W, H)`` of image ``i``."""
        w, h = self._a["sizes"][i]
        return int(w), int(h)

    def boxes(self, i: int) -> np.ndarray:
        """Filtered rects of image ``i``: ``int32 [n, 4]`` ``(x, y, w, h)``, official convention."""
        o = self._a["offsets"]
        return np.asarray(self._a["boxes"][o[i] : o[i + 1]])

    def raw_boxes(self, i: int) -> np.ndarray:
        """Unfiltered rects of image ``i`` (only in stores computed with ``keep_raw``)."""
        if not self.meta.get("keep_raw"):
            raise UserError(f"{self.path}: raw boxes were not kept (compute with --keep-raw)")
        o = self._a["raw_offsets"]
        return np.asarray(self._a["raw_boxes"][o[i] : o[i + 1]])

    def status(self, i: int) -> str:
        """``"ok"``, ``"failed"`` (unreadable image: see :meth:`reason`) or ``"missing"``."""
        return STATUS_NAMES[int(self._a["status"][i])]

    def ok_indices(self) -> np.ndarray:
        """Indices of the images that were decoded and processed (int64)."""
        return np.flatnonzero(np.asarray(self._a["status"]) == STATUS_OK)

    def reason(self, i: int) -> str:
        if self._failures is None:
            self._failures = self._read_json("failures.json")
        return self._failures.get(self._paths[i], "")

    def stage(self, i: int) -> str:
        """Filter stage that produced image ``i``'s boxes: main / ratio / min_side / empty / n/a."""
        return STAGE_NAMES[int(self._a["stage"][i])]

    def raw_count(self, i: int) -> int:
        return int(self._a["raw_counts"][i])

    @property
    def summary(self) -> dict[str, Any]:
        return self._read_json("summary.json")

    def _read_json(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, ValueError) as exc:
            raise self.damaged(f"{name}: {exc}") from exc
        if not isinstance(data, dict):
            raise self.damaged(f"{name} is not a JSON object")
        return data

    def settings(self) -> dict[str, Any]:
        """What produced the boxes (method, params, filter, max_side, exif_transpose, max_pixels)."""
        keys = ("method", "params", "filter", "max_side", "exif_transpose", "max_pixels")
        return {k: self.meta.get(k) for k in keys}

    def table(self) -> ProposalTable:
        """The whole store in memory (for merges, exports and incremental reruns)."""
        keep_raw = bool(self.meta.get("keep_raw"))
        t = ProposalTable(raw_boxes=[] if keep_raw else None)
        sizes, status, stage, raw_counts = (np.asarray(self._a[k]) for k in ("sizes", "status", "stage", "raw_counts"))
        for i in range(len(self)):
            t.append(
                self._paths[i],
                tuple(sizes[i]),
                status[i],
                self.reason(i) if status[i] else "",
                stage[i],
                raw_counts[i],
                self.boxes(i),
                self.raw_boxes(i) if keep_raw else None,
            )
        return t


def store_bytes(path: str | Path) -> int:
    """Total size of a store folder's files (without a leftover ``parts/``)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
