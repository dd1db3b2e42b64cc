"""A fine-tuned detector's predictions drawn on images (``soco-det viz predictions``), beside the ground truth.

:func:`render_predictions` runs a ``soco-det finetune`` checkpoint (or run folder) on images, at
their own size as evaluation does, and writes one PNG per image: the predicted boxes above a score
threshold with their class name and score, and their masks (probability > 0.5) tinted in the class's
colour. Given the COCO file of the images, the ground truth is drawn the same way in a panel to the
left. Small images are enlarged (by a whole factor, nearest pixel) so that labels stay readable;
boxes are ``x1, y1, x2, y2`` in continuous pixel coordinates of the original image, scaled with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from soco_det.atomic import atomic_save
from soco_det.errors import UserError
from soco_det.imageio import list_images, load_rgb
from soco_det.logs import get_logger
from soco_det.synth.viz import PALETTE
from soco_det.torch_io import resolve_device
from soco_det.transfer.coco_data import CocoInstances, load_coco
from soco_det.transfer.evaluation import MASK_THRESHOLD, detect, load_detector

log = get_logger(__name__)

MIN_PANEL_SIDE = 320  # a panel's longer side is enlarged to at least this many pixels
CAPTION = 16  # pixels of the caption strip above each panel
GAP = 6
MASK_ALPHA = 0.4


@dataclass
class Drawn:
    """Instances to draw on one panel: ``boxes`` float ``[N, 4]`` xyxy pixels of the original image,
    ``labels`` dataset category ids ``[N]``, ``scores`` (``None`` for ground truth) and ``masks``
    bool ``[N, H, W]`` at the original size (``None``: boxes only)."""

    boxes: np.ndarray
    labels: list[int]
    scores: list[float] | None = None
    masks: np.ndarray | None = None


def panel_scale(size: tuple[int, int]) -> int:
    """The whole factor a ``(W, H)`` image is enlarged by in the picture."""
    return max(1, math.ceil(MIN_PANEL_SIDE / max(size)))


def draw_panel(image: Image.Image, drawn: Drawn, names: dict[int, str]) -> Image.Image:
    """``image`` enlarged by :func:`panel_scale` with the masks tinted and the boxes outlined and
    labelled (``name`` or ``name score``), in the colour of their category."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = {c: np.array(PALETTE[(c - 1) % len(PALETTE)], dtype=np.float32) for c in set(drawn.labels)}
    if drawn.masks is not None:
        for mask, label in zip(drawn.masks, drawn.labels):
            pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * colours[label]
    k = panel_scale(image.size)
    panel = Image.fromarray(pixels.round().astype(np.uint8)).resize((image.width * k, image.height * k), Image.NEAREST)
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=11)
    scores = drawn.scores if drawn.scores is not None else [None] * len(drawn.labels)
    # lowest scores first, so that the best detections are drawn on top
    for box, label, score in reversed(list(zip(drawn.boxes.tolist(), drawn.labels, scores))):
        x1, y1, x2, y2 = (v * k for v in box)
        colour = PALETTE[(label - 1) % len(PALETTE)]
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour, width=2)
        text = names.get(label, str(label)) + (f" {score:.2f}" if score is not None else "")
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        ty = y1 - (bottom - top) - 3 if y1 - (bottom - top) - 3 >= 0 else y1
        draw.rectangle([x1, ty, x1 + right - left + 3, ty + bottom - top + 2], fill=colour)
        draw.text((x1 + 1, ty - top + 1), text, fill=(255, 255, 255), font=font)
    return panel


def compose(panels: Sequence[tuple[str, Image.Image]]) -> Image.Image:
    """Panels side by side, each under its caption."""
    width = sum(p.width for _, p in panels) + GAP * (len(panels) - 1)
    height = max(p.height for _, p in panels) + CAPTION
    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for caption, panel in panels:
        draw.text((x + 2, 2), caption, fill=(0, 0, 0), font=ImageFont.load_default(size=11))
        out.paste(panel, (x, CAPTION))
        x += panel.width + GAP
    return out


def predictions_of(output: dict[str, torch.Tensor], cat_ids: Sequence[int], score_thresh: float) -> Drawn:
    """The detections of one model output scoring at least ``score_thresh``, labels as category ids."""
    keep = output["scores"] >= score_thresh
    masks = output.get("masks")
    return Drawn(
        boxes=output["boxes"][keep].numpy().reshape(-1, 4),
        labels=[int(cat_ids[int(label) - 1]) for label in output["labels"][keep]],
        scores=output["scores"][keep].tolist(),
        masks=(masks[keep][:, 0] > MASK_THRESHOLD).numpy() if masks is not None else None,
    )


def ground_truth_of(dataset: CocoInstances, index: int) -> Drawn:
    """Image ``index``'s usable annotations (masks only when each has a segmentation)."""
    target = dataset.target(index)
    anns = [a for a in dataset.coco.imgToAnns.get(dataset.ids[index], []) if dataset._usable(a)]
    with_masks = bool(anns) and all(a.get("segmentation") for a in anns)
    return Drawn(
        boxes=target["boxes"].numpy().reshape(-1, 4),
        labels=[dataset.cat_ids[int(label) - 1] for label in target["labels"]],
        masks=target["masks"].numpy().astype(bool) if with_masks else None,
    )


def category_names(coco_json: str | Path | None, cfg: Any) -> dict[int, str]:
    """Category id -> name from ``coco_json``, else from the run's training COCO file when it is
    still there, else none (ids are shown)."""
    for path in (coco_json, getattr(cfg.data, "train_json", None)):
        if path and Path(path).is_file():
            return {int(c["id"]): str(c.get("name", c["id"])) for c in load_coco(path).dataset["categories"]}
    return {}


def _folder_images(images: Path, n: int) -> list[tuple[str, Path]]:
    """``(name, file)`` of an image file, or of the first ``n`` images under a folder (0: all)."""
    if images.is_file():
        return [(images.name, images)]
    if not images.is_dir():
        raise UserError(f"{images}: no such image or folder")
    names = list_images(images)
    if not names:
        raise UserError(f"{images}: no images in this folder")
    return [(name, images / name) for name in (names[:n] if n else names)]


def render_predictions(
    checkpoint: str | Path,
    images: str | Path,
    out_dir: str | Path,
    coco_json: str | Path | None = None,
    score_thresh: float = 0.5,
    max_images: int = 8,
    device: str = "auto",
) -> list[Path]:
    """Draw the detector of ``checkpoint`` on images and write ``out_dir/<image path>.png`` for each.

    ``images``: with ``coco_json``, the folder its ``file_name`` values are relative to (the first
    ``max_images`` images of the file are drawn, ground truth on the left); without, an image file or
    a folder (searched recursively). ``max_images`` 0: all. Returns the written files."""
    if not 0 <= score_thresh <= 1:
        raise UserError(f"--score-thresh: must lie in [0, 1], got {score_thresh}")
    dev = torch.device(resolve_device(device, "--device"))
    model, cat_ids, cfg = load_detector(checkpoint, dev)
    names = category_names(coco_json, cfg)
    out_dir = Path(out_dir)
    dataset = None
    if coco_json is not None:
        dataset = CocoInstances(coco_json, images, train=False, max_images=max_images)
        items = [(dataset.coco.imgs[i]["file_name"], k) for k, i in enumerate(dataset.ids)]
    else:
        items = _folder_images(Path(images), max_images)
    written = []
    for k, (name, where) in enumerate(items):
        image = dataset.load_image(where) if dataset is not None else load_rgb(where)
        (output,) = detect(model, [image], dev)
        found = predictions_of(output, cat_ids, score_thresh)
        panels = [(f"predictions >= {score_thresh:.2f}: {len(found.labels)}", draw_panel(image, found, names))]
        if dataset is not None:
            truth = ground_truth_of(dataset, k)
            panels.insert(0, (f"ground truth: {len(truth.labels)}", draw_panel(image, truth, names)))
        picture = compose(panels)
        path = out_dir / f"{Path(name).with_suffix('')}.png"
        atomic_save(path, lambda f, p=picture: p.save(f, format="PNG"))
        written.append(path)
        log.info("%s: %d detections >= %.2f -> %s", name, len(found.labels), score_thresh, path)
    return written


def render_ground_truth(dataset: CocoInstances, out_png: str | Path, n: int = 4) -> Path:
    """The first ``n`` images of ``dataset`` side by side with their annotations (boxes, and masks
    where every instance has one), captioned with their file names: what a fine-tuning run trains on."""
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in dataset.coco.dataset["categories"]}
    panels = []
    for k in range(min(n, len(dataset))):
        truth = ground_truth_of(dataset, k)
        caption = f"{Path(dataset.coco.imgs[dataset.ids[k]]['file_name']).name}: {len(truth.labels)}"
        panels.append((caption, draw_panel(dataset.load_image(k), truth, names)))
    if not panels:
        raise UserError(f"{dataset.json_path}: no images to draw")
    picture = compose(panels)
    atomic_save(Path(out_png), lambda f: picture.save(f, format="PNG"))
    return Path(out_png)
