"""Sample-scene generator: determinism, COCO validity, mask/box agreement, scale range, textures, CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from soco_det.commands.main import main
from soco_det.errors import UserError
from soco_det.synth import generate, render_scenes
from soco_det.synth.scenes import make_scene
from soco_det.synth.shapes import SHAPES, Placement, rasterize
from soco_det.synth.textures import PHOTOS, sample_texture, texture_bank
from soco_det.synth.viz import PALETTE

# pycocotools' decode trips numpy 2's __array__ copy-keyword deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 128  # small scenes keep the module fast; the generator treats every size >= 64 alike


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("scenes"), n_unlabeled=4, n_train=40, n_val=6, short_side=SIZE, seed=0)


@pytest.fixture(scope="module")
def train(dataset) -> dict:
    return json.loads(dataset["train"].read_text())


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mask_bbox(mask: np.ndarray) -> list[float]:
    """Continuous COCO box [x, y, w, h] of a binary mask, computed without pycocotools."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    kwargs = dict(n_unlabeled=3, n_train=6, n_val=3, short_side=96, seed=7)
    generate(tmp_path / "a", workers=1, **kwargs)
    generate(tmp_path / "b", workers=2, **kwargs)
    a, b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert len(a) == 3 + 6 + 3 + 3  # images + three JSON files
    assert a == b


def test_different_seed_gives_different_scenes(tmp_path):
    kwargs = dict(n_unlabeled=0, n_train=4, n_val=0, short_side=96)
    generate(tmp_path / "a", seed=1, **kwargs)
    generate(tmp_path / "b", seed=2, **kwargs)
    for i in range(4):
        name = f"images/train/{i:06d}.jpg"
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/train.json").read_text() != (tmp_path / "b/train.json").read_text()


def test_splits_are_different_scenes():
    a, b = make_scene(0, "train", 0, 96), make_scene(0, "val", 0, 96)
    assert a.image.shape != b.image.shape or not np.array_equal(a.image, b.image)


# ---------------------------------------------------------------- COCO layout and validity


def test_layout_and_coco_validity(dataset, train):
    root = dataset["images"]
    assert root == dataset["train"].parent / "images"
    coco = COCO(str(dataset["train"]))
    cats = coco.loadCats(coco.getCatIds())
    assert len(cats) >= 8 and len({c["name"] for c in cats}) == len(cats)
    assert sorted(c["id"] for c in cats) == list(range(1, len(cats) + 1))
    assert len(coco.getImgIds()) == 40 and len(coco.getAnnIds()) > 40
    aspects = []
    for img in coco.loadImgs(coco.getImgIds()):
        assert img["file_name"] == f"train/{img['id'] - 1:06d}.jpg"
        with Image.open(root / img["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (img["width"], img["height"])
        assert min(img["width"], img["height"]) == SIZE
        aspects.append(img["width"] / img["height"])
        assert 1 <= len(coco.getAnnIds(imgIds=img["id"])) <= 8
    assert min(aspects) >= 3 / 4 - 0.01 and max(aspects) <= 4 / 3 + 0.01
    assert min(aspects) < 0.95 and max(aspects) > 1.05  # non-square scenes of both orientations
    ann_ids = [a["id"] for a in train["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    assert {a["iscrowd"] for a in train["annotations"]} == {0}


def test_unlabeled_split_lists_images_only(dataset):
    data = json.loads(dataset["unlabeled"].read_text())
    assert data["annotations"] == [] and len(data["categories"]) >= 8
    assert [im["file_name"] for im in data["images"]] == [f"unlabeled/{i:06d}.jpg" for i in range(4)]
    assert all((dataset["images"] / im["file_name"]).is_file() for im in data["images"])
    assert len(json.loads(dataset["val"].read_text())["images"]) == 6


def test_masks_agree_with_boxes_and_areas(train):
    masks_by_image: dict[int, list[np.ndarray]] = {}
    for ann in train["annotations"]:
        assert isinstance(ann["segmentation"]["counts"], str)
        mask = mask_utils.decode(ann["segmentation"])
        assert mask.any()
        np.testing.assert_allclose(ann["bbox"], _mask_bbox(mask), atol=1.0)
        assert ann["area"] == mask.sum() >= 16
        masks_by_image.setdefault(ann["image_id"], []).append(mask)
    # visible masks never overlap: a pixel belongs to the object drawn last over it
    for masks in masks_by_image.values():
        assert np.stack(masks).sum(axis=0).max() == 1


def test_occlusion_is_annotated_as_the_visible_part():
    objects = [obj for i in range(30) for obj in make_scene(0, "train", i, SIZE).objects]
    fractions = np.array([obj.mask.sum() / obj.drawn_area for obj in objects])
    assert fractions.min() >= 0.2 and fractions.max() <= 1.0
    assert (fractions < 0.9).sum() >= 3  # some objects are partly covered by later ones


def test_scale_range_is_covered(train):
    sides = np.array([max(a["bbox"][2], a["bbox"][3]) for a in train["annotations"]])
    assert (sides < 32).sum() >= 3
    assert (sides > 0.4 * SIZE).sum() >= 3


def test_all_categories_appear(train):
    assert {a["category_id"] for a in train["annotations"]} == set(range(1, len(SHAPES) + 1))


def test_cocoeval_of_ground_truth_against_itself_is_perfect(dataset, train):
    gt = COCO(str(dataset["train"]))
    detections = [{**a, "score": 1.0} for a in train["annotations"]]
    for iou_type in ("bbox", "segm"):
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)


# ---------------------------------------------------------------- silhouettes and textures


def test_silhouettes_are_distinct_and_fit_the_disc():
    place = Placement(cx=40.0, cy=40.0, diameter=64.0, angle=0.0)
    masks = {}
    for shape in SHAPES:
        window, mask = rasterize(shape, place, 80, 80)
        assert window == (8, 8, 72, 72) and mask.shape == (64, 64)
        yy, xx = np.mgrid[:64, :64] + 0.5
        assert not (mask & ((xx - 32) ** 2 + (yy - 32) ** 2 > 32.5**2)).any(), shape.name
        masks[shape.name] = mask
        rotated = rasterize(shape, Placement(40.0, 40.0, 64.0, angle=1.0), 80, 80)[1]
        assert abs(int(rotated.sum()) - int(mask.sum())) < 0.05 * mask.sum(), shape.name
    for (na, a), (nb, b) in itertools.combinations(masks.items(), 2):
        assert (a & b).sum() / (a | b).sum() < 0.9, (na, nb)


def test_rasterize_clips_at_the_border():
    window, mask = rasterize(SHAPES[0], Placement(cx=5.0, cy=70.0, diameter=40.0, angle=0.3), 64, 80)
    assert window == (0, 50, 25, 80) and mask.shape == (30, 25) and mask.any()


def test_textures_come_from_the_bundled_photos():
    import skimage.data

    bank = texture_bank()
    assert [p.name for p in bank] == list(PHOTOS) and len(bank) >= 10
    coins = next(p for p in bank if p.name == "coins")  # small enough to be kept at full size
    np.testing.assert_array_equal(np.asarray(coins.image)[:, :, 0], skimage.data.coins())
    for photo in bank:
        assert np.asarray(photo.image).std() > 10, photo.name  # moon, the flattest, has 13
    rng = np.random.default_rng(0)
    crops = [sample_texture(rng, 48, 64) for _ in range(12)]
    assert len({source for _, source in crops}) >= 5
    for crop, _ in crops:
        assert crop.shape == (48, 64, 3) and crop.dtype == np.uint8 and crop.std() > 5
    means = np.array([crop.reshape(-1, 3).mean(axis=0) for crop, _ in crops])
    assert means.std(axis=0).min() > 10  # varied colours, not one tint
    assert all(s not in (0, 1) for _, s in (sample_texture(rng, 8, 8, exclude=(0, 1)) for _ in range(20)))


def test_objects_are_textured_in_the_images(dataset, train):
    stds = []
    for ann in train["annotations"]:
        if ann["area"] < 200:
            continue
        img = next(im for im in train["images"] if im["id"] == ann["image_id"])
        pixels = np.asarray(Image.open(dataset["images"] / img["file_name"]).convert("L"), dtype=np.float32)
        stds.append(pixels[mask_utils.decode(ann["segmentation"]).astype(bool)].std())
    assert len(stds) > 20 and np.median(stds) > 8


# ---------------------------------------------------------------- errors, CLI, picture


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_train=-1), "train scenes"),
        (dict(n_unlabeled=-5), "unlabeled scenes"),
        (dict(short_side=32), ">= 64 px"),
        (dict(workers=0), "workers"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise_user_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written


def test_output_folder_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        generate(target, n_unlabeled=1, n_train=1, n_val=1)


def test_cli_synth_and_viz_scenes(tmp_path, capsys):
    out = tmp_path / "scenes"
    assert main(["synth", "-o", str(out), "--unlabeled", "2", "--train", "3", "--val", "2", "--size", "96"]) == 0
    assert len(list((out / "images/train").glob("*.jpg"))) == 3
    assert len(json.loads((out / "val.json").read_text())["images"]) == 2
    png = tmp_path / "grid.png"
    assert main(["viz", "scenes", str(out), "--split", "train", "-n", "3", "-o", str(png)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 3 * 96
    assert main(["synth", "-o", str(out), "--size", "10"]) == 2
    assert ">= 64 px" in capsys.readouterr().err
    assert main(["viz", "scenes", str(tmp_path / "missing.json"), "-o", str(png)]) == 2


def test_render_scenes_draws_the_boxes(dataset, train, tmp_path):
    png = render_scenes(dataset["train"], dataset["images"], tmp_path / "one.png", n=1)
    grid = np.asarray(Image.open(png).convert("RGB"))
    anns = [a for a in train["annotations"] if a["image_id"] == 1]
    # the single tile sits at (2, 16) at full scale; each box's lower-right corner has its colour
    # unless a later box or label covers it
    hits = 0
    for ann in anns:
        x, y, w, h = ann["bbox"]
        pixel = grid[16 + int(y + h - 1), 2 + int(x + w - 1)]
        hits += tuple(pixel) == PALETTE[ann["category_id"] - 1]
    assert hits >= math.ceil(len(anns) / 2)
