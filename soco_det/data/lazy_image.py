"""An image whose size is known before its pixels: the views' crops are drawn from the size alone,
then the file is decoded once, at the smallest resolution the crops allow.

For a JPEG much larger than the views (a 12-Mpx photo cropped to 224 px), decoding at full size
dominates the cost of a sample. libjpeg can decode at 1/2, 1/4 or 1/8 scale directly from the DCT
coefficients (PIL ``Image.draft``); :meth:`LazyImage.load` uses the largest such reduction that
still leaves every crop at least ``reducing_gap`` times larger than its view (like PIL's
``resize(..., reducing_gap=2)``), so the final bilinear resize still downsamples. Images only
slightly larger than the views (ImageNet-sized) are decoded at full size, exactly as
:func:`soco_det.imageio.load_rgb` does. Boxes are unaffected: geometry stays in full-resolution
pixels and only the resize source box is scaled.

When the size is already known (the proposal store records every image's decoded size), the
header is not read up front: the file is opened once, in :meth:`LazyImage.load`, which then checks
that the file still has that size.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from soco_det.archives import read_bytes
from soco_det.errors import ImageError
from soco_det.imageio import DEFAULT_MAX_PIXELS, _to_rgb, load_rgb, pillow_limit


class LazyImage:
    """``size`` from the file header (or given); pixels on :meth:`load`. Raises ImageError naming the file.

    ``size``: the decoded ``(W, H)`` when already known (e.g. ``store.size(i)``); the header is then
    read only by :meth:`load`, which raises ImageError if the file's size differs.
    """

    def __init__(
        self,
        path: str | Path,
        exif_transpose: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        size: tuple[int, int] | None = None,
    ):
        self.path = Path(path)
        self.exif_transpose = exif_transpose
        self.max_pixels = max_pixels
        self._expected = None if size is None else (int(size[0]), int(size[1]))
        self.format: str | None = None
        if exif_transpose:  # orientation needs the decoded image; no draft then
            self._full: Image.Image | None = load_rgb(path, exif_transpose=True, max_pixels=max_pixels)
            self.size = self._check_size(self._full.size)
            return
        self._full = None
        if self._expected is not None:
            self.size = self._expected
            return
        with self._open() as img:
            self.size = img.size
            self.format = img.format

    def _check_size(self, actual: tuple[int, int]) -> tuple[int, int]:
        if self._expected is not None and tuple(actual) != self._expected:
            raise ImageError(
                self.path,
                f"decoded size {actual[0]}x{actual[1]} differs from {self._expected[0]}x{self._expected[1]} in the "
                "proposal store (image changed since the proposals were computed?)",
            )
        return tuple(actual)

    def _open(self) -> Image.Image:
        """The opened (header parsed, pixels not decoded) image, from the file's bytes read at once."""
        try:
            data = read_bytes(self.path)  # a loose file or an ARCHIVE::MEMBER
        except FileNotFoundError:
            raise ImageError(self.path, "no such file") from None
        except IsADirectoryError:
            raise ImageError(self.path, "no such file (a folder)") from None
        except OSError as exc:
            raise ImageError(self.path, f"unreadable file: {exc}") from exc
        try:
            with pillow_limit(self.max_pixels):
                return Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(self.path, "not an image file (Pillow cannot identify it)") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageError(self.path, f"unreadable image header: {exc}") from exc

    def load(self, reduce: int = 1) -> tuple[Image.Image, float, float]:
        """``(RGB image, sx, sy)``: decoded at ``1/reduce`` scale or finer (JPEG only; other formats
        full size); ``sx, sy`` map full-resolution x, y to the decoded image's pixels."""
        if self._full is not None:
            return self._full, 1.0, 1.0
        img = self._open()
        self.format = img.format
        w, h = self._check_size(img.size)
        if self.max_pixels is not None and w * h > self.max_pixels:
            raise ImageError(self.path, f"image is {w}x{h} = {w * h} pixels, above the limit of {self.max_pixels}")
        try:
            with pillow_limit(self.max_pixels):
                with img:
                    if reduce > 1 and img.format == "JPEG":
                        img.draft("RGB", (-(-w // reduce), -(-h // reduce)))
                    img.load()
                    # Same pixels as load_rgb; an RGB file skips its convert('RGB') copy.
                    out = img if img.mode == "RGB" else _to_rgb(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(self.path, f"unreadable or truncated image: {exc}") from exc
        return out, out.size[0] / w, out.size[1] / h


def draft_reduction(crop_sizes: list[tuple[int, int]], view_sizes: list[int], reducing_gap: float) -> int:
    """Largest power of two (<= 8) ``r`` with every ``crop / r >= reducing_gap * view`` (1: none)."""
    slack = min(min(cw, ch) / s for (cw, ch), s in zip(crop_sizes, view_sizes)) / reducing_gap
    r = 1
    while r < 8 and slack >= 2 * r:
        r *= 2
    return r
