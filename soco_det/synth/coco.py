"""Write one split of sample scenes: JPEGs under ``images/<split>/`` and a COCO JSON.

Annotations follow the COCO conventions: ``bbox`` is ``[x, y, w, h]`` (float) in continuous pixel
coordinates (pixel ``i`` covers ``[i, i + 1)``), computed by pycocotools from the visible mask, so
the box is exactly the mask's extent; ``segmentation`` is a compressed RLE from
``pycocotools.mask.encode`` (``counts`` as a str); ``area`` is the mask's pixel count; ``iscrowd``
is 0; ids are 1-based. Image ``id`` is the scene index + 1 and ``file_name`` is relative to the
images folder (``train/000003.jpg``).

Bytes are reproducible: scenes are seeded per (seed, split, index), JPEGs are written by Pillow
with a fixed quality and no metadata, and the JSON holds no time stamps.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from soco_det.atomic import atomic_write_json
from soco_det.logs import Progress, get_logger
from soco_det.synth.scenes import Scene, make_scene
from soco_det.synth.shapes import SHAPES

JPEG_QUALITY = 92
FORMAT_VERSION = 1

log = get_logger(__name__)


def categories() -> list[dict[str, Any]]:
    """COCO categories: one per silhouette class, ids 1..len(SHAPES) in :data:`SHAPES` order."""
    return [{"id": i + 1, "name": shape.name, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]


def file_name(split: str, index: int) -> str:
    """The image's path relative to the images folder, e.g. ``train/000003.jpg``."""
    return f"{split}/{index:06d}.jpg"


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of ``uint8 [H, W, 3]`` RGB; fixed settings and no EXIF, so the same pixels always
    give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def scene_annotations(scene: Scene) -> list[dict[str, Any]]:
    """COCO annotations (without ``id`` and ``image_id``) of a scene's visible objects."""
    from pycocotools import mask as mask_utils

    width, height = scene.size
    annotations = []
    for obj in scene.objects:
        rle = mask_utils.encode(obj.full_mask(height, width))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        annotations.append(
            {
                "category_id": obj.category_id,
                "bbox": bbox,
                "area": float(mask_utils.area(rle)),
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                "iscrowd": 0,
            }
        )
    return annotations


def _write_bytes(path: Path, data: bytes) -> None:
    # Rename into place so a killed run never leaves a truncated JPEG under the final name; no fsync
    # (thousands of small files): a re-run rewrites the same bytes anyway.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _render(job: tuple[str, str, int, int, int, bool]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Worker: draw scene ``index``, save its JPEG, return its image record and annotations."""
    images_dir, split, seed, index, short_side, labeled = job
    scene = make_scene(seed, split, index, short_side)
    name = file_name(split, index)
    _write_bytes(Path(images_dir) / name, encode_jpeg(scene.image))
    width, height = scene.size
    record = {"id": index + 1, "file_name": name, "width": width, "height": height}
    return record, scene_annotations(scene) if labeled else []


def _results(jobs: list[tuple], workers: int) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    if workers <= 1 or len(jobs) < 2:
        yield from map(_render, jobs)
        return
    with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
        # imap keeps the scene order, so the JSON is the same whatever the worker count
        yield from pool.imap(_render, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers))))


def write_split(
    out_dir: str | Path, split: str, count: int, seed: int, short_side: int, labeled: bool, workers: int = 1
) -> Path:
    """Render ``count`` scenes of ``split`` into ``out_dir/images/<split>/`` and write
    ``out_dir/<split>.json`` (atomically, after every image is on disk). Without ``labeled`` the JSON
    lists the images and categories and an empty ``annotations`` list. Returns the JSON path."""
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    (images_dir / split).mkdir(parents=True, exist_ok=True)
    _warn_stale(images_dir / split, count)

    jobs = [(str(images_dir), split, seed, index, short_side, labeled) for index in range(count)]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    with Progress(total=count, desc=f"synth {split}", unit="scene") as bar:
        for record, anns in _results(jobs, workers):
            images.append(record)
            for ann in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": record["id"], **ann})
            bar.update(1)

    dataset = {
        "info": {
            "description": "soco-det sample scenes (textured silhouettes on photo backgrounds)",
            "version": str(FORMAT_VERSION),
            "split": split,
            "seed": seed,
            "short_side": short_side,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }
    json_path = out_dir / f"{split}.json"
    atomic_write_json(json_path, dataset, separators=(",", ":"))
    log.info("%s: %d images, %d annotations -> %s", split, len(images), len(annotations), json_path)
    return json_path


def _warn_stale(folder: Path, count: int) -> None:
    """A previous run with more scenes leaves images the new JSON does not list; say so."""
    stale = [p.name for p in folder.glob("*.jpg") if p.stem.isdigit() and int(p.stem) >= count]
    if stale:
        log.warning(
            "%s holds %d image(s) from an earlier, larger run (e.g. %s) that %s.json does not list",
            folder,
            len(stale),
            sorted(stale)[0],
            folder.name,
        )
