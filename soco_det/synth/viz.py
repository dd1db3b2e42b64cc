"""Draw a few scenes of a COCO file with their masks, boxes and class names into one PNG.

Example: ``soco-det viz scenes scenes/ --split train -n 6 -o scenes.png`` (a synth output folder),
or ``soco-det viz scenes data/val.json --images data/images -o val.png`` (any COCO file).
"""

from __future__ import annotations

import json
from pathlib import Path

from soco_det.atomic import atomic_save
from soco_det.errors import UserError
from soco_det.imageio import load_rgb

# tab10, so neighbouring category ids get clearly different colours
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
TILE_MAX_SIDE = 320
COLUMNS = 3
MASK_ALPHA = 0.35


def _load_coco(coco_json: Path) -> dict:
    try:
        return json.loads(coco_json.read_text())
    except FileNotFoundError:
        raise UserError(f"{coco_json}: no such COCO file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{coco_json}: not a JSON file ({exc})") from None


def _draw_tile(image_path: Path, annotations: list[dict], names: dict[int, str]):
    """One scene as a PIL image: masks tinted per category, boxes, ``name`` labels; scaled down so
    the long side is at most :data:`TILE_MAX_SIDE`."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    from pycocotools import mask as mask_utils

    pixels = np.asarray(load_rgb(image_path), dtype=np.float32)
    for ann in annotations:
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, dict):  # RLE; polygons (other COCO files) are shown by box only
            rle = dict(segmentation)
            if isinstance(rle["counts"], list):
                rle = mask_utils.frPyObjects(rle, *rle["size"])
            mask = mask_utils.decode(rle).astype(bool)
            colour = np.array(PALETTE[(ann["category_id"] - 1) % len(PALETTE)], dtype=np.float32)
            pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * colour
    tile = Image.fromarray(pixels.astype(np.uint8))
    scale = min(1.0, TILE_MAX_SIDE / max(tile.size))
    if scale < 1:
        tile = tile.resize((round(tile.width * scale), round(tile.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default(size=11)
    for ann in annotations:
        x, y, w, h = (v * scale for v in ann["bbox"])
        colour = PALETTE[(ann["category_id"] - 1) % len(PALETTE)]
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
        label = names.get(ann["category_id"], str(ann["category_id"]))
        left, top, right, bottom = draw.textbbox((x, y), label, font=font)
        ty = y - (bottom - top) - 2 if y - (bottom - top) - 2 >= 0 else y
        draw.rectangle([x, ty, x + (right - left) + 3, ty + (bottom - top) + 2], fill=colour)
        draw.text((x + 1, ty - (top - y) + 1), label, fill=(255, 255, 255), font=font)
    return tile


def render_scenes(coco_json: str | Path, images_dir: str | Path, out_png: str | Path, n: int = 6) -> Path:
    """Draw the first ``n`` images of ``coco_json`` (files under ``images_dir``) in a grid of up to
    three columns, each with its masks (RLE), boxes (COCO ``[x, y, w, h]``) and class names, and
    save it as ``out_png``. Images without annotations (the unlabeled split) are drawn as they are.
    Returns ``out_png`` as a Path."""
    from PIL import Image, ImageDraw

    coco_json, images_dir, out_png = Path(coco_json), Path(images_dir), Path(out_png)
    if n < 1:
        raise UserError(f"the number of scenes to draw must be >= 1, got {n}")
    coco = _load_coco(coco_json)
    images = coco.get("images", [])[:n]
    if not images:
        raise UserError(f"{coco_json}: lists no images")
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    by_image: dict[int, list[dict]] = {}
    for ann in coco.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)

    tiles = [_draw_tile(images_dir / im["file_name"], by_image.get(im["id"], []), names) for im in images]
    columns = min(COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_w = max(t.width for t in tiles) + 4
    cell_h = max(t.height for t in tiles) + 18
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (tile, im) in enumerate(zip(tiles, images)):
        x, y = (i % columns) * cell_w + 2, (i // columns) * cell_h + 2
        # an images-only file (the unlabeled split) gets no misleading "0 objects"
        count = f"  ({len(by_image.get(im['id'], []))} objects)" if by_image else ""
        draw.text((x, y), f"{im['file_name']}{count}", fill=(0, 0, 0))
        grid.paste(tile, (x, y + 14))
    atomic_save(out_png, lambda handle: grid.save(handle, format="PNG"))
    return out_png
