"""Object silhouettes of the sample scenes: ten classes of clearly different geometry.

Each class is an implicit "inside" test on shape-local coordinates ``(u, v)``: float arrays of any
(equal) shape, with the object's centre at ``(0, 0)`` and every class drawn inside the unit disc,
so a rotated object always fits the square ``[-1, 1]^2``. :func:`rasterize` maps that square onto
image pixels (pixel ``(i, j)`` is sampled at its centre ``(j + 0.5, i + 0.5)``, continuous
convention) and returns a boolean mask of the object's bounding square clipped to the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _polar(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.hypot(u, v), np.arctan2(v, u)


def _star_polygon(u: np.ndarray, v: np.ndarray, points: int, inner: float) -> np.ndarray:
    """Inside a polygon with ``2 * points`` straight edges alternating between radius 1 (at angles
    ``2 pi k / points``) and radius ``inner`` (half-way between). ``inner = cos(pi / points)``
    puts the inner vertices on the chords, which gives the regular ``points``-gon."""
    rho, phi = _polar(u, v)
    sector = 2.0 * math.pi / points
    psi = np.mod(phi, sector)
    psi = np.minimum(psi, sector - psi)  # fold onto [0, sector / 2]: outer vertex at 0
    # Edge from the outer vertex (1, 0) to the inner one at angle sector/2: outward normal n, offset d.
    p2 = np.array([inner * math.cos(sector / 2), inner * math.sin(sector / 2)])
    edge = p2 - np.array([1.0, 0.0])
    normal = np.array([-edge[1], edge[0]])
    normal /= np.linalg.norm(normal)
    if normal[0] < 0:
        normal = -normal
    d = normal[0]  # n . (1, 0)
    return rho * (normal[0] * np.cos(psi) + normal[1] * np.sin(psi)) <= d


def circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + v * v <= 1.0


def square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    half = 1.0 / math.sqrt(2.0)
    return (np.abs(u) <= half) & (np.abs(v) <= half)


def triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _star_polygon(u, v, 3, math.cos(math.pi / 3))


def star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _star_polygon(u, v, 5, 0.42)


def ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


def crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)


def ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u * u + (v / 0.5) ** 2 <= 1.0


def hexagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _star_polygon(u, v, 6, math.cos(math.pi / 6))


def l_shape(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    half = 0.7
    in_square = (np.abs(u) <= half) & (np.abs(v) <= half)
    # remove the top-right 60 % x 60 % block, leaving an L of arm width 0.56
    return in_square & ((u <= -half + 0.56) | (v >= half - 0.56))


@dataclass(frozen=True)
class ShapeClass:
    """One object class: its COCO name and its inside test on unit-disc coordinates."""

    name: str
    inside: Inside


# The category order fixes the 1-based COCO category ids: id = position + 1.
SHAPES: tuple[ShapeClass, ...] = (
    ShapeClass("circle", circle),
    ShapeClass("square", square),
    ShapeClass("triangle", triangle),
    ShapeClass("star", star),
    ShapeClass("ring", ring),
    ShapeClass("cross", cross),
    ShapeClass("crescent", crescent),
    ShapeClass("ellipse", ellipse),
    ShapeClass("hexagon", hexagon),
    ShapeClass("l_shape", l_shape),
)


@dataclass(frozen=True)
class Placement:
    """Where an object goes: centre ``(cx, cy)`` in continuous pixel coordinates, ``diameter`` in
    pixels (of the unit disc the silhouette lives in), ``angle`` in radians and per-axis
    ``squash`` factors in (0, 1] that keep the silhouette inside the disc."""

    cx: float
    cy: float
    diameter: float
    angle: float
    squash_u: float = 1.0
    squash_v: float = 1.0


def rasterize(
    shape: ShapeClass, place: Placement, width: int, height: int
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Rasterise one object into an image of ``width x height`` pixels.

    Returns ``((x0, y0, x1, y1), mask)``: the object's bounding square clipped to the image, as
    integer pixel bounds (``x1``/``y1`` exclusive), and a ``bool`` mask of shape
    ``[y1 - y0, x1 - x0]`` for that window. The window may be empty (zero size) when the object
    lies outside the image.
    """
    radius = place.diameter / 2.0
    x0 = max(int(math.floor(place.cx - radius)), 0)
    y0 = max(int(math.floor(place.cy - radius)), 0)
    x1 = min(int(math.ceil(place.cx + radius)), width)
    y1 = min(int(math.ceil(place.cy + radius)), height)
    if x1 <= x0 or y1 <= y0:
        return (x0, y0, x0, y0), np.zeros((0, 0), dtype=bool)
    dx = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - place.cx) / radius)[None, :]
    dy = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - place.cy) / radius)[:, None]
    # Pixel offsets -> shape coordinates: undo the object's rotation, then its squash.
    c, s = math.cos(place.angle), math.sin(place.angle)
    u = (c * dx - s * dy) / place.squash_u
    v = (s * dx + c * dy) / place.squash_v
    return (x0, y0, x1, y1), shape.inside(u, v)
