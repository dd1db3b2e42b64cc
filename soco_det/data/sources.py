"""Where pretraining images come from, and how each is joined with its proposals.

Sources (labels are never read):

* a folder of images, recursive, with the images inside its ``.tar`` / ``.zip`` archives, or
  archives, patterns (``shards/shard-{000..009}.tar``, ``*.tar``), ``.txt`` lists of those, one or
  several (:func:`soco_det.imageio.list_sources`; members are ``ARCHIVE::MEMBER``);
* a text file listing images, one per line (the first tab-separated field, as in the official
  ``train_map.txt``; blank lines and ``#`` comments skipped), relative to the images root;
* a COCO JSON: its ``images[].file_name``, relative to the images root.

Joining with a proposal store (``store.index(relpath)``): by the path relative to the images root,
then by the path relative to the store's root, then by the basename without extension (the key of
the official proposal JSON, e.g. ``n01440764_10026``) when that basename is unique in the store.
Images without an entry get the whole-image fallback at load time, like images with no proposals.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from soco_det.errors import UserError
from soco_det.imageio import IMAGE_EXTENSIONS, list_sources
from soco_det.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ImageItem:
    """One pretraining image: ``path`` on disk and ``key``, its posix path relative to the root."""

    path: str
    key: str


def _items(root: Path, keys: Sequence[str]) -> list[ImageItem]:
    return [ImageItem(str(root / k), PurePosixPath(k).as_posix()) for k in keys]


def folder_items(images: str | Path | Sequence[str | Path]) -> list[ImageItem]:
    """Images under a folder (loose files and the members of its .tar / .zip archives), in
    archives, or in any of the inputs :func:`soco_det.imageio.list_sources` takes (patterns such
    as ``shard-{000..009}.tar``, several inputs, list files); keys as it makes them (the proposal
    job's). Members refused at listing time (unsafe or shared names) are left out with a warning."""
    listing = list_sources(images)
    root = listing.root
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        root = Path(images)  # keep the root as given (join_with_store compares resolved paths)
    if listing.refused:
        name, why = next(iter(listing.refused.items()))
        log.warning("%d archive member(s) or archive(s) left out (e.g. %s: %s)", len(listing.refused), name, why)
    if not listing.keys:
        raise UserError(f"{root}: no image files found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return _items(root, listing.keys)


def list_file_items(list_file: str | Path, root: str | Path | None = None) -> list[ImageItem]:
    list_file = Path(list_file)
    if not list_file.is_file():
        raise UserError(f"{list_file}: image list file not found")
    keys = []
    for line in list_file.read_text().splitlines():
        entry = line.split("\t", 1)[0].strip()
        if entry and not entry.startswith("#"):
            keys.append(entry)
    if not keys:
        raise UserError(f"{list_file}: the image list is empty")
    return _items(Path(root) if root is not None else list_file.parent, keys)


def coco_items(coco_json: str | Path, root: str | Path | None = None) -> list[ImageItem]:
    coco_json = Path(coco_json)
    try:
        data = json.loads(coco_json.read_text())
    except FileNotFoundError:
        raise UserError(f"{coco_json}: COCO JSON not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{coco_json}: not valid JSON ({exc})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise UserError(f"{coco_json}: no 'images' list in this COCO JSON")
    try:
        keys = [str(im["file_name"]) for im in images]
    except (KeyError, TypeError):
        raise UserError(f"{coco_json}: every entry of 'images' needs a 'file_name'") from None
    return _items(Path(root) if root is not None else coco_json.parent, keys)


def store_items(store: Any) -> list[ImageItem]:
    """Every image of a proposal store, under the store's root."""
    return _items(Path(store.root), list(store.paths))


def stem(key: str) -> str:
    """Basename without an image extension (``a/b/n0144_1.JPEG`` -> ``n0144_1``)."""
    name = PurePosixPath(key).name
    base, ext = os.path.splitext(name)
    return base if ext.lower() in IMAGE_EXTENSIONS else name


def join_with_store(items: Sequence[ImageItem], store: Any) -> np.ndarray:
    """int64 ``[len(items)]``: the store index of each item, ``-1`` when the store has none."""
    out = np.full(len(items), -1, dtype=np.int64)
    store_root = Path(store.root).resolve() if getattr(store, "root", None) else None
    stems: dict[str, int] | None = None
    for n, item in enumerate(items):
        idx = store.index(item.key)
        if idx is None and store_root is not None:
            try:
                rel = Path(item.path).resolve().relative_to(store_root).as_posix()
            except ValueError:
                rel = None
            idx = store.index(rel) if rel is not None and rel != item.key else None
        if idx is None:
            if stems is None:  # built once, only when a path lookup fails
                stems = {}
                for i, key in enumerate(store.paths):
                    s = stem(key)
                    stems[s] = -2 if s in stems else i  # -2: ambiguous basename
            idx = stems.get(stem(item.key))
            if idx == -2:
                idx = None
        if idx is not None:
            out[n] = idx
    return out


def resolve_items(
    images: str | list[str] | None, list_file: str | None, coco_json: str | None, store: Any | None
) -> list[ImageItem]:
    """The image list a :class:`~soco_det.data.config.DataConfig` describes."""
    if not isinstance(images, (str, type(None))) and (coco_json is not None or list_file is not None):
        raise UserError(
            "data.images: give one folder (the root of the file names) with data.list_file / data.coco_json"
        )
    root = images if images is not None else (store.root if store is not None else None)
    if coco_json is not None:
        return coco_items(coco_json, root)
    if list_file is not None:
        return list_file_items(list_file, root)
    if images is not None:
        return folder_items(images)
    if store is not None:
        return store_items(store)
    raise UserError("data: give the images (data.images, data.list_file or data.coco_json) or data.proposals")
