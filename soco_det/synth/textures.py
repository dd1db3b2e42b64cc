"""Textures for the sample scenes: jittered crops of the photographs bundled with scikit-image.

Only photos shipped inside the scikit-image wheel are used (no ``pooch`` download), so scenes can be
generated offline. The bank is loaded once per process (:func:`texture_bank`); a texture is a
random crop at a random zoom, resized to the requested size, then colour-jittered by a 3x3 matrix
(hue rotation about the grey axis, saturation, brightness; greyscale photos also get a random tint).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Bundled scikit-image photographs (colour first). Synthetic images (colorwheel, checkerboard, ...)
# and the data that needs a download (eagle, lily, skin, ...) are left out on purpose.
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "brick",
    "grass",
    "gravel",
    "moon",
    "cell",
    "clock",
)

# Larger photos are shrunk at load so that crops stay cheap; 512 keeps plenty of detail for 256 px scenes.
MAX_SOURCE_SIDE = 512
# Crops flatter than this (e.g. the black sky of hubble_deep_field) are re-drawn: a texture should
# carry image structure, not a flat colour.
MIN_CROP_STD = 12.0
MAX_CROP_TRIES = 4


@dataclass(frozen=True)
class Photo:
    """One texture source: ``image`` is a PIL RGB image, ``grey`` tells whether it was greyscale."""

    name: str
    image: Image.Image
    grey: bool


@functools.lru_cache(maxsize=1)
def texture_bank() -> tuple[Photo, ...]:
    """All :data:`PHOTOS` as RGB PIL images with the long side at most :data:`MAX_SOURCE_SIDE`
    (cached per process: worker processes each load it once)."""
    import skimage.data

    photos = []
    for name in PHOTOS:
        array = np.asarray(getattr(skimage.data, name)())
        grey = array.ndim == 2
        if grey:
            array = np.repeat(array[:, :, None], 3, axis=2)
        image = Image.fromarray(np.ascontiguousarray(array[:, :, :3]).astype(np.uint8), "RGB")
        scale = MAX_SOURCE_SIDE / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        photos.append(Photo(name, image, grey))
    return tuple(photos)


def _crop(rng: np.random.Generator, photo: Photo, height: int, width: int) -> Image.Image:
    """A random crop of ``photo`` at a random zoom (0.5x to 2x source pixels per output pixel,
    limited by the photo's size), resized to ``width x height``."""
    src_w, src_h = photo.image.size
    zoom = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    zoom = min(zoom, src_w / width, src_h / height)
    crop_w, crop_h = width * zoom, height * zoom
    x = rng.uniform(0, max(src_w - crop_w, 0.0))
    y = rng.uniform(0, max(src_h - crop_h, 0.0))
    return photo.image.resize((width, height), Image.BILINEAR, box=(x, y, x + crop_w, y + crop_h))


def _hue_rotation(theta: float) -> np.ndarray:
    """3x3 rotation of RGB about the grey axis (1, 1, 1): a hue shift that keeps greys grey."""
    k = np.full(3, 1.0 / math.sqrt(3.0))
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return math.cos(theta) * np.eye(3) + math.sin(theta) * kx + (1 - math.cos(theta)) * np.outer(k, k)


@dataclass(frozen=True)
class ColourPrior:
    """Where a texture's colour transform is drawn from: a hue shift of ``hue +- hue_spread``
    radians, and for greyscale photos a tint of that hue (``tint`` strength in [0, 1])."""

    hue: float = 0.0
    hue_spread: float = math.pi / 2
    tint: float | None = None  # None: a random tint (greyscale photos only)


def colour_matrix(rng: np.random.Generator, grey: bool, prior: ColourPrior = ColourPrior()) -> np.ndarray:
    """A random 3x3 colour transform (row-vector convention: ``rgb_out = rgb_in @ M``): hue shift
    drawn from ``prior`` (default: up to +-90 degrees), saturation and brightness in [0.6, 1.4];
    greyscale photos get a tint (random, or the prior's hue)."""
    luma = np.array([0.299, 0.587, 0.114])
    sat = rng.uniform(0.6, 1.4)
    saturation = sat * np.eye(3) + (1 - sat) * np.outer(np.ones(3), luma)  # column-vector form
    hue = prior.hue + rng.uniform(-prior.hue_spread, prior.hue_spread)
    m = rng.uniform(0.6, 1.4) * _hue_rotation(hue) @ saturation
    if grey:
        if prior.tint is None:
            tint = rng.uniform(0.45, 1.0, size=3)
        else:
            # a colour of the prior's hue: red rotated about the grey axis, mixed with grey
            red = _hue_rotation(hue) @ np.array([1.0, 0.0, 0.0])
            tint = (1 - prior.tint) + prior.tint * (red - red.min()) / max(np.ptp(red), 1e-6)
        m = np.diag(tint / tint.max()) @ m
    return m.T.astype(np.float32)


def sample_texture(
    rng: np.random.Generator,
    height: int,
    width: int,
    exclude: tuple[int, ...] = (),
    sources: tuple[int, ...] | None = None,
    prior: ColourPrior = ColourPrior(),
) -> tuple[np.ndarray, int]:
    """A jittered texture ``uint8 [height, width, 3]`` and the index (into :func:`texture_bank`) of
    the photo it was cut from: one of ``sources`` (default: any photo), never one listed in
    ``exclude`` unless that leaves nothing; its colour is drawn from ``prior``."""
    bank = texture_bank()
    pool = range(len(bank)) if sources is None else sources
    choices = [i for i in pool if i not in exclude] or list(pool)
    source = int(choices[rng.integers(len(choices))])
    photo = bank[source]
    best, best_std = None, -1.0
    for _ in range(MAX_CROP_TRIES):
        crop = _crop(rng, photo, height, width)
        std = float(np.asarray(crop)[::4, ::4].std())  # a strided look is enough to spot a flat crop
        if std > best_std:
            best, best_std = crop, std
        if std >= MIN_CROP_STD:
            break
    # PIL applies the matrix in C on one thread (a numpy matmul would wake every BLAS thread for a
    # 3x3 product) and rounds and clips to uint8.
    m = colour_matrix(rng, photo.grey, prior)
    affine = tuple(float(v) for column in m.T for v in (*column, 0.0))
    return np.array(best.convert("RGB", affine)), source
