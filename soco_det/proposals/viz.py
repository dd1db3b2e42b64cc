"""One image with its filtered proposals drawn (``soco-det viz proposals STORE --image NAME -o out.png``).

Each rect ``(x, y, w, h)`` (official convention) is drawn as the outline of the pixels
``x..x+w`` by ``y..y+h``, on the image decoded exactly as the store's proposals were computed
(same EXIF convention).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="proposal store folder")
    parser.add_argument(
        "--image",
        required=True,
        metavar="NAME",
        help="relative path in the store, a basename (with or without extension) or an index",
    )
    parser.add_argument("-o", "--output", required=True, metavar="PNG", help="picture to write")
    parser.add_argument("--raw", action="store_true", help="draw the unfiltered rects (store computed with --keep-raw)")
    parser.add_argument("--max-boxes", type=int, default=200, help="draw at most this many rects")
    parser.add_argument("--root", default=None, help="images root, if the images moved since the store was computed")


def find_image(store, name: str) -> int:
    """Index of ``name`` in ``store``: a relative path, a unique basename (with or without
    extension), or a decimal index."""
    from soco_det.errors import UserError

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


def run(args: argparse.Namespace) -> int:
    from soco_det.imageio import load_rgb
    from soco_det.logs import get_logger
    from soco_det.proposals.store import ProposalStore

    store = ProposalStore.open(args.store, root=args.root)
    i = find_image(store, args.image)
    rects = store.raw_boxes(i) if args.raw else store.boxes(i)
    image = load_rgb(
        Path(store.root) / store.paths[i], exif_transpose=store.exif_transpose, max_pixels=store.meta.get("max_pixels")
    )
    out = draw_proposals(image, rects[: args.max_boxes])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.output)
    get_logger(__name__).info(
        "%s: %d %s proposals (stage %s) -> %s",
        store.paths[i],
        len(rects),
        "raw" if args.raw else "filtered",
        store.stage(i),
        args.output,
    )
    return 0
