"""Configuration of the data stage: where the images and proposals are, and how views are made.

``ViewsConfig`` starts from a named recipe (``soco_fpn``, ``soco_fpn_400``, ``soco_star``,
``soco_c4``, ``paper``; docs/method.md 2.1, 6.1, 9.1). Its values sit in four sections,
``geometry`` (views, crops, flips), ``boxes`` (proposals per pair, padding, jitter),
``photometric`` (colour, blur, solarize, normalisation, cutout) and ``levels`` (FPN level
assignment); every field there defaults to ``None``, which means "take the recipe's value", so a
YAML recipe or the command line can pick a recipe and override single values
(``data.views.recipe=soco_c4 data.views.photometric.cutout_prob=0.3``).
:meth:`ViewsConfig.resolved` returns the fully specified config the sampler uses.

A view is described by ``geometry.view_kinds[v]``:

* ``"whole"``: the whole image resized to ``view_sizes[v]`` (aspect ratio not kept); must be view 0;
* ``"crop"``: an independent RandomResizedCrop of the *original* image (``crop_scale``,
  ``crop_ratio``, ``crop_attempts``), resized to ``view_sizes[v]``;
* ``"down:m"``: view ``m``'s resized crop downsampled to ``view_sizes[v]`` before ``m``'s flip and
  colour (SoCo*'s V4, the paper's V3). It shares ``m``'s proposals and boxes.

With ``geometry.fit_objects`` (not in the paper, off in every recipe; docs/method.md 2.9) the
"whole image" is an object region (:func:`soco_det.data.crops.object_region`) and the crops are
drawn inside it.

Pairs are always ``(0, v)`` for every view ``v >= 1`` (docs/method.md 2.2).

:class:`PixelOptions` holds the four options that change how the views' pixels are made (decoding,
resize, where the colour runs) but never their geometry; :class:`DataConfig` has them as its own
fields (``data.photometric`` etc.) and hands them on as one object (:attr:`DataConfig.pixels`) to
the dataset and the view sampler, so their defaults live here only.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from soco_det.config import moved_keys

RECIPES = ("soco_fpn", "soco_fpn_400", "soco_star", "soco_c4", "paper")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Values shared by every recipe (docs/method.md 2.1-2.7).
_COMMON: dict = dict(
    crop_scale=[0.5, 1.0],
    crop_ratio=[3.0 / 4.0, 4.0 / 3.0],
    crop_attempts=10,
    # Not in the paper (docs/method.md 2.9): off in every recipe; 0.43 is the paper's V1 median box side / 224.
    fit_objects=False,
    fit_box_side=0.43,
    select_k=4,
    padding_k=4,
    max_tries=5,
    jitter_prob=0.5,
    jitter_ratio=0.1,
    flip_prob=0.5,
    color_jitter=[0.4, 0.4, 0.2, 0.1],
    color_jitter_prob=0.8,
    grayscale_prob=0.2,
    blur_sigma=[0.1, 2.0],
    solarize_threshold=128,
    cutout_prob=0.5,
    cutout_ratio=[0.1, 0.3],
    level_thresholds=[48.0, 96.0, 192.0, 224.0],
    scale_aware=True,
    mean=list(IMAGENET_MEAN),
    std=list(IMAGENET_STD),
)

PRESETS: dict[str, dict] = {
    # Official 100-epoch SoCo_FPN: ImageAsymBboxAwareMultiJitter1Cutout.
    "soco_fpn": dict(
        _COMMON,
        view_kinds=["whole", "crop", "crop"],
        view_sizes=[224, 224, 112],
        blur_prob=[1.0, 0.1, 0.1],
        solarize_prob=[0.0, 0.2, 0.2],
        cutout_views=[1, 2],
    ),
    # Official 400-epoch SoCo_FPN: the same without cutout.
    "soco_fpn_400": dict(
        _COMMON,
        view_kinds=["whole", "crop", "crop"],
        view_sizes=[224, 224, 112],
        blur_prob=[1.0, 0.1, 0.1],
        solarize_prob=[0.0, 0.2, 0.2],
        cutout_views=[],
    ),
    # SoCo*: V3 an independent crop at 192, V4 = V2 downsampled to 112 (no cutout).
    "soco_star": dict(
        _COMMON,
        view_kinds=["whole", "crop", "crop", "down:1"],
        view_sizes=[224, 224, 192, 112],
        blur_prob=[1.0, 0.1, 0.1, 0.1],
        solarize_prob=[0.0, 0.2, 0.2, 0.2],
        cutout_views=[],
    ),
    # SoCo_C4: two views, crop scale [0.6, 1], no jitter, no level assignment (P = 1).
    "soco_c4": dict(
        _COMMON,
        view_kinds=["whole", "crop"],
        view_sizes=[224, 224],
        crop_scale=[0.6, 1.0],
        jitter_prob=0.0,
        blur_prob=[1.0, 0.1],
        solarize_prob=[0.0, 0.2],
        cutout_views=[1],
        scale_aware=False,
    ),
    # The paper's description: V3 is V2 downsampled to 112 (docs/method.md 9.1).
    "paper": dict(
        _COMMON,
        view_kinds=["whole", "crop", "down:1"],
        view_sizes=[224, 224, 112],
        blur_prob=[1.0, 0.1, 0.1],
        solarize_prob=[0.0, 0.2, 0.2],
        cutout_views=[],
    ),
}


def _lo_hi(name: str, lo_hi: list[float], most: float | None = None, what: str = "") -> None:
    if len(lo_hi) != 2 or not (0 < lo_hi[0] <= lo_hi[1]):
        raise ValueError(f"{name}: expected [lo, hi] with 0 < lo <= hi, got {lo_hi}")
    if most is not None and lo_hi[1] > most:
        raise ValueError(f"{name}: {what} (<= {most:g}), got {lo_hi}")


def _probabilities(section: str, values: dict[str, float | list[float]]) -> None:
    for name, value in values.items():
        if any(not (0.0 <= p <= 1.0) for p in (value if isinstance(value, list) else [value])):
            raise ValueError(f"{section}.{name}: probabilities must lie in [0, 1], got {value}")


@dataclass
class ViewGeometry:
    """``data.views.geometry``: what each view shows (docs/method.md 2.1-2.2): its kind
    (``whole``, ``crop``, ``down:m``), its size, the crop's scale, ratio and attempts, the flip."""

    view_kinds: Optional[list[str]] = None
    view_sizes: Optional[list[int]] = None
    crop_scale: Optional[list[float]] = None  # area fraction of the original image, [lo, hi]
    crop_ratio: Optional[list[float]] = None  # aspect ratio w/h range, drawn log-uniformly
    crop_attempts: Optional[int] = None  # then the centre-crop fallback (torchvision semantics)
    flip_prob: Optional[float] = None  # per view, independently
    # Views that fit the objects (docs/method.md 2.9, off in the paper recipes): V1 shows an object
    # region instead of the whole image, a crop around a drawn proposal whose side is the image's
    # median kept proposal side / fit_box_side; every other view is drawn inside that region.
    fit_objects: Optional[bool] = None
    fit_box_side: Optional[float] = None  # the median box side as a fraction of V1's side

    def check(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent value (of a resolved config)."""
        kinds, n = self.view_kinds, len(self.view_kinds)
        if n < 2:
            raise ValueError("geometry.view_kinds: at least two views are needed")
        if kinds[0] != "whole":
            raise ValueError(f"geometry.view_kinds[0] must be 'whole' (V1 is the whole image), got {kinds[0]!r}")
        for v, kind in enumerate(kinds[1:], start=1):
            if kind == "crop":
                continue
            if not kind.startswith("down:"):
                raise ValueError(f"geometry.view_kinds[{v}]: {kind!r} is not 'crop' or 'down:M'")
            try:
                m = int(kind.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"geometry.view_kinds[{v}]: {kind!r} does not name a view index") from None
            if not (1 <= m < v) or kinds[m] != "crop":
                raise ValueError(f"geometry.view_kinds[{v}]: {kind!r} must name an earlier 'crop' view")
        if len(self.view_sizes) != n:
            raise ValueError(f"geometry.view_sizes: expected {n} values (one per view), got {len(self.view_sizes)}")
        if any(s < 8 for s in self.view_sizes):
            raise ValueError(f"geometry.view_sizes: every size must be >= 8, got {self.view_sizes}")
        _lo_hi("geometry.crop_scale", self.crop_scale, 1.0, "the upper bound is a fraction of the image area")
        _lo_hi("geometry.crop_ratio", self.crop_ratio)
        if self.crop_attempts < 1:
            raise ValueError(f"geometry.crop_attempts: must be >= 1, got {self.crop_attempts}")
        _probabilities("geometry", {"flip_prob": self.flip_prob})
        if not (0.0 < self.fit_box_side <= 1.0):
            raise ValueError(f"geometry.fit_box_side: a fraction of V1's side in (0, 1], got {self.fit_box_side}")


@dataclass
class ViewBoxes:
    """``data.views.boxes``: the proposals of each view pair (docs/method.md 2.3-2.5): how many are
    drawn among those overlapping the crop, padded to ``padding_k`` rows, after up to ``max_tries``
    crop draws, and the jitter of V1's boxes."""

    select_k: Optional[int] = None  # proposals drawn per pair from those overlapping the crop
    padding_k: Optional[int] = None  # K: rows per view and pair after padding
    max_tries: Optional[int] = None  # crop re-draws until every pair has enough proposals
    jitter_prob: Optional[float] = None  # per V1 box, separately per pair
    jitter_ratio: Optional[float] = None

    def check(self) -> None:
        for name in ("select_k", "padding_k", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"boxes.{name}: must be >= 1, got {getattr(self, name)}")
        if self.select_k > self.padding_k:
            raise ValueError(f"boxes.select_k ({self.select_k}) must not exceed boxes.padding_k ({self.padding_k})")
        _probabilities("boxes", {"jitter_prob": self.jitter_prob})
        if not (0.0 <= self.jitter_ratio < 0.5):
            raise ValueError(f"boxes.jitter_ratio: must lie in [0, 0.5), got {self.jitter_ratio}")


@dataclass
class ViewPhotometric:
    """``data.views.photometric``: the colour jitter, grayscale, blur and solarize of each view, the
    normalisation, and the cutout inside the boxes (docs/method.md 2.6). Where they run (loader
    workers or the device) is ``data.photometric``."""

    color_jitter: Optional[list[float]] = None  # brightness, contrast, saturation, hue
    color_jitter_prob: Optional[float] = None
    grayscale_prob: Optional[float] = None
    blur_prob: Optional[list[float]] = None  # per view
    blur_sigma: Optional[list[float]] = None  # PIL GaussianBlur(radius=sigma), sigma ~ U(lo, hi)
    solarize_prob: Optional[list[float]] = None  # per view
    solarize_threshold: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    cutout_views: Optional[list[int]] = None  # view indices that get cutout inside their boxes
    cutout_prob: Optional[float] = None  # per box row, padded duplicates included
    cutout_ratio: Optional[list[float]] = None  # square area as a fraction of the box area
    cutout_mirrored: bool = False  # official pre-fix placement: pre-flip boxes, clip at view_sizes[0]

    def check(self, n: int) -> None:
        """As :meth:`ViewGeometry.check`, for ``n`` views."""
        for name in ("blur_prob", "solarize_prob"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"photometric.{name}: expected {n} values (one per view), got {len(getattr(self, name))}"
                )
        _lo_hi("photometric.blur_sigma", self.blur_sigma)
        _lo_hi("photometric.cutout_ratio", self.cutout_ratio, 1.0, "fractions of the box area")
        _probabilities(
            "photometric",
            {
                "color_jitter_prob": self.color_jitter_prob,
                "grayscale_prob": self.grayscale_prob,
                "cutout_prob": self.cutout_prob,
                "blur_prob": list(self.blur_prob),
                "solarize_prob": list(self.solarize_prob),
            },
        )
        cj = self.color_jitter
        if len(cj) != 4 or any(c < 0 for c in cj) or cj[3] > 0.5:
            raise ValueError(f"photometric.color_jitter: [brightness, contrast, saturation, hue>=0,<=0.5], got {cj}")
        if any(not (1 <= v < n) for v in self.cutout_views):
            raise ValueError(f"photometric.cutout_views: view indices in 1..{n - 1}, got {self.cutout_views}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError("photometric.mean/std: three values each, std > 0")
        if not (0 <= self.solarize_threshold <= 256):
            raise ValueError(f"photometric.solarize_threshold: in 0..256, got {self.solarize_threshold}")


@dataclass
class ViewLevels:
    """``data.views.levels``: the FPN level each box is assigned to, by its size in view pixels
    (docs/method.md 2.7)."""

    level_thresholds: Optional[list[float]] = None  # sqrt-area upper bounds of P2.. in view pixels
    scale_aware: Optional[bool] = None  # False: one level (C4), every box at level 0

    def check(self) -> None:
        t = self.level_thresholds
        if self.scale_aware and (not t or any(b <= a for a, b in zip(t, t[1:])) or t[0] <= 0):
            raise ValueError(f"levels.level_thresholds: a non-empty increasing list of sizes, got {t}")


SECTIONS = {"geometry": ViewGeometry, "boxes": ViewBoxes, "photometric": ViewPhotometric, "levels": ViewLevels}

# The flat keys of soco-det before the sections (data.views.crop_scale is now data.views.geometry.crop_scale, ...).
VIEWS_MOVED_KEYS = {f.name: f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


@moved_keys(VIEWS_MOVED_KEYS)
@dataclass
class ViewsConfig:
    """How the views of one sample are made: a ``recipe`` preset, then four sections whose ``None``
    fields take the recipe's value (``geometry``, ``boxes``, ``photometric``, ``levels``), and
    ``legacy`` box conventions. The flat keys of older versions (``data.views.crop_scale``, ...) are
    still read (soco_det/config.py)."""

    recipe: str = "soco_fpn"
    geometry: ViewGeometry = field(default_factory=ViewGeometry)
    boxes: ViewBoxes = field(default_factory=ViewBoxes)
    photometric: ViewPhotometric = field(default_factory=ViewPhotometric)
    levels: ViewLevels = field(default_factory=ViewLevels)
    legacy: bool = False  # official inclusive-pixel box conventions (docs/method.md 1.4, 2.4, 9.5)

    def resolved(self) -> "ViewsConfig":
        """A copy with every ``None`` field of every section filled from the recipe preset."""
        if self.recipe not in PRESETS:
            raise ValueError(f"unknown views recipe {self.recipe!r} (known: {', '.join(RECIPES)})")
        preset = PRESETS[self.recipe]

        def fill(section: Any) -> Any:
            values = {}
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if value is None:
                    value = preset[f.name]
                values[f.name] = list(value) if isinstance(value, (list, tuple)) else value
            return type(section)(**values)

        return ViewsConfig(
            recipe=self.recipe, **{name: fill(getattr(self, name)) for name in SECTIONS}, legacy=self.legacy
        )

    @property
    def num_views(self) -> int:
        return len(self.resolved().geometry.view_kinds)

    @property
    def num_levels(self) -> int:
        """P: number of FPN levels boxes are assigned to (1 without scale-aware assignment)."""
        levels = self.resolved().levels
        return len(levels.level_thresholds) if levels.scale_aware else 1

    def source_view(self, v: int) -> int:
        """The view whose crop (and proposals) view ``v`` uses: ``m`` for ``down:m``, else ``v``."""
        kind = self.resolved().geometry.view_kinds[v]
        return int(kind.split(":", 1)[1]) if kind.startswith("down:") else v

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent value (section.key)."""
        r = self.resolved()
        r.geometry.check()
        r.boxes.check()
        r.photometric.check(len(r.geometry.view_kinds))
        r.levels.check()


@dataclass
class PixelOptions:
    """How the views' pixels are made; none of these changes a crop, a flip or a box."""

    # Decode large JPEGs at 1/2..1/8 scale while every crop stays >= this many times its view size
    # (soco_det.data.lazy_image); null: always decode at full size (docs/differences.md).
    decode_reducing_gap: Optional[float] = 2.0
    # Where the colour jitter, grayscale, blur, solarize, normalisation and cutout run: "cpu" (in the
    # loader workers) or "device" (the loader emits uint8 views + the drawn parameters and the engine
    # calls soco_det.data.device_photometric.apply_device_photometric on the batch on the GPU).
    photometric: Literal["cpu", "device"] = "cpu"
    # Speed option, off by default: PIL resize(..., reducing_gap=g) box-averages by an integer factor
    # before the bilinear resize when the view is >= g times smaller than its crop. Different pixels
    # from the official bilinear resize (measured on 500-px photos: g=1 -> ~30% faster resize, mean
    # |diff| ~0.7 uint8 levels; g=1.5 -> ~10% faster, ~0.2 levels; tests/test_views_speed_paths.py);
    # null keeps the exact torchvision-v1 resize. Always runs PIL's resize.
    resize_reducing_gap: Optional[float] = None
    # Bilinear resize of the views: "numba" (soco_det.data.resize, ~2.5x faster than PIL and
    # bit-identical to PIL's horizontal-then-vertical passes, i.e. every Pillow up to 12, which the
    # official runs used; Pillow 13 runs the vertical pass first for some shapes
    # (python-pillow/Pillow#9549), where the two differ by rounding, <= 1 level) or "pil"
    # (Image.resize of the installed Pillow). tests/test_views_resize.py.
    resize_backend: Literal["numba", "pil"] = "numba"

    @property
    def pixels(self) -> "PixelOptions":
        """These options as a plain :class:`PixelOptions` (also on a :class:`DataConfig`)."""
        return PixelOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PixelOptions)})

    def validate(self) -> None:
        hints = typing.get_type_hints(PixelOptions)
        for f in dataclasses.fields(PixelOptions):
            value, tp = getattr(self, f.name), hints[f.name]
            if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
                raise ValueError(f"{f.name}: one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
        for name in ("decode_reducing_gap", "resize_reducing_gap"):
            gap = getattr(self, name)
            if gap is not None and gap < 1.0:
                raise ValueError(f"{name}: must be >= 1 or null, got {gap}")


@dataclass
class DataConfig(PixelOptions):
    """Where the pretraining images and proposals are, and how they are loaded.

    The image list comes from exactly one of ``coco_json`` (images only, labels ignored),
    ``list_file`` (one image path per line, relative to ``images``), a folder ``images``
    (recursive), or, when none is given, the proposal store's own image list. The pixel options
    (``decode_reducing_gap``, ``photometric``, ``resize_reducing_gap``, ``resize_backend``) are the
    fields of :class:`PixelOptions`; :attr:`pixels` gives them as one object.
    """

    # images root folder (default: the proposal store's root), or inputs as `soco-det proposals` takes
    # them: archives, patterns such as shards/shard-{000..009}.tar, .txt list files, or a list of them
    images: Optional[Union[str, list[str]]] = None
    list_file: Optional[str] = None
    coco_json: Optional[str] = None
    proposals: Optional[str] = None  # proposal store (soco_det.proposals.store)
    batch_size: int = 64  # per process
    num_workers: Union[int, Literal["auto"]] = 4  # per process; auto: soco_det/cpus.py loader_workers
    strict: bool = False  # raise on a bad image instead of skipping it
    min_side: int = 32  # images with a smaller side are bad input (proposals need >= 32 px)
    max_replacements: int = 16  # draws of a replacement index before giving up on a bad image
    # Least share of the images that must have proposals (an 'ok' entry in data.proposals): below it
    # pretraining refuses to start, as it would be mostly image-level (whole-image boxes). 0: no check.
    min_proposal_coverage: float = 0.5
    views: ViewsConfig = field(default_factory=ViewsConfig)

    def validate(self) -> None:
        if self.list_file is not None and self.coco_json is not None:
            raise ValueError("give at most one of list_file and coco_json")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0 or auto, got {self.num_workers}")
        if self.min_side < 1:
            raise ValueError(f"min_side: must be >= 1, got {self.min_side}")
        if self.max_replacements < 1:
            raise ValueError(f"max_replacements: must be >= 1, got {self.max_replacements}")
        if not 0.0 <= self.min_proposal_coverage <= 1.0:
            raise ValueError(f"min_proposal_coverage: a share in [0, 1], got {self.min_proposal_coverage}")
        super().validate()
        self.views.validate()
