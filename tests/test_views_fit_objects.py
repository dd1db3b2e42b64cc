"""Views that fit the objects (docs/method.md 2.9): the per-view level report, the warning about
tiny boxes, and the ``geometry.fit_objects`` rule, on real photographs and real sample scenes with
real selective-search proposals."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
from _views_data import photo_store

from soco_det.commands.main import main
from soco_det.data import boxes as B
from soco_det.data import view_report
from soco_det.data.config import RECIPES, DataConfig, ViewGeometry, ViewLevels, ViewsConfig
from soco_det.data.crops import object_region
from soco_det.data.dataset import build_pretrain_dataset
from soco_det.data.sampler import ViewSampler
from soco_det.data.view_report import TINY_SIDE, dataset_view_report, tiny_box_warnings, warn_tiny_boxes

TINY_CPU_VIEWS = dict(view_sizes=[64, 64, 32])
TINY_CPU_LEVELS = ViewLevels(level_thresholds=[14.0, 27.0, 55.0, 64.0])


@pytest.fixture(scope="module")
def small_objects(tmp_path_factory):
    """``(images, store)``: 12 sample scenes of 256 px with every selective-search rect kept (``raw``):
    the small boxes of a domain the paper filter would drop."""
    from soco_det import api

    root = tmp_path_factory.mktemp("fit_objects")
    paths = api.synth(root / "scenes", unlabeled=12, train=0, val=0, size=256)
    images = paths.images / "unlabeled"
    store = api.proposals(images, root / "store", workers=1, filter="raw").path
    return images, store


def _dataset(images, store, views: ViewsConfig):
    return build_pretrain_dataset(DataConfig(images=str(images), proposals=str(store), views=views), seed=3)


def _tiny_cpu(fit: bool) -> ViewsConfig:
    return ViewsConfig(geometry=ViewGeometry(**TINY_CPU_VIEWS, fit_objects=fit), levels=TINY_CPU_LEVELS)


def _fit(views: ViewsConfig) -> ViewsConfig:
    return dataclasses.replace(views, geometry=dataclasses.replace(views.geometry, fit_objects=True))


def _first_level(size: float, thresholds: list[float]) -> int:
    """The level rule of docs/method.md 2.7 written out: the first threshold the size does not exceed."""
    for level, bound in enumerate(thresholds):
        if size <= bound:
            return level
    return len(thresholds)  # the report's "none" column


def test_report_sums_to_100_and_matches_levels_from_the_decoded_samples():
    images, store = photo_store()
    dataset = _dataset(images, store, ViewsConfig(recipe="soco_fpn"))
    report = dataset_view_report(dataset, num_images=8)
    assert report.samples == 8 and [s.size for s in report.views] == [224, 224, 112]
    thresholds = [48.0, 96.0, 192.0, 224.0]
    counts = np.zeros((3, 5), np.int64)
    sides: list[list[float]] = [[], [], []]
    for index in range(8):
        # the full sample, pixels decoded, from the generator the dataset seeds it with
        sample, used, _ = dataset.views(index)
        assert used == index
        for p, pair in enumerate(sample.pairs):
            if sample.fallback[p]:
                continue
            for side, view in enumerate(pair):
                rows = len(sample.ids[p][side]) - sample.padded[p][side]
                pixel = sample.boxes[p][side][:rows].astype(np.float64) * sample.images[view].shape[-1]
                for size in np.sqrt((pixel[:, 2] - pixel[:, 0]) * (pixel[:, 3] - pixel[:, 1])):
                    counts[view, _first_level(size, thresholds)] += 1
                    sides[view].append(size)
    for v, stats in enumerate(report.views):
        np.testing.assert_array_equal(stats.counts, counts[v])
        assert stats.percent.sum() == pytest.approx(100.0)
        assert stats.median_side == pytest.approx(np.median(sides[v]), rel=1e-5)
        assert stats.tiny == sum(s < TINY_SIDE for s in sides[v])
    # photographs with the paper filter: V1's boxes where the paper has them, on P3/P4
    assert report.views[0].percent[1:3].sum() > 80.0
    assert report.views[0].percent[0] < 5.0


def test_warning_fires_for_tiny_boxes_once_and_not_for_paper_sized_ones(small_objects, monkeypatch):
    images, store = photo_store()
    assert warn_tiny_boxes(_dataset(images, store, ViewsConfig(recipe="soco_fpn"))) == []

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    monkeypatch.setattr(view_report, "_WARNED", set())
    view_report.log.addHandler(handler)
    try:
        # 16/16/8-px views: the scenes' raw boxes shrink to a few pixels
        tiny = ViewsConfig(geometry=ViewGeometry(view_sizes=[16, 16, 8]))
        for _ in range(2):  # built twice (as pretraining does for its views picture): logged once
            dataset = _dataset(*small_objects, tiny)
    finally:
        view_report.log.removeHandler(handler)
    messages = tiny_box_warnings(dataset_view_report(dataset, 32), where=f"{small_objects[1]}: ")
    assert messages and any("V3 (8 px)" in m for m in messages)
    assert [r.getMessage() for r in records] == messages
    assert all(m.startswith(str(small_objects[1])) and "data.views.geometry.fit_objects=true" in m for m in messages)
    # with the fit rule already on, the remedy left is larger views
    fitted = tiny_box_warnings(dataset_view_report(_dataset(*small_objects, _fit(tiny)), 32))
    assert fitted and all("fit_objects" not in m and "view_sizes" in m for m in fitted)


def test_fit_rule_moves_boxes_off_the_tiny_bucket(small_objects):
    plain = dataset_view_report(_dataset(*small_objects, _tiny_cpu(False)), 12, epochs=8)
    fit = dataset_view_report(_dataset(*small_objects, _tiny_cpu(True)), 12, epochs=8)
    assert fit.fit_objects and not plain.fit_objects
    for before, after in zip(plain.views, fit.views):
        assert after.boxes >= 0.9 * before.boxes
        assert after.tiny_share < before.tiny_share
        assert after.median_side > before.median_side
    assert fit.views[2].tiny_share <= 0.6 * plain.views[2].tiny_share
    # V1's boxes move off P2 towards the paper's P3/P4
    assert fit.views[0].percent[0] < 0.5 * plain.views[0].percent[0]
    assert fit.views[0].percent[1:3].sum() > plain.views[0].percent[1:3].sum()


def test_fit_geometry_lies_inside_an_object_region(small_objects):
    dataset = _dataset(*small_objects, _tiny_cpu(True))
    regions = 0
    for index in range(len(dataset)):
        size, rects = dataset.geometry_inputs(index)
        geo = dataset.sampler.geometry(size, rects, np.random.default_rng([3, 0, index]))
        if geo.region is None:
            continue
        regions += 1
        top, left, h, w = geo.region
        assert geo.crops[0] == geo.region and 0 <= left and left + w <= size[0] and top + h <= size[1]
        for crop in geo.crops[1:]:
            assert top <= crop[0] and crop[0] + crop[2] <= top + h and left <= crop[1] and crop[1] + crop[3] <= left + w
        for p, (_, v) in enumerate(dataset.sampler.pairs):  # every box maps back into the region
            for side, view in enumerate((0, v)):
                back = B.to_original(geo.norm[p][side], geo.crops[view], geo.flips[view])
                assert (back[:, :2] >= [left - 1e-6, top - 1e-6]).all()
                assert (back[:, 2:] <= [left + w + 1e-6, top + h + 1e-6]).all()
    assert regions >= len(dataset) // 2


def test_object_region_is_sized_by_the_box_and_holds_its_centre():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y = rng.uniform(0, 450, 2)
        box = np.array([x, y, x + rng.uniform(14, 50), y + rng.uniform(14, 50)])
        top, left, h, w = object_region(500, 500, box, 0.43, rng)
        side = round(max(np.sqrt((box[2] - box[0]) * (box[3] - box[1])) / 0.43, 32))
        assert (w, h) == (min(side, 500), min(side, 500))
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        assert left <= cx <= left + w and top <= cy <= top + h
    # a box already paper-sized in the whole image: no region, and nothing drawn
    state = rng.bit_generator.state
    assert object_region(300, 200, np.array([0.0, 0.0, 250.0, 180.0]), 0.43, rng) is None
    assert rng.bit_generator.state == state


@pytest.mark.parametrize("recipe", RECIPES)
def test_paper_recipes_are_unchanged(recipe):
    assert ViewsConfig(recipe=recipe).resolved().geometry.fit_objects is False
    width, height = 500, 375
    rects = np.array([[20, 30, 60, 40], [200, 100, 30, 35], [300, 200, 150, 120]], np.int32)
    off = ViewsConfig(recipe=recipe, geometry=ViewGeometry(fit_objects=False))
    on = ViewsConfig(recipe=recipe, geometry=ViewGeometry(fit_objects=True))
    for seed in range(3):
        a = ViewSampler(ViewsConfig(recipe=recipe)).geometry((width, height), rects, np.random.default_rng(seed))
        b = ViewSampler(off).geometry((width, height), rects, np.random.default_rng(seed))
        c = ViewSampler(on).geometry((width, height), rects, np.random.default_rng(seed))
        assert a.crops == b.crops and a.flips == b.flips and a.region is None
        for p in range(len(a.ids)):
            for side in (0, 1):
                np.testing.assert_array_equal(a.norm[p][side], b.norm[p][side])
                np.testing.assert_array_equal(a.levels[p][side], b.levels[p][side])
                np.testing.assert_array_equal(a.ids[p][side], b.ids[p][side])
        assert c.region is not None and c.crops != a.crops  # the option does change the views


def test_views_report_command(small_objects, tmp_path, capsys):
    images, store = small_objects
    out = tmp_path / "report.json"
    args = ["views", "report", "--proposals", str(store), "--images", str(images), "--recipe", "tiny_cpu", "-n", "6"]
    assert main([*args, "--json", str(out), "data.views.geometry.fit_objects=true"]) == 0
    text = capsys.readouterr().out
    assert "fit_objects" in text and "paper: the official sampler" in text and "< 8 px" in text
    data = json.loads(out.read_text())
    assert (
        data["fit_objects"] is True
        and data["samples"] == 6
        and [v["view"] for v in data["views"]] == ["V1", "V2", "V3"]
    )
    for view in data["views"]:
        assert sum(view["levels_percent"].values()) == pytest.approx(100.0, abs=0.05)
    assert main([*args, "data.views.geometry.fit_box_side=1.5"]) == 2
    assert "fit_box_side" in capsys.readouterr().err
