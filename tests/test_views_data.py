"""Sources, the dataset (fallback, determinism, bad input), correspondence, cutout placement,
collate shapes and the `viz views` command, on real photographs with a real proposal store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _views_data import photo_store
from PIL import Image

from soco_det.config import ConfigError, build_config
from soco_det.data import boxes as B
from soco_det.data.config import (
    PRESETS,
    DataConfig,
    PixelOptions,
    ViewBoxes,
    ViewGeometry,
    ViewPhotometric,
    ViewsConfig,
)
from soco_det.data.dataset import PretrainDataset, build_pretrain_dataset, collate_views
from soco_det.data.levels import correspondence
from soco_det.data.sources import coco_items, folder_items, join_with_store, list_file_items
from soco_det.errors import ImageError, UserError
from soco_det.proposals.store import ProposalStore


@pytest.fixture(scope="module")
def photos():
    return photo_store()


def _dataset(images, store, recipe="soco_fpn", **kw):
    return build_pretrain_dataset(
        DataConfig(images=str(images), proposals=str(store), views=ViewsConfig(recipe=recipe), **kw), seed=3
    )


# -- sources -------------------------------------------------------------------------------------
def test_sources_folder_list_coco_join(photos, tmp_path):
    images, store_dir = photos
    store = ProposalStore.open(store_dir)
    items = folder_items(images)
    assert [i.key for i in items] == list(store.paths)  # recursive, sorted, relative posix paths
    assert (join_with_store(items, store) == np.arange(len(store))).all()

    (tmp_path / "list.txt").write_text("# comment\n" + "\n".join(f"{k}\t7" for k in reversed(store.paths)) + "\n\n")
    listed = list_file_items(tmp_path / "list.txt", images)
    assert [i.key for i in listed] == list(reversed(store.paths))
    assert (join_with_store(listed, store) == np.arange(len(store))[::-1]).all()

    coco = {
        "images": [{"id": i, "file_name": k, "width": 1, "height": 1} for i, k in enumerate(store.paths)],
        "annotations": [],
        "categories": [],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert [i.key for i in coco_items(tmp_path / "c.json", images)] == list(store.paths)


class StemStore:
    """A store keyed like the official proposal JSON: basename without extension."""

    def __init__(self, keys):
        self.paths, self.root = keys, "/nonexistent"

    def index(self, key):
        return self.paths.index(key) if key in self.paths else None


def test_join_by_basename_official_keys(photos):
    images, _ = photos
    items = folder_items(images)
    keys = ["rocket", "astronaut", "coffee", "dup", "dup"]
    idx = join_with_store(items, StemStore(keys))
    by_key = {i.key: int(j) for i, j in zip(items, idx)}
    assert by_key["astronaut.jpg"] == 1 and by_key["sub/rocket.jpg"] == 0 and by_key["sub/coffee.jpg"] == 2
    assert by_key["chelsea.jpg"] == -1


def test_build_dataset_errors(photos, tmp_path):
    images, store = photos
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (64, 64)).save(other / "zzz_not_in_store.jpg")
    with pytest.raises(UserError, match="none of the 1 images"):
        _dataset(other, store)
    with pytest.raises(ConfigError, match="view_sizes"):
        build_config(DataConfig, overrides=["views.recipe=soco_star", "views.geometry.view_sizes=[224,224]"])
    with pytest.raises(ValueError, match="unknown views recipe"):
        ViewsConfig(recipe="nope").validate()
    cfg = build_config(DataConfig, overrides=["views.recipe=soco_c4", "views.photometric.cutout_prob=0.3"])
    r = cfg.views.resolved()
    assert (
        r.geometry.crop_scale == [0.6, 1.0]
        and r.photometric.cutout_prob == 0.3
        and r.boxes.jitter_prob == 0.0
        and cfg.views.num_levels == 1
    )


# -- fallback ------------------------------------------------------------------------------------
def test_whole_image_fallback_for_images_without_proposals(photos, tmp_path):
    images, store = photos
    root = tmp_path / "imgs"
    shutil.copytree(images, root)
    Image.open(root / "astronaut.jpg").save(root / "extra.png")  # not in the store
    ds = build_pretrain_dataset(
        DataConfig(images=str(root), proposals=str(store), views=ViewsConfig(boxes=ViewBoxes(jitter_prob=0.0))), seed=0
    )
    i = [it.key for it in ds.items].index("extra.png")
    assert ds.store_indices[i] == -1
    sample, _, _ = ds.views(i)
    for p in range(len(sample.pairs)):
        assert sample.ids[p][0].tolist() == [1] * 4 and sample.ids[p][1].tolist() == [1] * 4
        np.testing.assert_allclose(sample.boxes[p][0], [[0, 0, 1, 1]] * 4)  # whole image, continuous
        np.testing.assert_allclose(sample.boxes[p][1], [[0, 0, 1, 1]] * 4)  # covers the whole crop


# -- determinism ---------------------------------------------------------------------------------
def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def test_determinism_and_worker_count(photos):
    images, store = photos
    ds = _dataset(images, store)
    assert _equal(ds[(2, 5)], ds[(2, 5)])
    ds.set_epoch(2)
    assert _equal(ds[5], ds[(2, 5)])
    assert not torch.equal(ds[(3, 5)]["images"][1], ds[(2, 5)]["images"][1])
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_views)
        batches.append(next(iter(loader)))
    assert _equal(batches[0], batches[1])


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input_skipped_and_counted_strict_raises(photos, tmp_path):
    images, store_dir = photos
    root = tmp_path / "imgs"
    shutil.copytree(images, root)
    data = (
        (root / "coffee.jpg").read_bytes() if (root / "coffee.jpg").exists() else (root / "sub/coffee.jpg").read_bytes()
    )
    (root / "sub/coffee.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    Image.new("RGB", (20, 12)).save(root / "tiny.png")  # smaller than min_side, not in the store
    store = ProposalStore.open(store_dir, root=root)
    items = folder_items(root)
    idx = join_with_store(items, store)
    keys = [i.key for i in items]
    ds = PretrainDataset(items, idx, store, ViewsConfig(), seed=1)
    for bad in ("sub/coffee.jpg", "tiny.png"):
        sample = ds[keys.index(bad)]
        assert sample["skipped"] >= 1 and sample["index"] == keys.index(bad)
    assert ds.stats["bad_images"] >= 2
    again = ds[keys.index("tiny.png")]
    assert _equal(again, ds[keys.index("tiny.png")])  # the replacement is deterministic
    good = ds[keys.index("astronaut.jpg")]
    assert good["skipped"] == 0
    batch = collate_views([ds[keys.index("tiny.png")], good])
    assert batch["skipped"].tolist()[1] == 0 and batch["skipped"].tolist()[0] >= 1
    strict = PretrainDataset(items, idx, store, ViewsConfig(), seed=1, strict=True)
    with pytest.raises(ImageError, match="coffee.jpg"):
        strict[keys.index("sub/coffee.jpg")]
    with pytest.raises(ImageError, match="min_side"):
        strict[keys.index("tiny.png")]


# -- pixels agree with boxes ----------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["soco_fpn", "soco_star"])
def test_view_pixels_are_the_crop_resized_and_flipped(photos, recipe):
    from soco_det.data.photometric import denormalise

    images, store = photos
    n = len(PRESETS[recipe]["view_kinds"])
    no_colour = ViewsConfig(
        recipe=recipe,
        photometric=ViewPhotometric(
            color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=[0.0] * n, solarize_prob=[0.0] * n, cutout_views=[]
        ),
    )
    ds = build_pretrain_dataset(DataConfig(images=str(images), proposals=str(store), views=no_colour), seed=3)
    cfg = ds.sampler.cfg
    for index in (0, 3):
        sample, used, _ = ds.views(index)
        original = Image.open(ds.items[used].path).convert("RGB")
        for v, kind in enumerate(cfg.geometry.view_kinds):
            top, left, h, w = sample.crops[v]
            size = cfg.geometry.view_sizes[v]
            ref = original.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
            ref = np.asarray(ref, dtype=np.float64)
            ref = ref[:, ::-1] if sample.flips[v] else ref
            got = denormalise(sample.images[v], cfg.photometric.mean, cfg.photometric.std).astype(np.float64)
            # box-resize from the original vs crop-then-resize differ only at the crop border;
            # a down:m view is resized twice
            tol = 12.0 if kind.startswith("down:") else 3.0
            assert np.abs(got - ref)[4:-4, 4:-4].mean() < tol
            assert np.abs(got - ref[:, ::-1])[4:-4, 4:-4].mean() > np.abs(got - ref)[4:-4, 4:-4].mean()


# -- correspondence ------------------------------------------------------------------------------
def test_correspondence_hand_worked_and_naive():
    ids_a, lv_a = torch.tensor([3, 5]), torch.tensor([0, 1])
    ids_b, lv_b = torch.tensor([5, 3]), torch.tensor([1, -1])
    c = correspondence(ids_a, lv_a, ids_b, lv_b, 2)
    expected = torch.zeros(4, 4)
    expected[1 * 2 + 1, 1 * 2 + 0] = 1.0  # box 1 of a (id 5, level 1) ~ box 0 of b (id 5, level 1)
    assert torch.equal(c, expected)
    g = torch.Generator().manual_seed(0)
    B_, K, P = 3, 4, 4
    ia, ib = torch.randint(1, 4, (B_, K), generator=g), torch.randint(1, 4, (B_, K), generator=g)
    la, lb = torch.randint(-1, P, (B_, K), generator=g), torch.randint(-1, P, (B_, K), generator=g)
    c = correspondence(ia, la, ib, lb, P)
    assert c.shape == (B_, P * K, P * K) and c.dtype == torch.float32
    for b in range(B_):
        for r in range(P * K):
            for col in range(P * K):
                want = ia[b, r % K] == ib[b, col % K] and la[b, r % K] == r // K and lb[b, col % K] == col // K
                assert c[b, r, col] == float(want)


# -- cutout placement ----------------------------------------------------------------------------
def _covers(region, box):
    return region[0] <= box[2] and box[0] <= region[2] and region[1] <= box[3] and box[1] <= region[3]


@pytest.mark.parametrize("mirrored", [False, True])
def test_cutout_placement(photos, mirrored):
    images, store = photos
    cfg = ViewsConfig(
        geometry=ViewGeometry(flip_prob=1.0), photometric=ViewPhotometric(cutout_prob=1.0, cutout_mirrored=mirrored)
    )
    ds = build_pretrain_dataset(DataConfig(images=str(images), proposals=str(store), views=cfg), seed=0)
    misses_other = 0
    for index in range(len(ds)):
        sample, _, _ = ds.views(index)
        for v in (1, 2):
            size = ds.sampler.cfg.geometry.view_sizes[v]
            post = sample.boxes[v - 1][1].astype(np.float64)
            pre = B.hflip(post)
            here, other = (pre, post) if mirrored else (post, pre)
            regions = sample.cutouts[v]
            assert len(regions) == 4  # every row, padded duplicates included
            for region, box_here, box_other in zip(regions, here * size, other * size):
                assert _covers(region, [box_here[0], box_here[1], box_here[2] - 1, box_here[3] - 1])
                misses_other += not _covers(region, [box_other[0], box_other[1], box_other[2] - 1, box_other[3] - 1])
                x1, y1, x2, y2 = region
                assert torch.all(sample.images[v][:, y1 : min(y2, size - 1) + 1, x1 : min(x2, size - 1) + 1] == 0)
    assert misses_other > 0  # the two placements differ on flipped views


# -- collate -------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", sorted(PRESETS))
def test_collate_shapes_and_dtypes(photos, recipe):
    images, store = photos
    ds = _dataset(images, store, recipe)
    r = ds.sampler.cfg
    batch = collate_views([ds[i] for i in range(3)])
    P, K, V = ds.num_levels, r.boxes.padding_k, len(r.geometry.view_kinds)
    assert [tuple(t.shape) for t in batch["images"]] == [(3, 3, s, s) for s in r.geometry.view_sizes]
    assert all(t.dtype == torch.float32 for t in batch["images"])
    assert batch["pairs"] == [(0, v) for v in range(1, V)]
    for p in range(V - 1):
        for key, dtype, shape in (
            ("boxes", torch.float32, (3, K, 4)),
            ("ids", torch.int64, (3, K)),
            ("levels", torch.int64, (3, K)),
        ):
            for t in batch[key][p]:
                assert t.dtype == dtype and tuple(t.shape) == shape
        assert batch["corr"][p].shape == (3, P * K, P * K) and batch["corr"][p].dtype == torch.float32
        assert batch["corr"][p].sum() > 0
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.int64
    if recipe == "soco_c4":
        assert P == 1 and all((t == 0).all() for t in batch["levels"][0])


# -- viz -----------------------------------------------------------------------------------------
def test_viz_views_cli_writes_png(photos, tmp_path):
    from soco_det.commands.main import main

    images, store = photos
    out = tmp_path / "views.png"
    rc = main(
        [
            "viz",
            "views",
            "--images",
            str(images),
            "--proposals",
            str(store),
            "-o",
            str(out),
            "--recipe",
            "soco_star",
            "--samples",
            "2",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 800 and img.size[1] > 300


def test_viz_views_rows_are_labelled_by_image_file(photos, tmp_path, monkeypatch):
    import matplotlib.axes

    from soco_det.data.viz import render_views

    images, store = photos
    titles: list[str] = []
    original = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_title", lambda ax, text, *a, **k: titles.append(text) or original(ax, text, *a, **k)
    )
    dataset = build_pretrain_dataset(DataConfig(images=str(images), proposals=str(store)), seed=0)
    render_views(dataset, str(tmp_path / "v.png"), samples=2)
    firsts = [t.split("\n")[0] for t in titles if "\n" in t]
    assert firsts == [dataset.items[0].key, dataset.items[len(dataset) // 2].key]  # one per row, the file's path
    assert all(t.startswith("V") for t in titles if "\n" not in t)


# -- reduced-scale decoding of large JPEGs -------------------------------------------------------
def test_draft_reduction_rule():
    from soco_det.data.lazy_image import draft_reduction

    assert draft_reduction([(500, 375), (350, 300), (300, 280)], [224, 224, 112], 2.0) == 1  # ImageNet-sized
    assert draft_reduction([(4000, 3000), (2900, 2800), (2900, 2900)], [224, 224, 112], 2.0) == 4  # 2800/224/2 = 6.25
    assert draft_reduction([(16000, 12000)], [224], 2.0) == 8


def test_large_jpeg_decoded_reduced_gives_the_same_views(photos, tmp_path):
    import skimage.data

    from soco_det.data.lazy_image import LazyImage
    from soco_det.data.photometric import denormalise
    from soco_det.data.sampler import ViewSampler

    path = tmp_path / "big.jpg"
    Image.fromarray(skimage.data.astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC).save(path, quality=92)
    rects = np.array([[100, 200, 900, 700], [1000, 300, 800, 1200]], np.int32)
    cfg = ViewsConfig(
        photometric=ViewPhotometric(
            color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=[0, 0, 0], solarize_prob=[0, 0, 0], cutout_views=[]
        )
    )
    lazy = LazyImage(path)
    assert lazy.load(4)[0].size == (512, 512)  # decoded at 1/4 scale
    fast = ViewSampler(cfg, PixelOptions(decode_reducing_gap=2.0))(LazyImage(path), rects, np.random.default_rng(5))
    full = ViewSampler(cfg, PixelOptions(decode_reducing_gap=None))(
        Image.open(path).convert("RGB"), rects, np.random.default_rng(5)
    )
    assert fast.crops == full.crops and fast.flips == full.flips
    for p in range(len(full.pairs)):
        for side in (0, 1):
            np.testing.assert_array_equal(fast.boxes[p][side], full.boxes[p][side])
    for a, b in zip(fast.images, full.images):
        diff = np.abs(
            denormalise(a, cfg.resolved().photometric.mean, cfg.resolved().photometric.std).astype(float)
            - denormalise(b, cfg.resolved().photometric.mean, cfg.resolved().photometric.std).astype(float)
        )
        assert diff.mean() < 2.0  # same picture, up to resampling differences
