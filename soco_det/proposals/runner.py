"""The proposal job: parallel, resumable, shardable; one bad image never stops it.

``compute_store`` lists the images (sorted), keeps this shard's share, and computes the images
that have no result yet in chunks. Each chunk's results are written by the process that computed
them as one atomic file ``STORE/parts/chunk_XXXXXX.npz``, so a run killed at any point (or a
worker killed by the OOM killer) keeps every finished chunk, and a rerun of the same command
computes only the missing images. When every image has a result the store is written (atomically,
``meta.json`` last) and ``parts/`` is removed; running again on a finished store is a no-op.

Per image: decode with :func:`soco_det.imageio.load_rgb` (official convention: no EXIF transpose
unless asked), run the method (optionally at a reduced size, rects mapped back to full resolution),
filter (:mod:`soco_det.proposals.filters`). An unreadable image, or a method error, is recorded
with its reason and the run goes on; images too small for any box get no proposals.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from soco_det.atomic import atomic_write_json
from soco_det.errors import ImageError, UserError
from soco_det.imageio import DEFAULT_MAX_PIXELS, list_sources, load_rgb
from soco_det.logs import Progress, get_logger
from soco_det.proposals.filters import STAGE_EMPTY, STAGE_NONE, parse_filter
from soco_det.proposals.fit import Fit, fit_settings
from soco_det.proposals.methods import get_method, resolve_params, run_method
from soco_det.proposals.sizes import format_sides, large_box_warning, side_histogram, table_sides
from soco_det.proposals.store import (
    STATUS_FAILED,
    STATUS_OK,
    ProposalStore,
    ProposalTable,
    check_new_output,
    format_summary,
    paths_digest,
    write_new_store,
    write_store,
)
from soco_det.runlock import FolderLock, check_output_folder

log = get_logger(__name__)

# Settings that change the boxes: a resumed run or an existing store must have the same ones.
_SETTING_KEYS = ("method", "params", "filter", "max_side", "exif_transpose", "keep_raw", "max_pixels", "root", "shard")
_MAX_POOL_RESTARTS = 3


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N`` (0-based, like ``SLURM_ARRAY_TASK_ID`` of
    ``--array=0-(N-1)``)."""
    if shard is None:
        return None
    if isinstance(shard, str):
        try:
            k_text, n_text = shard.split("/")
            k, n = int(k_text), int(n_text)
        except ValueError:
            raise UserError(f"--shard {shard!r}: expected K/N, e.g. 0/8 (K counts from 0)") from None
    else:
        k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise UserError(f"--shard {k}/{n}: K must be in 0..N-1 (K counts from 0)")
    return k, n


def shard_paths(paths: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """This shard's images: every N-th image of the sorted list, starting at K (deterministic, and
    balanced across folders)."""
    if shard is None:
        return list(paths)
    k, n = shard
    return [p for i, p in enumerate(paths) if i % n == k]


# --- one image, one chunk (run in worker processes: top-level, picklable) ----------------------


def process_image(root: str, relpath: str, settings: dict[str, Any]) -> tuple:
    """Compute one image; returns a :class:`ProposalTable` row. Never raises for a bad image."""
    spec = parse_filter(settings["filter"])
    empty = np.zeros((0, 4), np.int32)
    try:
        img = load_rgb(
            Path(root) / relpath, exif_transpose=settings["exif_transpose"], max_pixels=settings["max_pixels"]
        )
    except ImageError as exc:
        return relpath, (0, 0), STATUS_FAILED, exc.reason, STAGE_NONE, 0, empty, empty
    except MemoryError:
        return relpath, (0, 0), STATUS_FAILED, "out of memory while decoding", STAGE_NONE, 0, empty, empty
    image = np.asarray(img)
    h, w = image.shape[:2]
    if spec.min_side and min(w, h) - 1 < spec.min_side:
        # No rect of this image can reach the minimum side (w is max - min <= W - 1).
        return relpath, (w, h), STATUS_OK, "", STAGE_EMPTY, 0, empty, empty
    try:
        rects = run_method(settings["method"], image, settings["params"], settings["max_side"])
    except UserError:
        raise  # a configuration problem (e.g. OpenCV missing) concerns every image: stop
    except Exception as exc:  # noqa: BLE001 - one image must not stop a long job; the reason is kept
        reason = f"{settings['method']} failed: {type(exc).__name__}: {exc}"
        return relpath, (w, h), STATUS_FAILED, reason, STAGE_NONE, 0, empty, empty
    kept, stage = spec.apply(rects, w, h)
    return relpath, (w, h), STATUS_OK, "", stage, len(rects), kept, rects


def compute_chunk(chunk_file: str, root: str, relpaths: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    """Compute ``relpaths`` and write them atomically to ``chunk_file``; returns small stats."""
    t0 = time.perf_counter()
    table = ProposalTable(raw_boxes=[] if settings["keep_raw"] else None)
    raw_rows = []
    for relpath in relpaths:
        row = process_image(root, relpath, settings)
        table.append(*row)
        raw_rows.append((row[7], row[1]))
    # the raw rects' side distribution, kept even when the rects are not (soco_det.proposals.sizes)
    table.save_npz(chunk_file, extra={"raw_side_hist": side_histogram(raw_rows)})
    return {"images": len(relpaths), "failed": table.status.count(STATUS_FAILED), "seconds": time.perf_counter() - t0}


# --- the job -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Worker processes use one BLAS/OpenMP/numba thread each: the parallelism is the processes."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load_parts(parts: Path) -> tuple[list[ProposalTable], int]:
    """Finished chunk tables in ``parts`` and the next free chunk number. Leftover temporary
    files of killed writers are removed (they are never complete chunks)."""
    for tmp in parts.glob(".chunk_*.tmp"):
        tmp.unlink(missing_ok=True)
    tables, next_id = [], 0
    for f in sorted(parts.glob("chunk_*.npz")):
        next_id = max(next_id, int(f.stem.split("_")[1]) + 1)
        try:
            tables.append(ProposalTable.load_npz(f))
        except Exception as exc:  # noqa: BLE001 - not expected (atomic writes), but never fatal
            log.warning("ignoring unreadable partial result %s (%s); its images are recomputed", f, exc)
            f.unlink(missing_ok=True)
    return tables, next_id


def _check_settings(where: Path, recorded: dict[str, Any], settings: dict[str, Any]) -> None:
    diff = [k for k in _SETTING_KEYS if recorded.get(k) != settings.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
        raise UserError(
            f"{where} was computed with other settings ({detail}); use another output folder, "
            "or delete it to start again"
        )


def _exit_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: a thread that ends the worker when its parent process is gone (a
    killed ``soco-det proposals`` must not leave workers computing, and writing chunks, behind)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_chunks(
    tasks: list[tuple[str, list[str]]], root: str, settings: dict[str, Any], workers: int, bar: Progress
) -> dict[str, int]:
    """Run chunk tasks in-process (``workers <= 1``) or in a pool of spawned processes. A pool
    broken by a dead worker is restarted for the chunks that have no file yet."""
    stats = {"images": 0, "failed": 0}

    def done(s: dict[str, Any]) -> None:
        stats["images"] += s["images"]
        stats["failed"] += s["failed"]
        bar.set_postfix(f"failed {stats['failed']}")
        bar.update(s["images"])

    if workers <= 1:
        for chunk_file, relpaths in tasks:
            done(compute_chunk(chunk_file, root, relpaths, settings))
        return stats
    if settings["method"] == "selective_search":
        # Compile (or load from numba's cache) once here, not in every worker at the same time.
        from soco_det.proposals.selective_search import warm_up

        warm_up()
    restarts = 0
    pending = list(tasks)
    ctx = multiprocessing.get_context("spawn")  # safe with threads (torch, OpenCV) and on every OS
    while pending:
        try:
            with (
                _single_threaded_children(),
                ProcessPoolExecutor(
                    max_workers=workers, mp_context=ctx, initializer=_exit_with_parent, initargs=(os.getpid(),)
                ) as pool,
            ):
                futures = [pool.submit(compute_chunk, f, root, r, settings) for f, r in pending]
                for future in as_completed(futures):
                    done(future.result())
            pending = []
        except BrokenProcessPool:
            pending = [(f, r) for f, r in pending if not Path(f).exists()]
            restarts += 1
            if restarts > _MAX_POOL_RESTARTS:
                raise UserError(
                    f"worker processes died {restarts} times (killed, or out of memory?); the finished images are "
                    f"saved - rerun the same command to resume (with fewer --workers or a --max-side if memory is short)"
                ) from None
            log.warning(
                "a worker process died (killed or out of memory?); restarting the pool for the %d unfinished "
                "chunks (finished chunks are kept)",
                len(pending),
            )
    return stats


def compute_store(
    images: str | Path | Sequence[str | Path],
    out: str | Path,
    method: str = "selective_search",
    workers: int = 1,
    max_side: int | None = None,
    shard: str | tuple[int, int] | None = None,
    filter: str | None = None,
    keep_raw: bool = False,
    params: dict | None = None,
    exif_transpose: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    chunk_size: int = 32,
    keep_parts: bool = False,
    object_size: str = "paper",
) -> Path:
    """Compute (or resume, or extend) the proposal store ``out`` for the images of ``images``: a
    folder, archives, image files, patterns such as ``shards/shard-{000..009}.tar`` or ``.txt``
    list files, one or several (:func:`soco_det.imageio.list_sources`, whose refused members are
    counted in the summary). Images that cannot be read are failed entries, never an error.

    ``method``: a name of :data:`soco_det.proposals.methods.METHODS` with ``params`` overriding its
    defaults; ``max_side``: run the method on a copy whose longer side is at most this many pixels
    (rects are mapped back to full resolution); ``shard``: ``"K/N"`` computes only every N-th image
    starting at K into a partial store (combine with :func:`merge_stores`); ``filter``: a strategy
    string of :func:`soco_det.proposals.filters.parse_filter` (``None``: the one ``object_size`` fits);
    ``object_size``: ``paper`` (the official settings), ``auto``, ``N``, ``N%`` or ``coco:FILE``
    (:mod:`soco_det.proposals.fit`; explicit ``params`` and ``filter`` win); ``keep_raw``: also store the
    unfiltered rects; ``exif_transpose``: apply EXIF orientation (recorded in the store, training
    uses the same); ``max_pixels``: refuse larger images. Returns the store folder.
    """
    t0 = time.perf_counter()
    out = check_output_folder(out, "proposal store")
    _check_options(workers, chunk_size, max_side, max_pixels)
    listing = list_sources(images)  # loose images and ARCHIVE::MEMBER keys (soco_det.imageio.list_sources)
    root, listed = listing.root, listing.keys
    log_refused(listing.refused)
    shard_kn = parse_shard(shard)
    fit = _fit(object_size, root, listed, method, max_side, exif_transpose, max_pixels, filter, params)
    settings = {
        "method": method,
        "params": resolve_params(method, {**fit.params, **(params or {})}),
        "filter": parse_filter(filter if filter is not None else fit.filter).name,
        "max_side": int(max_side) if max_side is not None else None,
        "exif_transpose": bool(exif_transpose),
        "keep_raw": bool(keep_raw),
        "max_pixels": int(max_pixels) if max_pixels else None,
        "root": str(root),
        "shard": f"{shard_kn[0]}/{shard_kn[1]}" if shard_kn else None,
    }
    relpaths = shard_paths(listed, shard_kn)
    if not relpaths:
        raise UserError(f"{root}: no images found" + (f" for shard {settings['shard']}" if shard_kn else ""))
    digest = paths_digest(relpaths)

    sources = _finished_results(out, settings, digest)
    if sources is None:
        return out
    parts = out / "parts"
    # One process per job: a second one on the same folder gets an error naming the first.
    with FolderLock(parts, "proposal job folder"):
        return _compute(
            out,
            parts,
            root,
            relpaths,
            settings,
            sources,
            workers,
            chunk_size,
            keep_raw,
            keep_parts,
            t0,
            listing.refused,
            _fit_record(fit, filter, params),
        )


def _finished_results(out: Path, settings: dict[str, Any], digest: str) -> list[ProposalTable] | None:
    """Results we already have in a finished store at ``out`` (same settings required); ``None``
    when it already holds exactly these images."""
    if not (out / "meta.json").is_file():
        return []
    existing = ProposalStore.open(out)
    _check_settings(out, existing.meta, settings)
    if existing.meta.get("images_sha1") == digest:
        log.info("%s is already complete (%d images, same settings): nothing to do", out, len(existing))
        return None
    return [existing.table()]


def _fit(
    object_size: str,
    root: Path,
    listed: Sequence[str],
    method: str,
    max_side: int | None,
    exif_transpose: bool,
    max_pixels: int | None,
    filter: str | None,
    params: dict | None,
) -> Fit:
    """The fitted settings (soco_det.proposals.fit), logged with why; the whole listing is sampled, so
    every shard of a job fits the same. Bad options are errors before any image is read."""
    if filter is not None:
        parse_filter(filter)
    get_method(method)
    resolve_params(method, params)
    fit = fit_settings(object_size, root, listed, method, max_side, exif_transpose, max_pixels)
    if fit.hint != "paper":
        log.info("--object-size %s: %s", fit.hint, fit.reason)
        if fit.raw_sides is not None:
            log.info("sample's raw boxes at the fine scale:\n%s", "\n".join(format_sides({"raw": fit.raw_sides})[:2]))
    overridden = [f"--param {k}" for k in (params or {}) if k in fit.params] + (["--filter"] if filter else [])
    if overridden and fit.hint != "paper":
        log.info("given explicitly, so not fitted: %s", ", ".join(overridden))
    return fit


def _fit_record(fit: Fit, filter: str | None, params: dict | None) -> dict[str, Any]:
    record = fit.record()
    record["explicit"] = sorted([*(params or {}), *(["filter"] if filter else [])])
    return record


def _check_options(workers: Any, chunk_size: Any, max_side: Any, max_pixels: Any) -> None:
    _check_positive("--workers", workers)
    _check_positive("--chunk-size", chunk_size)
    if max_side is not None:
        _check_positive("--max-side", max_side)
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0):
        raise UserError(f"--max-pixels {max_pixels!r}: must be a whole number >= 0 (0: no limit)")


def _check_positive(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{option} {value!r}: must be a whole number >= 1")


def _read_settings(parts: Path, settings: dict[str, Any]) -> None:
    """Check (or, for a new job, write atomically) ``parts/settings.json``."""
    settings_file = parts / "settings.json"
    if settings_file.is_file():
        try:
            recorded = json.loads(settings_file.read_text())
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            if any(parts.glob("chunk_*.npz")):
                raise UserError(
                    f"{settings_file}: unreadable ({exc}), so the partial results next to it cannot be "
                    f"checked against the settings; delete {parts} to start again"
                ) from None
            log.warning("%s was unreadable (%s) and there are no partial results: rewriting it", settings_file, exc)
        else:
            _check_settings(parts, recorded, settings)
            return
    atomic_write_json(settings_file, settings, indent=1)


def _compute(
    out: Path,
    parts: Path,
    root: Path,
    relpaths: list[str],
    settings: dict[str, Any],
    sources: list[ProposalTable],
    workers: int,
    chunk_size: int,
    keep_raw: bool,
    keep_parts: bool,
    t0: float,
    refused: dict[str, str],
    fit: dict[str, Any] | None = None,
) -> Path:
    _read_settings(parts, settings)
    tables, next_id = _load_parts(parts)
    sources += tables
    have = {p for t in sources for p in t.paths}
    todo = [p for p in relpaths if p not in have]
    reused = len(relpaths) - len(todo)
    if reused:
        log.info("resuming: %d of %d images already done, computing %d", reused, len(relpaths), len(todo))

    tasks = [
        (str(parts / f"chunk_{next_id + i:06d}.npz"), todo[s : s + chunk_size])
        for i, s in enumerate(range(0, len(todo), chunk_size))
    ]
    t_run = time.perf_counter()
    with Progress(total=len(todo), desc="proposals", unit="img") as bar:
        _run_chunks(tasks, str(root), settings, workers, bar)
    run_s = time.perf_counter() - t_run

    # Everything is on disk now: assemble the store in sorted-path order.
    tables, _ = _load_parts(parts)
    raw_hist = _raw_side_hist(parts)
    table = ProposalTable.concat(sources + tables).reordered(relpaths, keep_raw=keep_raw)
    extra = {
        "computed": len(todo),
        "reused": reused,
        "workers": workers,
        "seconds": round(time.perf_counter() - t0, 2),
        "images_per_s": round(len(todo) / run_s, 3) if todo and run_s > 0 else None,
        "refused": refused,
        "raw_side_hist": raw_hist.tolist(),
        "box_sides": table_sides(table, raw_hist),
    }
    write_store(out, table, {**settings, "fit": fit} if fit else settings, extra)
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    log.info("proposal store %s written\n%s", out, format_summary(json.loads((out / "summary.json").read_text())))
    log_sides(extra["box_sides"])
    return out


def log_sides(sides: dict[str, Any]) -> None:
    """Log the side distribution, and warn when the kept boxes are far larger than the raw ones."""
    log.info("\n".join(format_sides(sides)))
    warning = large_box_warning(sides)
    if warning:
        log.warning(warning)


def _raw_side_hist(parts: Path) -> np.ndarray:
    """The summed raw-side histograms of this job's chunk files (the images it computed, resumed
    chunks included; a store being extended keeps the distribution of its new images only)."""
    hist = side_histogram([])
    for f in sorted(parts.glob("chunk_*.npz")):
        with np.load(f, allow_pickle=False) as z:
            if "raw_side_hist" in z.files and z["raw_side_hist"].shape == hist.shape:
                hist += z["raw_side_hist"]
    return hist


def log_refused(refused: dict[str, str], limit: int = 10) -> None:
    """Warn about the inputs left out at listing time (unsafe or shared member names, archives
    that cannot be opened): they are counted in the store's summary, never stored."""
    if not refused:
        return
    examples = "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:limit])
    more = f" (and {len(refused) - limit} more)" if len(refused) > limit else ""
    log.warning("%d archive member(s) or archive(s) left out at listing: %s%s", len(refused), examples, more)


def merge_stores(
    shards: Sequence[str | Path], out: str | Path, allow_missing: bool = False, overwrite: bool = False
) -> Path:
    """Combine the partial stores of a sharded job (``--shard K/N``, K = 0..N-1) into one store
    (one store alone: a checked copy of it). An existing store at ``out`` is moved aside only with
    ``overwrite``; the store is written next to ``out`` and renamed into place at the end."""
    if not shards:
        raise UserError("merge: no shard stores given")
    check_new_output(out, overwrite)
    stores = [ProposalStore.open(s, upgrade=False) for s in shards]
    first = stores[0].meta
    base = {k: first.get(k) for k in _SETTING_KEYS if k != "shard"}
    seen: dict[int, Path] = {}
    n_shards = None
    for st in stores:
        _check_settings(st.path, {**base, "shard": st.meta.get("shard")}, {**st.meta, "root": st.meta.get("root")})
        if st.meta.get("shard"):
            k, n = parse_shard(st.meta["shard"])  # type: ignore[misc]
            if n_shards not in (None, n):
                raise UserError(f"{st.path}: shard {k}/{n} does not belong to a {n_shards}-way split")
            n_shards = n
            if k in seen:
                raise UserError(f"{st.path} and {seen[k]} are both shard {k}/{n}")
            seen[k] = st.path
    if n_shards is not None and not allow_missing:
        missing = sorted(set(range(n_shards)) - set(seen))
        if missing:
            raise UserError(
                f"merge: missing shard(s) {', '.join(f'{k}/{n_shards}' for k in missing)} "
                "(pass --allow-missing to merge anyway)"
            )
    table = ProposalTable.concat([st.table() for st in stores])
    paths = sorted(table.paths)
    dupes = sorted({p for p, q in zip(paths, paths[1:]) if p == q})
    if dupes:
        raise UserError(f"merge: {len(dupes)} image(s) appear in more than one store, e.g. {dupes[0]}")
    table = table.reordered(paths)
    meta = {**base, "shard": None, "merged_from": [str(Path(s)) for s in shards]}
    if first.get("fit"):
        meta["fit"] = first["fit"]  # the same for every shard: the fit samples the whole listing
    write_new_store(out, table, meta, overwrite=overwrite)
    log.info(
        "merged %d stores into %s\n%s",
        len(stores),
        out,
        format_summary(json.loads((Path(out) / "summary.json").read_text())),
    )
    return Path(out)
