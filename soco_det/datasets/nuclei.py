"""``nuclei``: real fluorescence microscopy of cell nuclei with instance masks, from PyPI's ``stardist``.

The ``stardist`` wheel ships ``stardist/data/images/img2d.tif`` (a 512 x 512 16-bit fluorescence
image of stained nuclei) and ``mask2d.tif`` (its label image: one integer per nucleus, 0 for
background), from the 2018 Data Science Bowl (Caicedo et al., Nature Methods 16, 2019; BBBC038v1,
CC0). Both are read from the installed files with ``tifffile``; ``stardist`` itself is never
imported and nothing is downloaded.

The image is split into three disjoint regions, so that no pixel of the val set is seen in training
or pretraining: the left half is ``unlabeled`` (pretraining), the top-right quarter ``train``, the
bottom-right quarter ``val``. Each region is cut into ``tile`` x ``tile`` tiles ``stride`` apart
(overlapping when ``stride < tile``, always inside the region), written as 8-bit grayscale PNGs
(``images/<split>/NNNNNN.png``) with a COCO JSON per split (``<split>.json``: one category
``nucleus``, RLE masks, boxes and areas from the label image via pycocotools; the unlabeled JSON has
no annotations). Each image record also holds ``origin``, its tile's ``[x, y]`` in the source image.
The same arguments give the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from soco_det.atomic import atomic_write_bytes, atomic_write_json
from soco_det.datasets.package_data import package_file
from soco_det.datasets.tiles import instance_annotations, tile_origins, to_uint8
from soco_det.errors import UserError
from soco_det.logs import get_logger

PACKAGE = "stardist"
IMAGE_FILE = "data/images/img2d.tif"
LABELS_FILE = "data/images/mask2d.tif"
PURPOSE = "the nuclei data set (soco-det prepare nuclei)"
SPLITS = ("unlabeled", "train", "val")
MIN_TILE = 32
DEFAULT_TILE = 128
DEFAULT_MIN_AREA = 16
SOURCE = {
    "package": "stardist (PyPI), files stardist/data/images/img2d.tif and mask2d.tif",
    "package_license": "BSD-3-Clause",
    "data": "2018 Data Science Bowl, BBBC038v1 (Caicedo et al., Nature Methods 16, 2019)",
    "data_license": "CC0-1.0",
}

log = get_logger(__name__)


def read_source() -> tuple[np.ndarray, np.ndarray, Path]:
    """The image and its label image from the installed ``stardist`` files, and the image's path;
    a :class:`UserError` naming the file when it cannot be read or the two do not match."""
    image_path = package_file(PACKAGE, IMAGE_FILE, PACKAGE, PURPOSE)
    labels_path = package_file(PACKAGE, LABELS_FILE, PACKAGE, PURPOSE)
    try:
        import tifffile
    except ImportError:
        raise UserError(f"reading {image_path} needs tifffile: pip install tifffile") from None
    arrays = []
    for path in (image_path, labels_path):
        try:
            arrays.append(np.asarray(tifffile.imread(path)))
        except Exception as exc:  # tifffile raises several types for a damaged file
            raise UserError(f"{path}: not a readable TIFF ({exc}); reinstall {PACKAGE}") from None
    image, labels = arrays
    if image.ndim != 2 or labels.shape != image.shape or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{labels_path}: expected a 2-D integer label image of the shape of {image_path} "
            f"{image.shape}, got {labels.dtype} {labels.shape}"
        )
    return image, labels, image_path


def regions(height: int, width: int) -> dict[str, tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` of each split: left half unlabeled, top-right train, bottom-right val."""
    half_w, half_h = width // 2, height // 2
    return {
        "unlabeled": (0, 0, half_w, height),
        "train": (half_w, 0, width, half_h),
        "val": (half_w, half_h, width, height),
    }


def _check_options(tile: int, stride: int, min_area: int, height: int, width: int) -> None:
    largest = min(height, width) // 2
    if not isinstance(tile, int) or not MIN_TILE <= tile <= largest:
        raise UserError(f"--tile must be an integer in {MIN_TILE}..{largest} px (a quarter of the image), got {tile!r}")
    if not isinstance(stride, int) or not 1 <= stride <= tile:
        raise UserError(f"--stride must be an integer in 1..{tile} (the tile size), got {stride!r}")
    if not isinstance(min_area, int) or min_area < 1:
        raise UserError(f"min_area must be an integer >= 1 px, got {min_area!r}")


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(out: Path, split: str, crops: list[tuple[int, int]], arrays: tuple, options: dict) -> Path:
    """Write the tiles of one split and its COCO JSON; returns the JSON path."""
    pixels, labels = arrays
    tile = options["tile"]
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, (x, y) in enumerate(crops):
        name = f"{split}/{index:06d}.png"
        atomic_write_bytes(out / "images" / name, _png(pixels[y : y + tile, x : x + tile]))
        images.append({"id": index + 1, "file_name": name, "width": tile, "height": tile, "origin": [x, y]})
        if split != "unlabeled":
            for ann in instance_annotations(labels[y : y + tile, x : x + tile], options["min_area"]):
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
    _warn_stale(folder, {Path(record["file_name"]).name for record in images})
    dataset = {
        "info": {"description": "soco-det nuclei tiles", "split": split, **SOURCE, **options},
        "licenses": [{"id": 1, "name": SOURCE["data_license"]}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "nucleus", "supercategory": "cell"}],
    }
    json_path = out / f"{split}.json"
    atomic_write_json(json_path, dataset, separators=(",", ":"))
    log.info("%s: %d tiles, %d annotations -> %s", split, len(images), len(annotations), json_path)
    return json_path


def _warn_stale(folder: Path, names: set[str]) -> None:
    stale = sorted(p.name for p in folder.glob("*.png") if p.name not in names)
    if stale:
        log.warning(
            "%s holds %d tile(s) of an earlier run (e.g. %s) that the new JSON does not list",
            folder,
            len(stale),
            stale[0],
        )


def prepare_nuclei(
    out: str | Path, tile: int = DEFAULT_TILE, stride: int | None = None, min_area: int = DEFAULT_MIN_AREA
) -> dict[str, Path]:
    """Write the nuclei tiles and COCO files into ``out`` (module docstring); returns
    ``{"images": out/images, "unlabeled": out/unlabeled.json, "train": out/train.json,
    "val": out/val.json}`` like :func:`soco_det.synth.generate`. ``stride`` defaults to ``tile``
    (no overlap); object parts under ``min_area`` pixels at a tile's border are dropped."""
    image, labels, image_path = read_source()
    stride = tile if stride is None else stride
    _check_options(tile, stride, min_area, *image.shape)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output folder")
    options = {"tile": tile, "stride": stride, "min_area": min_area}
    arrays = (to_uint8(image), labels)
    paths: dict[str, Path] = {"images": out / "images"}
    for split, region in regions(*image.shape).items():
        paths[split] = _write_split(out, split, tile_origins(region, tile, stride), arrays, options)
    log.info("nuclei: from %s", image_path)
    return paths
