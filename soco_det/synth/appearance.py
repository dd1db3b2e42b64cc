"""What each object class looks like besides its silhouette: its material and colour.

In photographs an object class comes with a typical appearance (cats are furry, bricks are red),
which is what a pretrained detector's features can learn without labels. So every class draws its
texture from its own family: two of the bundled photographs (one of its own, one it shares with
another class, so that textures alone do not give every class away) and a colour prior (a hue of
its own, +- 25 degrees). A fraction :data:`CONFUSER_RATE` of objects borrows the appearance of
another class: then only the silhouette tells the class. Backgrounds draw from every photograph
with any colour, so they share materials with the objects too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from soco_det.synth.shapes import SHAPES
from soco_det.synth.textures import PHOTOS, ColourPrior

CONFUSER_RATE = 0.15
HUE_SPREAD = math.radians(25)
GREY_TINT = 0.6  # how strongly greyscale photos take the class hue


@dataclass(frozen=True)
class Appearance:
    """A texture family: photo indices (into :data:`~soco_det.synth.textures.PHOTOS`) and a colour prior."""

    photos: tuple[int, ...]
    colour: ColourPrior


def _class_appearances() -> tuple[Appearance, ...]:
    n_classes, n_photos = len(SHAPES), len(PHOTOS)
    shared = n_photos - n_classes  # photos after the first n_classes are shared by two classes each
    families = []
    for c in range(n_classes):
        photos = (c, n_classes + c % shared) if shared > 0 else (c % n_photos,)
        hue = 2 * math.pi * c / n_classes
        families.append(Appearance(photos, ColourPrior(hue=hue, hue_spread=HUE_SPREAD, tint=GREY_TINT)))
    return tuple(families)


CLASS_APPEARANCE: tuple[Appearance, ...] = _class_appearances()


def object_appearance(rng: np.random.Generator, cls: int) -> Appearance:
    """The appearance an object of class index ``cls`` is drawn with: its class's family, or with
    probability :data:`CONFUSER_RATE` another class's."""
    if rng.random() < CONFUSER_RATE:
        other = int(rng.integers(len(CLASS_APPEARANCE) - 1))
        return CLASS_APPEARANCE[other + (other >= cls)]
    return CLASS_APPEARANCE[cls]
