"""One image with its filtered proposals drawn (``soco-det viz proposals STORE --image NAME -o out.png``).

Each rect ``(x, y, w, h)`` (official convention) is drawn as the outline of the pixels
``x..x+w`` by ``y..y+h``, on the image decoded exactly as the store's proposals were computed
(same EXIF convention).
"""

from __future__ import annotations

from pathlib import Path

from soco_det.errors import UserError


def find_image(store, name: str) -> int:
    """Index of ``name`` in ``store``: a relative path, a unique basename (with or without
    extension), or a decimal index."""
    i = store.index(name)
    if i is not None:
        return i
    if name.isdigit() and int(name) < len(store):
        return int(name)
    matches = [j for j, p in enumerate(store.paths) if Path(p).name == name or Path(p).stem == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UserError(
            f"--image {name!r} matches {len(matches)} images, e.g. {store.paths[matches[0]]}; give the relative path"
        )
    raise UserError(
        f"--image {name!r} is not in {store.path} ({len(store)} images, e.g. {store.paths[0] if len(store) else '-'})"
    )


def draw_proposals(image, rects, width: int = 2):
    """A copy of the PIL ``image`` with ``rects`` (``int [N, 4]``, official convention) outlined in
    distinct colours."""
    import colorsys

    from PIL import ImageDraw

    out = image.copy()
    draw = ImageDraw.Draw(out)
    for k, (x, y, w, h) in enumerate(rects.tolist()):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.9, 1.0)
        draw.rectangle([x, y, x + w, y + h], outline=(int(r * 255), int(g * 255), int(b * 255)), width=width)
    return out
