"""Proposals that fit the objects: the size filter, the --object-size rule, the side distribution
and its warning, and GT recall (soco_det.proposals.fit / sizes / recall), on real decoded images with
the real selective search."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from soco_det.commands.main import main
from soco_det.errors import UserError
from soco_det.proposals import ProposalStore, compute_store
from soco_det.proposals.filters import STAGE_MAIN, STAGE_RATIO, FilterSpec, parse_filter
from soco_det.proposals.fit import coco_median_side, fit_settings, params_for_side, parse_hint
from soco_det.proposals.recall import store_recall
from soco_det.proposals.sizes import large_box_warning, store_sides


def _rects(*sides_wh):
    return np.array([[0, 0, w, h] for w, h in sides_wh], np.int32)


# --- the size filter ---------------------------------------------------------------------------


def test_size_filter_pixel_bounds_and_min_side():
    spec = parse_filter("size:16-96")
    assert (spec.min_px, spec.max_px, spec.min_size, spec.max_size) == (16, 96, None, None)
    assert spec.ratio == 3 and spec.min_side == 8 and not spec.post  # max(4, 16 / 2), not the paper's 32
    # side sqrt(w*h): 15 out, 16 in, 96 in, 97 out; 40 x 10 has side 20 but aspect 4 > 3: out
    rects = _rects((15, 15), (16, 16), (96, 96), (97, 97), (40, 10), (8, 32), (7, 40))
    assert spec.mask(rects, 1000, 1000).tolist() == [False, True, True, False, False, False, False]
    # (8, 32): side 16, aspect 1/4: out by the ratio; (7, 40): side 16.7 but under the min side 8


def test_size_filter_relative_bounds_and_open_ends():
    spec = parse_filter("size:2%-30%")
    assert (spec.min_size, spec.max_size, spec.min_px, spec.max_px, spec.min_side) == (0.02, 0.3, None, None, 4)
    # image side sqrt(400 * 100) = 200 px: 2 % = 4 px, 30 % = 60 px
    assert spec.mask(_rects((4, 4), (3, 3), (60, 60), (61, 61)), 400, 100).tolist() == [True, False, True, False]
    lower = parse_filter("size:16-")
    assert (lower.min_px, lower.max_px) == (16, None)
    assert lower.mask(_rects((15, 15), (900, 900)), 1000, 1000).tolist() == [False, True]
    upper = parse_filter("size:-10%")
    assert (upper.min_px, upper.max_size, upper.min_side) == (None, 0.1, 4)
    mixed = parse_filter("size:12-80%post")
    assert (mixed.min_px, mixed.max_size, mixed.post, mixed.min_side) == (12, 0.8, True, 6)


def test_size_filter_post_falls_back_like_the_paper():
    spec = parse_filter("size:16-32post")
    kept, stage = spec.apply(_rects((20, 20), (100, 100)), 200, 200)
    assert stage == STAGE_MAIN and kept.tolist() == [[0, 0, 20, 20]]
    kept, stage = spec.apply(_rects((100, 100), (150, 10)), 200, 200)  # no rect of object size
    assert stage == STAGE_RATIO and kept.tolist() == [[0, 0, 100, 100]]  # ratio + min side, no size limit
    kept, stage = parse_filter("size:16-32").apply(_rects((100, 100)), 200, 200)
    assert len(kept) == 0


@pytest.mark.parametrize(
    "bad", ["size:", "size:-", "size:a-9", "size:16-8", "size:16-96pots", "size:1%%-2", "size:0-0", "size16-96"]
)
def test_size_filter_malformed_strings_are_clear_errors(bad):
    with pytest.raises(UserError, match="proposal filter"):
        parse_filter(bad)


def test_paper_strings_parse_as_before():
    assert parse_filter("ratio3size0308post") == FilterSpec()
    assert parse_filter("none") == FilterSpec(None, None, None, 32, False, "none")


# --- the rule ----------------------------------------------------------------------------------


def test_smaller_hint_gives_finer_segmentation_and_large_gives_the_papers():
    small, mid, large = params_for_side(16), params_for_side(36), params_for_side(400)
    assert small["scale"] < mid["scale"] < large["scale"] == 300
    assert small["min_size"] < mid["min_size"] < large["min_size"] == 100
    assert mid == {"scale": 50.0, "sigma": 0.9, "min_size": 32}  # the aerial tiles' 0.60-recall settings
    assert {p["sigma"] for p in (small, mid, large)} == {0.9}


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "150%", "coco:", "nan"])
def test_bad_hints_are_clear_errors(bad):
    with pytest.raises(UserError, match="object-size"):
        parse_hint(bad)


def _write_image(path, size=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_coco_hint_reads_the_median_box_side(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 96, "height": 80}],
        "annotations": [
            {"id": i, "image_id": 1, "bbox": [0, 0, w, h], "iscrowd": crowd}
            for i, (w, h, crowd) in enumerate([(10, 10, 0), (20, 20, 0), (40, 10, 0), (90, 90, 1)])
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert coco_median_side(tmp_path / "c.json") == 20.0  # sides 10, 20, 20; the crowd box is left out
    (tmp_path / "img").mkdir()
    _write_image(tmp_path / "img" / "a.png")
    fit = fit_settings(f"coco:{tmp_path / 'c.json'}", tmp_path / "img", ["a.png"])
    assert fit.object_side_px == 20.0 and fit.params == params_for_side(20.0)
    assert fit.filter == "size:7-60post"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="bad.json"):
        coco_median_side(tmp_path / "bad.json")


def test_percent_hint_is_relative_to_the_image_side(tmp_path):
    _write_image(tmp_path / "a.png", size=(200, 50))  # image side sqrt(200 * 50) = 100 px
    fit = fit_settings("12%", tmp_path, ["a.png"])
    assert fit.object_side_px == pytest.approx(12.0) and fit.params == params_for_side(12.0)
    assert fit.filter == "size:4%-36%post"
    paper = fit_settings("paper", tmp_path, ["a.png"])
    assert paper.filter == "ratio3size0308post" and paper.params == {"scale": 300.0, "sigma": 0.9, "min_size": 100}


# --- auto on real small-object scenes, the warning, recall --------------------------------------


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from soco_det.synth import generate

    return generate(tmp_path_factory.mktemp("fit_scenes"), n_unlabeled=0, n_train=0, n_val=8, short_side=128)


@pytest.fixture(scope="module")
def scene_stores(scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit_stores")
    images = scenes["images"] / "val"
    return {
        hint: ProposalStore.open(compute_store(images, out / hint, object_size=hint, keep_raw=True))
        for hint in ("paper", "auto")
    }


def _gt_median_side(coco_file):
    anns = json.loads(coco_file.read_text())["annotations"]
    return float(np.median([np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in anns]))


def test_auto_keeps_object_sized_boxes_and_more_of_the_objects_than_paper(scenes, scene_stores):
    auto, paper = scene_stores["auto"], scene_stores["paper"]
    assert auto.meta["fit"]["hint"] == "auto" and auto.meta["filter"].startswith("size:")
    assert auto.meta["params"]["scale"] < 300 and paper.meta["params"]["scale"] == 300
    # the kept range starts at half the estimated side (objects are often below that median)
    side = auto.meta["fit"]["object_side_px"]
    assert auto.meta["filter"] == f"size:{side / 2:.0f}-80%post"
    kept = store_sides(auto)["kept"]
    gt_side = _gt_median_side(scenes["val"])
    # boxes of object size are kept (the paper's smallest kept boxes are larger than most objects)
    assert kept["px"][0] <= gt_side < store_sides(paper)["kept"]["px"][0]
    assert gt_side / 2 <= kept["px"][1] <= gt_side * 2  # a quarter of the kept boxes are at most object size
    auto_recall, paper_recall = store_recall(auto, scenes["val"]), store_recall(paper, scenes["val"])
    assert auto_recall.kept > paper_recall.kept + 0.1
    assert auto_recall.raw >= auto_recall.kept and paper_recall.raw >= paper_recall.kept


def test_info_coco_prints_recall(scenes, scene_stores, capsys, tmp_path):
    store = scene_stores["paper"]
    assert main(["proposals", "info", str(store.path), "--coco", str(scenes["val"])]) == 0
    out = capsys.readouterr().out
    rec = store_recall(store, scenes["val"])
    assert f"kept {rec.kept:.3f}, raw {rec.raw:.3f}" in out and "8 images matched by basename" in out
    assert "box side sqrt(w*h)" in out and "kept" in out
    # the store's own kept boxes as the ground truth: every one is found, every kept box covers one
    assert main(["proposals", "export", str(store.path), "--format", "coco", "-o", str(tmp_path / "own.json")]) == 0
    own = store_recall(store, tmp_path / "own.json")
    assert own.kept == 1.0 and own.kept_precision == 1.0 and own.gt_boxes == store.summary["boxes_total"]


def _small_object_tiles(folder, n=3, side=360, cell=20):
    """Aerial-like tiles: 20-px fields in different colours, each with one 13-px disc (a "crown")."""
    folder.mkdir()
    for k in range(n):
        rng = np.random.default_rng(k)
        fields = rng.integers(60, 200, (side // cell, side // cell, 3)).repeat(cell, 0).repeat(cell, 1)
        tile = fields + rng.normal(0, 6, (side, side, 3))
        yy, xx = np.mgrid[:side, :side]
        for cy in range(cell // 2, side, cell):
            for cx in range(cell // 2, side, cell):
                disc = (yy - cy - rng.integers(-2, 3)) ** 2 + (xx - cx - rng.integers(-2, 3)) ** 2 <= 42
                tile[disc] = rng.integers(0, 255, 3)
        Image.fromarray(np.clip(tile, 0, 255).astype(np.uint8)).save(folder / f"tile{k}.png")
    return folder


def test_large_box_warning_fires_on_small_objects_with_the_paper_filter_only(tmp_path, caplog, capsys):
    tiles = _small_object_tiles(tmp_path / "tiles")
    with caplog.at_level(logging.WARNING, logger="soco_det"):
        paper = ProposalStore.open(compute_store(tiles, tmp_path / "paper"))  # raw rects not kept: histogram
    assert any("far larger than the raw proposals" in r.getMessage() for r in caplog.records)
    sides = store_sides(paper)
    assert sides["raw"]["approx"] and sides["raw"]["rel"][2] < 0.1 and sides["kept"]["rel"][0] > 0.25
    assert main(["proposals", "info", str(paper.path)]) == 0
    assert "WARNING: the kept boxes are far larger" in capsys.readouterr().out

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="soco_det"):
        fitted = ProposalStore.open(compute_store(tiles, tmp_path / "fitted", object_size="14"))
    assert not any("far larger" in r.getMessage() for r in caplog.records)
    assert large_box_warning(store_sides(fitted)) is None
    assert fitted.meta["fit"]["filter"] == "size:5-42post" and fitted.meta["params"]["scale"] == 20
    assert main(["proposals", "info", str(fitted.path)]) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "fit: --object-size 14" in out


def test_cli_default_is_auto_and_explicit_filter_wins(tmp_path):
    _write_image(tmp_path / "a.png", size=(96, 80))
    images = tmp_path / "img"
    images.mkdir()
    (tmp_path / "a.png").rename(images / "a.png")
    assert main(["proposals", str(images), "-o", str(tmp_path / "s"), "--workers", "1"]) == 0
    store = ProposalStore.open(tmp_path / "s")
    assert store.meta["fit"]["hint"] == "auto" and store.meta["filter"] == store.meta["fit"]["filter"]
    argv = ["proposals", str(images), "-o", str(tmp_path / "t"), "--workers", "1", "--filter", "size:8-", "--param"]
    assert main([*argv, "scale=77"]) == 0
    explicit = ProposalStore.open(tmp_path / "t")
    assert explicit.meta["filter"] == "size:8-" and explicit.meta["params"]["scale"] == 77
    assert explicit.meta["fit"]["explicit"] == ["filter", "scale"]


def test_shards_fit_the_same_settings_and_merge_keeps_the_fit(scenes, tmp_path, caplog):
    from soco_det.proposals import merge_stores

    images = scenes["images"] / "val"
    shards = [compute_store(images, tmp_path / f"s{k}", object_size="auto", shard=f"{k}/2") for k in (0, 1)]
    metas = [ProposalStore.open(s).meta for s in shards]
    assert metas[0]["params"] == metas[1]["params"] and metas[0]["filter"] == metas[1]["filter"]
    merged = ProposalStore.open(merge_stores(shards, tmp_path / "merged"))
    assert len(merged) == 8 and merged.meta["fit"] == metas[0]["fit"]
    # a rerun of a finished store with the same hint is a no-op (the fit gives the same settings)
    compute_store(images, tmp_path / "whole", object_size="auto")
    with caplog.at_level(logging.INFO, logger="soco_det"):
        compute_store(images, tmp_path / "whole", object_size="auto")
    assert any("already complete" in r.getMessage() for r in caplog.records)
