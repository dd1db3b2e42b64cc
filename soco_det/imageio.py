"""The one image decoder of the pipeline (proposals and training views use the same pixels).

Convention: by default an image is decoded exactly as the official SoCo code does,
``Image.open(path).convert("RGB")`` with **no EXIF transpose**, so that selective search sees the
same pixels and produces the same regions. ``exif_transpose=True`` applies the EXIF orientation
first; the proposal store records which convention computed its boxes, and the data loader uses
the store's setting, so boxes and pixels always agree.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from soco_det import archives
from soco_det.errors import ImageError, UserError

# Pillow warns at 89 Mpx and refuses at 179 Mpx by default; we refuse anything above this many
# pixels with a clear message (ImageNet's largest train image is ~ 20 Mpx).
DEFAULT_MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


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
    unreadable, truncated or non-image file, and for images above ``max_pixels`` pixels
    (decompression bombs).
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
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


def list_sources(images: str | Path) -> tuple[Path, list[str]]:
    """``(root, keys)`` of the images under ``images`` (a folder or one archive).

    Keys are posix paths relative to ``root``: loose images as :func:`list_images` lists them, then
    ``ARCHIVE::MEMBER`` for the image members of each archive (:mod:`soco_det.archives`). The
    proposal job and the training data both list with this function, so their keys agree.
    """
    path = Path(images).resolve()
    if path.is_file():
        if path.suffix.lower() not in archives.ARCHIVE_SUFFIXES:
            raise UserError(f"{path}: not a folder, a .tar or a .zip")
        return path.parent, [f"{path.name}{archives.SEP}{m}" for m in archives.list_members(path, IMAGE_EXTENSIONS)]
    keys = list_images(path)
    for archive in sorted(p for p in path.rglob("*") if p.suffix.lower() in archives.ARCHIVE_SUFFIXES and p.is_file()):
        rel = archive.relative_to(path).as_posix()
        keys += [f"{rel}{archives.SEP}{m}" for m in archives.list_members(archive, IMAGE_EXTENSIONS)]
    return path, keys


def check_relative_path(relpath: str, where: str) -> None:
    """Refuse an image path (from a proposal store or a COCO ``file_name``) that could point outside
    the images root: absolute, or with a ``..`` component. ``where`` names the file it came from."""
    parts = relpath.replace("\\", "/").split("/")
    if not relpath or relpath.startswith(("/", "\\")) or ".." in parts:
        raise UserError(f"{where}: image path {relpath!r} is not a relative path inside the images root")
