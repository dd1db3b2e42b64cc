"""Proposal methods behind one interface, and the reduced-resolution wrapper.

A method is ``fn(image, params) -> rects``: ``image`` is ``uint8 [H, W, 3]`` RGB, ``params`` a dict
of the method's options, and ``rects`` ``int32 [N, 4]`` ``(x, y, w, h)`` in the **official
selective-search convention** (``w = max_x - min_x``: the rect covers pixels ``x..x+w``
inclusive). Methods are looked up by name in :data:`METHODS`; :func:`register_method` adds one.

* ``selective_search`` (default): the faithful fast re-implementation of the official code
  (scale=300, sigma=0.9, min_size=100, full resolution; docs/method.md 1.1).
* ``reference``: the slow line-by-line reference (same output, for checking).
* ``opencv-single`` / ``opencv-fast`` / ``opencv-quality``: OpenCV's
  ``cv2.ximgproc.segmentation`` selective search (a different algorithm, needs the ``opencv``
  extra: ``pip install soco-det[opencv]``).
* ``random``: seeded random boxes, a baseline; the seed mixes ``params["seed"]`` with a hash of the
  pixels, so the result depends on the image only, not on the worker or the order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from soco_det.errors import UserError

MethodFn = Callable[[np.ndarray, dict], np.ndarray]


@dataclass(frozen=True)
class Method:
    fn: MethodFn
    defaults: dict[str, Any] = field(default_factory=dict)
    help: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, fn: MethodFn, defaults: dict | None = None, help: str = "") -> None:
    """Add (or replace) a method. ``fn`` must be a module-level function so worker processes
    (started with ``spawn``) can find it again by importing its module."""
    METHODS[name] = Method(fn, dict(defaults or {}), help)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown proposal method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_params(name: str, params: dict | None = None) -> dict:
    """The method's defaults updated with ``params``; unknown keys are an error."""
    method = get_method(name)
    params = dict(params or {})
    unknown = set(params) - set(method.defaults)
    if unknown:
        raise UserError(
            f"proposal method {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(method.defaults)}"
        )
    for key, value in params.items():
        default = method.defaults[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = number and bool(np.isfinite(value)) and (not isinstance(default, int) or float(value).is_integer())
        else:
            ok = True
        if not ok:
            kind = (
                "true/false"
                if isinstance(default, bool)
                else "a whole number"
                if isinstance(default, int)
                else "a number"
            )
            raise UserError(f"proposal method {name!r}: parameter {key}={value!r} must be {kind} (default {default!r})")
        if isinstance(default, int) and not isinstance(default, bool):
            params[key] = int(value)
    return {**method.defaults, **params}


def _as_rects(rects: Any) -> np.ndarray:
    return np.asarray(rects, dtype=np.int32).reshape(-1, 4)


# --- selective search (the official algorithm) -------------------------------------------------


def _selective_search(image: np.ndarray, params: dict) -> np.ndarray:
    # lazy: numba and its compiled kernels load only when this method runs
    from soco_det.proposals.selective_search import selective_search

    return _as_rects(selective_search(image, scale=params["scale"], sigma=params["sigma"], min_size=params["min_size"]))


def _reference(image: np.ndarray, params: dict) -> np.ndarray:
    # lazy: needs PyPI's selectivesearch (the test extra)
    from soco_det.proposals.reference import reference_selective_search

    return _as_rects(
        reference_selective_search(image, scale=params["scale"], sigma=params["sigma"], min_size=params["min_size"])
    )


_SS_DEFAULTS = {"scale": 300.0, "sigma": 0.9, "min_size": 100}

# --- OpenCV ximgproc ---------------------------------------------------------------------------


def _import_cv2():
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is None or not hasattr(cv2, "ximgproc"):
        raise UserError(
            "the OpenCV proposal methods need OpenCV's contrib modules (cv2.ximgproc): "
            "pip install soco-det[opencv]  (i.e. opencv-contrib-python-headless)"
        )
    return cv2


def _opencv(image: np.ndarray, params: dict) -> np.ndarray:
    cv2 = _import_cv2()
    cv2.setNumThreads(1)  # parallelism comes from the runner's processes
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
    strategy = params["strategy"]
    if strategy == "single":
        ss.switchToSingleStrategy(int(params["base_k"]), float(params["sigma"]))
    elif strategy == "fast":
        ss.switchToSelectiveSearchFast(int(params["base_k"]), int(params["inc_k"]), float(params["sigma"]))
    elif strategy == "quality":
        ss.switchToSelectiveSearchQuality(int(params["base_k"]), int(params["inc_k"]), float(params["sigma"]))
    else:
        raise UserError(f"OpenCV selective search strategy must be single, fast or quality, not {strategy!r}")
    rects = _as_rects(ss.process())
    # cv::Rect widths are pixel counts; the official convention stores max - min.
    rects[:, 2:] -= 1
    return rects


def _opencv_method(strategy: str) -> Method:
    # OpenCV's own defaults for each strategy (base_k=150/200, inc_k=150, sigma=0.8).
    base_k = 200 if strategy == "single" else 150
    return Method(
        _opencv,
        {"strategy": strategy, "base_k": base_k, "inc_k": 150, "sigma": 0.8},
        f"OpenCV ximgproc selective search, {strategy} strategy (needs the opencv extra)",
    )


# --- random boxes ------------------------------------------------------------------------------


def _random(image: np.ndarray, params: dict) -> np.ndarray:
    """``n`` boxes with ``sqrt(area)`` uniform in ``[min_size, max_size]`` of ``sqrt(W*H)`` and
    log-uniform aspect ratio in ``[1/ratio, ratio]``, placed uniformly inside the image."""
    h_img, w_img = image.shape[:2]
    digest = zlib.crc32(np.ascontiguousarray(image).data)
    rng = np.random.default_rng([int(params["seed"]), digest, w_img, h_img])
    n = int(params["n"])
    side = rng.uniform(params["min_size"], params["max_size"], n) * np.sqrt(w_img * h_img)
    aspect = np.exp(rng.uniform(-np.log(params["ratio"]), np.log(params["ratio"]), n))
    w = np.clip(np.round(side * np.sqrt(aspect)), 1, w_img).astype(np.int64)
    h = np.clip(np.round(side / np.sqrt(aspect)), 1, h_img).astype(np.int64)
    x = np.floor(rng.uniform(0, 1, n) * (w_img - w + 1)).astype(np.int64)
    y = np.floor(rng.uniform(0, 1, n) * (h_img - h + 1)).astype(np.int64)
    return _as_rects(np.stack([x, y, w - 1, h - 1], axis=1))  # pixel counts -> max - min


register_method(
    "selective_search",
    _selective_search,
    _SS_DEFAULTS,
    "faithful fast re-implementation of the official selective search (default)",
)
register_method("reference", _reference, _SS_DEFAULTS, "slow reference selective search (same output, for checks)")
for _strategy in ("single", "fast", "quality"):
    METHODS[f"opencv-{_strategy}"] = _opencv_method(_strategy)
register_method(
    "random",
    _random,
    {"n": 200, "min_size": 0.1, "max_size": 0.9, "ratio": 3.0, "seed": 0},
    "seeded random boxes (a baseline)",
)


# --- reduced resolution ------------------------------------------------------------------------


def downscale(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float, float]:
    """``(image', sx, sy)``: ``image`` resized (area-averaged) so its longer side is at most
    ``max_side``, and the factors ``W / W'``, ``H / H'`` that map it back (1.0 when unchanged)."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, 1.0, 1.0
    from PIL import Image

    f = max_side / max(h, w)
    nw, nh = max(1, round(w * f)), max(1, round(h * f))
    small = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BOX))
    return small, w / nw, h / nh


def upscale_rects(rects: np.ndarray, sx: float, sy: float, width: int, height: int) -> np.ndarray:
    """Map rects (official convention) found on a downscaled image back to the full image.

    A rect covers the continuous span ``[x, x + w + 1)``; that span is scaled and the covered
    full-resolution pixels ``floor(x * sx) .. ceil((x + w + 1) * sx) - 1`` (clipped to the image)
    become the new rect, again with ``w = max - min``.
    """
    rects = _as_rects(rects)
    if sx == 1.0 and sy == 1.0:
        return rects
    r = rects.astype(np.float64)
    x1 = np.floor(r[:, 0] * sx)
    y1 = np.floor(r[:, 1] * sy)
    x2 = np.minimum(np.ceil((r[:, 0] + r[:, 2] + 1) * sx - 1e-9) - 1, width - 1)
    y2 = np.minimum(np.ceil((r[:, 1] + r[:, 3] + 1) * sy - 1e-9) - 1, height - 1)
    return _as_rects(np.stack([x1, y1, x2 - x1, y2 - y1], axis=1))


def clip_rects(rects: np.ndarray, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """Clip official rects ``(x, y, w, h)`` (pixels ``x..x+w``) to a ``width`` x ``height`` image;
    drop the ones with a negative side or wholly outside. Returns ``(rects, n_clipped, n_dropped)``."""
    if not len(rects):
        return rects.reshape(0, 4).astype(np.int32), 0, 0
    x1, y1 = rects[:, 0].astype(np.int64), rects[:, 1].astype(np.int64)
    x2, y2 = x1 + rects[:, 2], y1 + rects[:, 3]
    valid = (rects[:, 2] >= 0) & (rects[:, 3] >= 0)
    cx1, cy1 = np.clip(x1, 0, width - 1), np.clip(y1, 0, height - 1)
    cx2, cy2 = np.clip(x2, 0, width - 1), np.clip(y2, 0, height - 1)
    inside = valid & (x2 >= 0) & (y2 >= 0) & (x1 <= width - 1) & (y1 <= height - 1)
    out = np.stack([cx1, cy1, cx2 - cx1, cy2 - cy1], axis=1)[inside]
    changed = inside & ((cx1 != x1) | (cy1 != y1) | (cx2 != x2) | (cy2 != y2))
    return out.astype(np.int32), int(changed.sum()), int((~inside).sum())


def run_method(name: str, image: np.ndarray, params: dict, max_side: int | None = None) -> np.ndarray:
    """Run method ``name`` on ``image`` (``uint8 [H, W, 3]`` RGB), optionally at a reduced size
    (``max_side``); returns full-resolution rects ``int32 [N, 4]`` in the official convention,
    inside the image (a method's rects that reach outside are clipped, those wholly outside or with
    a negative side dropped: a proposal store holds no box outside its image)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}")
    method = get_method(name)
    small, sx, sy = downscale(image, max_side)
    rects = method.fn(small, params)
    rects = upscale_rects(rects, sx, sy, image.shape[1], image.shape[0])
    return clip_rects(rects, image.shape[1], image.shape[0])[0]
