"""COCO-format instance data for Mask R-CNN: an images folder plus an annotation JSON.

``CocoInstances(json, images)`` reads the JSON with pycocotools and returns, per image, a float32
RGB tensor ``[3, H, W]`` in ``[0, 1]`` and a torchvision detection target:

* ``boxes``: float32 ``[N, 4]``, ``x1, y1, x2, y2`` in continuous pixel coordinates of the returned
  image (COCO ``bbox`` ``[x, y, w, h]`` -> ``[x, y, x + w, y + h]``);
* ``labels``: int64 ``[N]``, contiguous ``1..C`` (0 is the background), assigned to the dataset's own
  category ids in increasing id order (:attr:`CocoInstances.cat_ids` maps back);
* ``masks``: uint8 ``[N, H, W]`` (0/1), decoded from polygons or RLE;
* ``image_id``: the COCO image id (int).

The JSON is checked first (:func:`validate_coco`: an error for what cannot be right, a count of
what is dropped). Crowd regions and boxes thinner than a pixel once clipped to the image are left
out of the targets. Training samples are
fetched with the key ``(index, epoch)``; the random scale and flip then come from
``numpy.random.default_rng([seed, epoch, index])``, so a run is reproducible and resumable
whatever the number of loader workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from soco_det.errors import UserError
from soco_det.imageio import check_relative_path, load_rgb
from soco_det.logs import get_logger

log = get_logger(__name__)


def load_coco(json_path: str | Path):
    """A ``pycocotools.coco.COCO`` for ``json_path``; a clear :class:`UserError` for a missing file,
    invalid JSON, or JSON that is not a COCO instances file."""
    from pycocotools.coco import COCO

    path = Path(json_path)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: a COCO file holds a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: not a COCO instances file (no {key!r} list)")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise UserError(f"{path}: 'annotations' is not a list")
    report = validate_coco(path, data)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    coco.validation = report
    return coco


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _entry(path: Path, kind: str, i: int, item: Any) -> str:
    ident = item.get("id") if isinstance(item, dict) else None
    return f"{path}: {kind} #{i}" + (f" (id {ident!r})" if ident is not None else "")


def _check_categories(path: Path, data: dict[str, Any]) -> set[int]:
    categories: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise UserError(f"{_entry(path, 'category', i, cat)} has no whole-number 'id'")
        if cat["id"] in categories:
            raise UserError(f"{_entry(path, 'category', i, cat)}: category id {cat['id']} is listed twice")
        categories.add(cat["id"])
    return categories


def _check_images(path: Path, data: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """``{image id: (width, height)}`` of the listed images, each checked."""
    sizes: dict[int, tuple[float, float]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise UserError(f"{path}: image #{i} is not an object")
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if missing:
            raise UserError(f"{path}: image #{i} has no {', '.join(missing)}")
        where = _entry(path, "image", i, img)
        if not isinstance(img["id"], int) or isinstance(img["id"], bool):
            raise UserError(f"{where}: 'id' must be a whole number")
        if img["id"] in sizes:
            raise UserError(f"{where}: image id {img['id']} is listed twice (one image would be lost)")
        if not (_is_number(img["width"]) and _is_number(img["height"]) and img["width"] >= 1 and img["height"] >= 1):
            raise UserError(f"{where}: width/height must be positive numbers, got {img['width']!r} x {img['height']!r}")
        if not isinstance(img["file_name"], str):
            raise UserError(f"{where}: 'file_name' must be a string")
        check_relative_path(img["file_name"], where)
        sizes[img["id"]] = (float(img["width"]), float(img["height"]))
    return sizes


def _check_annotation(path: Path, i: int, ann: Any, ann_ids: set, categories: set[int]) -> None:
    if not isinstance(ann, dict):
        raise UserError(f"{path}: annotation #{i} is not an object")
    missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
    if missing:
        raise UserError(f"{path}: annotation #{i} (id {ann.get('id')}) has no {', '.join(missing)}")
    where = _entry(path, "annotation", i, ann)
    if ann["id"] in ann_ids:
        raise UserError(f"{where}: annotation id {ann['id']!r} is used twice")
    ann_ids.add(ann["id"])
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise UserError(f"{where}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}")
    if ann["category_id"] not in categories:
        raise UserError(
            f"{where}: category_id {ann['category_id']!r} is not in 'categories' (ids {sorted(categories)[:10]})"
        )


def validate_coco(path: Path, data: dict[str, Any]) -> dict[str, int]:
    """Check a COCO instances dict before anything trains or scores on it.

    Errors (one line naming the file and the entry) for what cannot be right: a missing key, an id
    used twice, a size or ``bbox`` that is not numbers, a negative image size, a category id that
    ``categories`` does not list, a ``file_name`` outside the images folder. Annotations of images
    that are not listed are removed; boxes with a negative or empty side, or wholly outside their
    image, are kept in the file's index but never used as targets; boxes reaching outside their
    image are clipped to it. Those counts are returned and logged as one warning line.
    """
    categories = _check_categories(path, data)
    sizes = _check_images(path, data)
    report = {"orphans": 0, "degenerate": 0, "outside": 0, "clipped": 0}
    kept: list[dict[str, Any]] = []
    ann_ids: set = set()
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(path, i, ann, ann_ids, categories)
        if ann["image_id"] not in sizes:
            report["orphans"] += 1
            continue
        kept.append(ann)
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        if w <= 0 or h <= 0:
            report["degenerate"] += 1
        elif min(x + w, width) - max(x, 0) < 1 or min(y + h, height) - max(y, 0) < 1:
            report["outside"] += 1
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            report["clipped"] += 1
    data["annotations"] = kept
    if any(report.values()):
        log.warning(
            "%s: dropped %d annotation(s) of images that are not listed; %d box(es) with a negative or empty side and "
            "%d wholly outside their image are not used; %d box(es) reaching outside their image are clipped to it",
            path,
            report["orphans"],
            report["degenerate"],
            report["outside"],
            report["clipped"],
        )
    return report


def _check_files(json_path: Path, images_dir: Path, file_names: Sequence[str]) -> None:
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: images folder not found (given with {json_path})")
    for name in file_names:
        if not os.path.isfile(images_dir / name):
            raise UserError(f"{images_dir / name}: image file not found (referenced by {json_path})")


class CocoInstances(torch.utils.data.Dataset):
    """Images + instance targets of a COCO file (see the module docstring for the target layout).

    ``min_sizes``/``max_size``: with ``train=True`` each sample is resized so its shorter side is one
    of ``min_sizes`` (chosen at random) unless the longer side would exceed ``max_size``, and
    flipped horizontally with probability ``hflip_prob``. With ``train=False`` images and targets
    are returned at their original size (the model's own transform resizes them for inference).
    """

    def __init__(
        self,
        json_path: str | Path,
        images_dir: str | Path,
        train: bool = False,
        min_sizes: Sequence[int] = (800,),
        max_size: int = 1333,
        hflip_prob: float = 0.5,
        seed: int = 0,
        filter_empty: bool = False,
        max_images: int = 0,
    ) -> None:
        self.json_path = Path(json_path)
        self.images_dir = Path(images_dir)
        self.coco = load_coco(self.json_path)
        self.cat_ids: list[int] = sorted(int(c["id"]) for c in self.coco.dataset["categories"])
        if not self.cat_ids:
            raise UserError(f"{self.json_path}: no categories")
        self.label_of_cat = {cat: i + 1 for i, cat in enumerate(self.cat_ids)}
        ids = sorted(self.coco.imgs)
        if filter_empty:
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
            if not ids:
                raise UserError(f"{self.json_path}: no image has a usable (non-crowd, non-empty) instance")
        if max_images:
            ids = ids[:max_images]
        self.ids: list[int] = ids
        _check_files(self.json_path, self.images_dir, [self.coco.imgs[i]["file_name"] for i in ids])
        self.train = train
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)
        self.hflip_prob = float(hflip_prob)
        self.seed = int(seed)

    @property
    def num_classes(self) -> int:
        """Number of classes of the detector, the background included (C + 1)."""
        return len(self.cat_ids) + 1

    @property
    def categories(self) -> list[dict[str, Any]]:
        return sorted(self.coco.dataset["categories"], key=lambda c: int(c["id"]))

    def __len__(self) -> int:
        return len(self.ids)

    def _usable(self, ann: dict[str, Any]) -> bool:
        """Not crowd, and at least a pixel wide and high once clipped to its image."""
        x, y, w, h = ann["bbox"]
        info = self.coco.imgs[ann["image_id"]]
        width, height = float(info["width"]), float(info["height"])
        clipped_w = min(x + w, width) - max(x, 0)
        clipped_h = min(y + h, height) - max(y, 0)
        return not ann.get("iscrowd", 0) and w >= 1 and h >= 1 and clipped_w >= 1 and clipped_h >= 1

    def target(self, index: int) -> dict[str, Any]:
        """Targets of image ``index`` at its original size (layout in the module docstring)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if self._usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        labels = torch.tensor([self.label_of_cat[int(a["category_id"])] for a in anns], dtype=torch.int64)
        if anns and all("segmentation" in a for a in anns):
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]).astype(np.uint8))
        else:
            # Box-only annotations: the box as the mask, so that the mask branch still has a target.
            masks = torch.zeros((len(anns), h, w), dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, boxes.round().long().tolist()):
                m[y1:y2, x1:x2] = 1
        return {"boxes": boxes, "labels": labels, "masks": masks, "image_id": int(image_id)}

    def load_image(self, index: int) -> Image.Image:
        info = self.coco.imgs[self.ids[index]]
        image = load_rgb(self.images_dir / info["file_name"])
        if image.size != (int(info["width"]), int(info["height"])):
            raise UserError(
                f"{self.images_dir / info['file_name']}: image is {image.size[0]}x{image.size[1]} but "
                f"{self.json_path} says {info['width']}x{info['height']}"
            )
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image, target = self.load_image(index), self.target(index)
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, index])
            image, target = resize(image, target, train_size(image.size, self.min_sizes, self.max_size, rng))
            if rng.random() < self.hflip_prob:
                image, target = hflip(image, target)
        return to_tensor(image), target


def train_size(
    size: tuple[int, int], min_sizes: Sequence[int], max_size: int, rng: np.random.Generator
) -> tuple[int, int]:
    """Output ``(W, H)`` for a ``(W, H)`` image: shorter side = a random choice of ``min_sizes``,
    scaled down if the longer side would exceed ``max_size`` (detectron2's ResizeShortestEdge)."""
    w, h = size
    short = min_sizes[int(rng.integers(len(min_sizes)))]
    scale = min(short / min(w, h), max_size / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize(image: Image.Image, target: dict[str, Any], new_size: tuple[int, int]) -> tuple[Image.Image, dict[str, Any]]:
    """Resize image (bilinear), boxes (scaled per axis) and masks (nearest) to ``new_size = (W, H)``."""
    w, h = image.size
    if (w, h) == tuple(new_size):
        return image, target
    nw, nh = new_size
    out = dict(target)
    out["boxes"] = target["boxes"] * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    masks = target["masks"]
    if masks.shape[0]:
        out["masks"] = torch.nn.functional.interpolate(masks[:, None].float(), size=(nh, nw), mode="nearest")[:, 0].to(
            torch.uint8
        )
    else:
        out["masks"] = masks.new_zeros((0, nh, nw))
    return image.resize((nw, nh), Image.BILINEAR), out


def hflip(image: Image.Image, target: dict[str, Any]) -> tuple[Image.Image, dict[str, Any]]:
    """Mirror image, masks and boxes: in continuous coordinates ``x -> W - x``, so ``[x1, x2]`` becomes ``[W - x2, W - x1]``."""
    w = image.size[0]
    out = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
    out["boxes"] = boxes
    out["masks"] = target["masks"].flip(-1)
    return image.transpose(Image.FLIP_LEFT_RIGHT), out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """float32 ``[3, H, W]`` in ``[0, 1]`` (the Mask R-CNN transform normalises with the configured mean/std)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Lists of images and targets (Mask R-CNN takes images of different sizes)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class TrainingSampler(torch.utils.data.Sampler):
    """An endless, deterministic stream of ``(index, epoch)`` keys, sharded across processes.

    Epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)``; the stream is cut into
    global batches of ``batch_size * world_size`` keys and rank ``r`` takes keys
    ``r*batch_size:(r+1)*batch_size`` of each, as a DistributedSampler would. Starting at
    ``start_iter`` skips exactly the keys the first ``start_iter`` iterations used, without loading
    them, so a resumed run sees the same data as an uninterrupted one.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start_iter: int = 0
    ) -> None:
        if size < 1:
            raise ValueError("TrainingSampler needs a non-empty dataset")
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.start_iter = seed, start_iter

    def _order(self, epoch: int) -> np.ndarray:
        if self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size))
        return self._cache[1]

    def __iter__(self):
        self._cache: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))
        global_batch = self.batch_size * self.world_size
        position = self.start_iter * global_batch  # index into the endless global stream
        while True:
            first = position + self.rank * self.batch_size
            for p in range(first, first + self.batch_size):
                # Positions of one batch may straddle an epoch boundary.
                epoch, offset = divmod(p, self.size)
                yield int(self._order(epoch)[offset]), epoch
            position += global_batch
