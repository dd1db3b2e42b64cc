"""One image with its filtered proposals drawn (``soco-det viz proposals STORE --image NAME -o out.png``).

Each rect ``(x, y, w, h)`` (official convention) is drawn as the outline of the pixels
``x..x+w`` by ``y..y+h``, on the image decoded exactly as the store's proposals were computed
(same EXIF convention).
"""

from __future__ import annotations

from pathlib import Path

from soco_det.archives import SEP, is_member_path, split
from soco_det.errors import UserError


def find_image(store, name: str) -> int:
    """Index of ``name`` in ``store``: a relative path in the store, the image file itself (absolute or
    relative to the working folder; ``ARCHIVE::MEMBER`` for an archive member), a unique basename
    (with or without extension), or a decimal index."""
    i = store.index(name)
    if i is not None:
        return i
    key = _key_of_file(store, name)
    if key is not None:
        i = store.index(key)
        if i is None:
            raise UserError(f"--image {name}: {key} under {store.root} is not in {store.path} ({len(store)} images)")
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


def _key_of_file(store, name: str) -> str | None:
    """The store key of the image file ``name`` (a path on disk, or an archive's path ``::`` member),
    or ``None`` when no such file exists. A file outside the store's images root is an error."""
    archive, member = split(name) if is_member_path(name) else (name, "")
    file = Path(archive).expanduser()
    if not file.is_file():
        return None
    try:
        relative = file.resolve().relative_to(Path(store.root).resolve()).as_posix()
    except ValueError:
        raise UserError(
            f"--image {name}: not under the store's images root {store.root} (--root ROOT if the images moved)"
        ) from None
    return f"{relative}{SEP}{member}" if member else relative


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
