"""Sample scenes: a seeded generator of multi-object images with COCO annotations.

Nothing can be downloaded in the test and demo environments, so every stage is exercised on these
scenes: 1-5 silhouettes of ten classes (circle, square, triangle, star, ring, cross, crescent,
ellipse, hexagon, L-shape), textured with crops of scikit-image's bundled photos chosen by class
(each class has its own materials and colour, with variation and some confusers), on a background
made from any photo, with rotation, scale, colour jitter and occlusion.

``generate`` writes ``out_dir/images/<split>/<NNNNNN>.jpg`` and ``out_dir/<split>.json`` for the
splits ``unlabeled`` (images only), ``train`` and ``val``; ``render_scenes`` draws a few of them
with their boxes. Heavy libraries are imported inside the functions, so importing this package
(as the CLI does) stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from soco_det.errors import UserError

MIN_SHORT_SIDE = 64

__all__ = ["generate", "render_scenes", "MIN_SHORT_SIDE"]


def _check_arguments(counts: dict[str, int], short_side: int, seed: int, workers: int) -> None:
    for split, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise UserError(f"the number of {split} scenes must be an integer >= 0, got {count!r}")
    if not isinstance(short_side, int) or short_side < MIN_SHORT_SIDE:
        raise UserError(f"the scene size (short side) must be an integer >= {MIN_SHORT_SIDE} px, got {short_side!r}")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"the seed must be an integer >= 0, got {seed!r}")
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"the number of workers must be an integer >= 1, got {workers!r}")


def generate(
    out_dir: str | Path,
    n_unlabeled: int = 200,
    n_train: int = 50,
    n_val: int = 50,
    short_side: int = 256,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, Path]:
    """Write the sample-scene dataset into ``out_dir`` and return its paths.

    Scenes have a short side of ``short_side`` pixels and a random aspect in 3:4..4:3. Scene
    ``index`` of a split depends only on ``(seed, split, index)``: the same arguments give the same
    bytes, whatever ``workers`` (processes used to render) is.

    Returns ``{"images": out_dir/images, "unlabeled": out_dir/unlabeled.json,
    "train": out_dir/train.json, "val": out_dir/val.json}``; each JSON is COCO with ``file_name``
    relative to ``out_dir/images`` (e.g. ``train/000003.jpg``). Raises
    :class:`~soco_det.errors.UserError` for negative counts, a size under 64 px, a negative seed,
    ``workers < 1`` or an ``out_dir`` that is a file.
    """
    counts = {"unlabeled": n_unlabeled, "train": n_train, "val": n_val}
    _check_arguments(counts, short_side, seed, workers)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output folder")

    from soco_det.synth.coco import write_split

    paths: dict[str, Path] = {"images": out / "images"}
    for split, count in counts.items():
        paths[split] = write_split(out, split, count, seed, short_side, labeled=split != "unlabeled", workers=workers)
    return paths


def render_scenes(coco_json: str | Path, images_dir: str | Path, out_png: str | Path, n: int = 6) -> Path:
    """Draw the first ``n`` scenes of a COCO file with their boxes and class names into a PNG grid;
    returns ``out_png``. See :func:`soco_det.synth.viz.render_scenes`."""
    from soco_det.synth.viz import render_scenes as _render

    return _render(coco_json, images_dir, out_png, n=n)
