"""Compose one sample scene: a textured background and 1-5 textured, rotated, occluding objects
whose texture and colour follow their class (:mod:`soco_det.synth.appearance`).

A scene is a pure function of its random generator, and the generator of scene ``index`` of a
split is ``numpy.random.default_rng([seed, SPLIT_CODES[split], index])`` (:func:`scene_rng`), so
output does not depend on the number of worker processes or on the order scenes are made in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from soco_det.synth.appearance import object_appearance
from soco_det.synth.shapes import SHAPES, Placement, rasterize
from soco_det.synth.textures import sample_texture

SPLITS: tuple[str, ...] = ("unlabeled", "train", "val")
SPLIT_CODES: dict[str, int] = {name: code for code, name in enumerate(SPLITS)}

MIN_OBJECTS, MAX_OBJECTS = 1, 5
# Object sizes, as diameters (of the disc the silhouette fills) in units of the scene's short side:
# a mixture of large objects (what the paper's size-filtered proposals can find) and smaller ones,
# few under ~24 px in a 256-px scene; never under MIN_DIAMETER pixels.
LARGE_FRACTION = 0.6
LARGE_DIAMETER = (0.3, 0.75)
SMALL_DIAMETER = (0.1, 0.3)
MIN_DIAMETER = 12.0  # pixels
ASPECT_RANGE = (3 / 4, 4 / 3)  # width / height
# An object occluded below either limit is dropped from the annotations (its pixels stay).
MIN_VISIBLE_PIXELS = 16
MIN_VISIBLE_FRAC = 0.2


@dataclass
class SceneObject:
    """One annotated object: 1-based ``category_id`` and its *visible* mask, stored as the window
    ``(x0, y0, x1, y1)`` (integer pixel bounds, exclusive end) and ``mask`` ``bool [y1-y0, x1-x0]``;
    ``drawn_area`` is the pixel count of its whole silhouette inside the image, before occlusion."""

    category_id: int
    window: tuple[int, int, int, int]
    mask: np.ndarray
    drawn_area: int

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """The visible mask as ``uint8 [height, width]`` in Fortran order (what pycocotools wants)."""
        x0, y0, x1, y1 = self.window
        full = np.zeros((height, width), dtype=np.uint8, order="F")
        full[y0:y1, x0:x1] = self.mask
        return full


@dataclass
class Scene:
    """``image``: ``uint8 [H, W, 3]`` RGB; ``objects``: the annotated objects in drawing order
    (later ones may cover earlier ones; each mask is what remains visible)."""

    image: np.ndarray
    objects: list[SceneObject]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.image.shape[1], self.image.shape[0]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split`` (independent of every other scene)."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def scene_size(rng: np.random.Generator, short_side: int) -> tuple[int, int]:
    """``(width, height)`` with the given short side and a log-uniform aspect in 3:4..4:3."""
    aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))
    if aspect >= 1:
        return round(short_side * aspect), short_side
    return short_side, round(short_side / aspect)


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """One texture, or two joined along a random straight line (so that the background has its
    own large regions, as real ones do). Returns the image and the photo indices it used."""
    image, first = sample_texture(rng, height, width)
    if rng.random() < 0.5:
        return image, (first,)
    second, other = sample_texture(rng, height, width, exclude=(first,))
    angle = rng.uniform(0, 2 * math.pi)
    px, py = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5 - px
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5 - py
    side = (math.cos(angle) * xs + math.sin(angle) * ys) > 0
    image[side] = second[side]
    return image, (first, other)


def _placements(rng: np.random.Generator, width: int, height: int) -> list[tuple[int, Placement]]:
    """``(class index, placement)`` of 1-5 objects in drawing order. Diameters are log-uniform in
    :data:`LARGE_DIAMETER` (with probability :data:`LARGE_FRACTION`) or :data:`SMALL_DIAMETER`
    times the short side; large objects tend to be drawn first (so small ones are rarely hidden),
    with enough noise in the order that big objects still cover smaller ones at times."""
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    short = min(width, height)
    large = rng.random(count) < LARGE_FRACTION
    lo = np.where(large, LARGE_DIAMETER[0], SMALL_DIAMETER[0])
    hi = np.where(large, LARGE_DIAMETER[1], SMALL_DIAMETER[1])
    diameters = np.maximum(short * np.exp(rng.uniform(np.log(lo), np.log(hi))), MIN_DIAMETER)
    order = np.argsort(-diameters * np.exp(rng.normal(0.0, 0.5, size=count)), kind="stable")
    objects = []
    for i in order:
        diameter = float(diameters[i])
        # the centre stays half a radius inside the border: objects may be cut by the frame, not lost
        margin = diameter / 4
        place = Placement(
            cx=rng.uniform(margin, width - margin),
            cy=rng.uniform(margin, height - margin),
            diameter=diameter,
            angle=rng.uniform(0, 2 * math.pi),
            squash_u=rng.uniform(0.8, 1.0),
            squash_v=rng.uniform(0.8, 1.0),
        )
        objects.append((int(rng.integers(len(SHAPES))), place))
    return objects


def compose_scene(rng: np.random.Generator, short_side: int = 256) -> Scene:
    """Draw one scene (see the module docstring); the image's short side is ``short_side`` pixels."""
    width, height = scene_size(rng, short_side)
    image, background_sources = _background(rng, width, height)
    # label map: which object (1-based drawing index) owns each pixel; 0 = background
    owner = np.zeros((height, width), dtype=np.uint8)
    drawn = []
    for k, (cls, place) in enumerate(_placements(rng, width, height), start=1):
        window, mask = rasterize(SHAPES[cls], place, width, height)
        x0, y0, x1, y1 = window
        if not mask.any():
            continue
        look = object_appearance(rng, cls)
        texture, _ = sample_texture(
            rng, y1 - y0, x1 - x0, exclude=background_sources, sources=look.photos, prior=look.colour
        )
        image[y0:y1, x0:x1][mask] = texture[mask]
        owner[y0:y1, x0:x1][mask] = k
        drawn.append((k, cls, window, int(mask.sum())))

    objects = []
    for k, cls, window, drawn_area in drawn:
        x0, y0, x1, y1 = window
        visible = owner[y0:y1, x0:x1] == k
        area = int(visible.sum())
        if area < MIN_VISIBLE_PIXELS or area < MIN_VISIBLE_FRAC * drawn_area:
            continue
        objects.append(SceneObject(category_id=cls + 1, window=window, mask=visible, drawn_area=drawn_area))
    return Scene(image=image, objects=objects)


def make_scene(seed: int, split: str, index: int, short_side: int = 256) -> Scene:
    """Scene ``index`` of ``split`` for ``seed`` (the same every time)."""
    return compose_scene(scene_rng(seed, split, index), short_side)
