"""The one image decoder of the pipeline (proposals and training views use the same pixels).

Convention: by default an image is decoded exactly as the official SoCo code does,
``Image.open(path).convert("RGB")`` with **no EXIF transpose**, so that selective search sees the
same pixels and produces the same regions. ``exif_transpose=True`` applies the EXIF orientation
first; the proposal store records which convention computed its boxes, and the data loader uses
the store's setting, so boxes and pixels always agree.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from soco_det import archives
from soco_det.errors import ImageError, UserError
from soco_det.inputs import expand_inputs

# Pillow warns at 89 Mpx and refuses at 179 Mpx by default; we refuse anything above this many
# pixels with a clear message (ImageNet's largest train image is ~ 20 Mpx).
DEFAULT_MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def pillow_limit(max_pixels: int | None) -> Iterator[None]:
    """A context in which our ``max_pixels`` decides which images are too large, not Pillow's own
    decompression-bomb check (a warning above ``Image.MAX_IMAGE_PIXELS``, an error above twice
    that): the warning is ignored (the caller checks ``max_pixels`` after opening), and where
    Pillow's error would refuse an image that ``max_pixels`` allows (``None``: no limit, e.g.
    ``--max-pixels 0``), Pillow's limit is lifted for the duration (under a lock: it is a global
    of the module)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pillow = Image.MAX_IMAGE_PIXELS
        if pillow is None or (max_pixels is not None and max_pixels <= pillow):
            yield
            return
        with _PILLOW_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = None
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = pillow


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion; 16/32-bit grayscale is rescaled to 8 bit instead of being clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = (
            np.zeros(arr.shape, np.uint8) if hi <= lo else np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        )
        return Image.fromarray(arr8, mode="L").convert("RGB")
    return img.convert("RGB")


def load_rgb(
    path: str | Path,
    exif_transpose: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``path`` into an RGB PIL image (fully loaded, file closed).

    Grayscale, palette, RGBA (alpha dropped, as ``convert('RGB')`` does), CMYK and 16-bit images
    are accepted. ``path`` may address a member of a tar or zip archive, ``ARCHIVE::MEMBER``
    (:mod:`soco_det.archives`). Raises :class:`~soco_det.errors.ImageError` naming the file for a missing,
    unreadable, truncated or non-image file, for images above ``max_pixels`` pixels (decompression
    bombs; ``None``: no limit, Pillow's own included) and for files or members above
    :func:`soco_det.archives.max_member_bytes` bytes.
    """
    source: Path | io.BytesIO = Path(path)
    if archives.is_member_path(path):  # ARCHIVE::MEMBER, read without extracting
        try:
            source = io.BytesIO(archives.read_bytes(path))
        except FileNotFoundError as exc:
            raise ImageError(path, f"no such file ({exc})") from None
        except OSError as exc:
            raise ImageError(path, f"unreadable: {exc}") from exc
    elif not source.is_file():
        raise ImageError(path, "no such file")
    elif source.stat().st_size > archives.max_member_bytes():
        raise ImageError(
            path,
            f"file is {source.stat().st_size} bytes, above the limit of {archives.max_member_bytes()} bytes for "
            f"one image (raise it with ${archives.MAX_MEMBER_ENV})",
        )
    try:
        with pillow_limit(max_pixels):
            with Image.open(source) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageError(
                        path,
                        f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} (decompression bomb?)",
                    )
                img.load()
                if exif_transpose:
                    img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(path, f"unreadable or truncated image: {exc}") from exc


def list_images(root: str | Path) -> list[str]:
    """Image files under ``root`` (recursive, sorted), as posix paths relative to ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise ImageError(root, "not a folder")
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


@dataclass
class SourceList:
    """What :func:`list_sources` found: ``root``, the ``keys`` of the images (posix paths relative
    to ``root``, sorted as described there) and ``refused``: what was left out at listing time and
    why (``ARCHIVE::MEMBER`` for a member with an unsafe or shared name, ``ARCHIVE`` for an
    archive that cannot be opened). Refused names never become keys."""

    root: Path
    keys: list[str]
    refused: dict[str, str] = field(default_factory=dict)


def inputs_root(paths: Sequence[Path]) -> Path:
    """The images root of several inputs: one folder is its own root; otherwise the deepest folder
    that holds every input (a file's folder for a file)."""
    if len(paths) == 1 and paths[0].is_dir():
        return paths[0]
    return Path(os.path.commonpath([str(p if p.is_dir() else p.parent) for p in paths]))


def list_sources(inputs: str | Path | Sequence[str | Path]) -> SourceList:
    """The images of one or more inputs (folders, archives, image files, patterns such as
    ``shard-{000..009}.tar`` or ``*.tar``, ``.txt`` list files: :mod:`soco_det.inputs`).

    The root is :func:`inputs_root` (one folder: itself; one archive: its folder). Keys: the loose
    images sorted as :func:`list_images` sorts them, then ``ARCHIVE::MEMBER`` for the image
    members of each archive, archives in path order (:mod:`soco_det.archives`). The proposal job
    and the training data both list with this function, so their keys agree; one folder given as
    its shards (``DIR/shard-{000..009}.tar``) lists the same keys as the folder.
    """
    paths = expand_inputs(inputs)
    for path in paths:
        if path.is_file() and path.suffix.lower() not in archives.ARCHIVE_SUFFIXES + IMAGE_EXTENSIONS:
            raise UserError(f"{path}: not a folder, a .tar, a .zip, an image or a .txt list of inputs")
    root = inputs_root(paths)
    loose: set[str] = set()
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            rel = path.relative_to(root).as_posix()
            loose.update(k if rel == "." else f"{rel}/{k}" for k in list_images(path))
            found.update(p for p in path.rglob("*") if p.suffix.lower() in archives.ARCHIVE_SUFFIXES and p.is_file())
        elif path.suffix.lower() in archives.ARCHIVE_SUFFIXES:
            found.add(path)
        else:
            loose.add(path.relative_to(root).as_posix())
    result = SourceList(root, sorted(loose))
    for archive in sorted(found):
        rel = archive.relative_to(root).as_posix()
        names, refused = archives.list_members(archive, IMAGE_EXTENSIONS)
        result.keys += [f"{rel}{archives.SEP}{m}" for m in names]
        result.refused.update({f"{rel}{archives.SEP}{m}" if m else rel: why for m, why in refused.items()})
    return result


def check_relative_path(relpath: str, where: str) -> None:
    """Refuse an image path (from a proposal store or a COCO ``file_name``) that could point outside
    the images root: absolute, or with a ``..`` component. ``where`` names the file it came from."""
    parts = relpath.replace("\\", "/").split("/")
    if not relpath or relpath.startswith(("/", "\\")) or ".." in parts:
        raise UserError(f"{where}: image path {relpath!r} is not a relative path inside the images root")
