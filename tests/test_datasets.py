"""soco_det.datasets: the real nuclei set read from PyPI's stardist files, and the scenes wrapper."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from soco_det import datasets, synth
from soco_det.datasets import nuclei
from soco_det.datasets.tiles import to_uint8
from soco_det.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def source():
    image, labels, _ = nuclei.read_source()
    return image, labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    return datasets.prepare("nuclei", tmp_path_factory.mktemp("nuclei"), tile=128)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_source_is_a_real_label_image_of_many_small_objects(source):
    image, labels = source
    assert image.shape == labels.shape == (512, 512)
    assert image.std() > 5  # a photograph, not a constant
    ids = np.unique(labels)[1:]
    assert len(ids) > 100
    # the nuclei are brighter than the background around them
    assert image[labels > 0].mean() > 2 * image[labels == 0].mean()


def test_prepare_writes_coco_that_pycocotools_loads(prepared):
    assert set(prepared) == {"images", "unlabeled", "train", "val"}
    for split in ("train", "val"):
        coco = COCO(str(prepared[split]))
        assert coco.getCatIds() == [1] and coco.loadCats(1)[0]["name"] == "nucleus"
        assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) >= 20
        for image in coco.loadImgs(coco.getImgIds()):
            assert Image.open(prepared["images"] / image["file_name"]).size == (image["width"], image["height"])
    unlabeled = json.loads(prepared["unlabeled"].read_text())
    assert len(unlabeled["images"]) == 8 and unlabeled["annotations"] == []


def test_pixels_are_the_source_image_stretched(prepared, source):
    pixels = to_uint8(source[0])
    for split in ("unlabeled", "val"):
        for record in json.loads(prepared[split].read_text())["images"]:
            x, y = record["origin"]
            tile = np.asarray(Image.open(prepared["images"] / record["file_name"]))
            np.testing.assert_array_equal(tile, pixels[y : y + 128, x : x + 128])


def _extent(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def test_masks_and_boxes_are_the_label_image_objects(prepared, source):
    labels = source[1]
    for split in ("train", "val"):
        coco = COCO(str(prepared[split]))
        for image in coco.loadImgs(coco.getImgIds()):
            x, y = image["origin"]
            crop = labels[y : y + 128, x : x + 128]
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            expected = {v for v in np.unique(crop)[1:] if (crop == v).sum() >= nuclei.DEFAULT_MIN_AREA}
            assert sorted(a["label"] for a in anns) == sorted(expected)
            for ann in anns:
                truth = crop == ann["label"]
                np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), truth)
                assert ann["bbox"] == _extent(truth)
                assert ann["area"] == truth.sum() == mask_utils.area(ann["segmentation"])


@pytest.mark.parametrize("stride", [None, 48])
def test_splits_are_disjoint_in_pixels(tmp_path, stride):
    paths = datasets.prepare("nuclei", tmp_path, tile=96, stride=stride)
    covered = {}
    for split in ("unlabeled", "train", "val"):
        area = np.zeros((512, 512), dtype=bool)
        for record in json.loads(paths[split].read_text())["images"]:
            x, y = record["origin"]
            area[y : y + 96, x : x + 96] = True
        covered[split] = area
    assert not (covered["unlabeled"] & covered["train"]).any()
    assert not (covered["unlabeled"] & covered["val"]).any()
    assert not (covered["train"] & covered["val"]).any()
    if stride is not None:  # overlapping tiles inside a split: more tiles than without overlap
        assert len(json.loads(paths["train"].read_text())["images"]) > 4


def test_same_arguments_same_bytes(tmp_path, prepared):
    again = datasets.prepare("nuclei", tmp_path / "again", tile=128)
    first = _files(prepared["images"].parent)
    assert first == _files(again["images"].parent) and len(first) == 16 + 3


def test_scenes_are_synth_generate_with_the_cpu_benchmark_sizes(tmp_path):
    args = {"n_unlabeled": 2, "n_train": 2, "n_val": 1, "short_side": 64, "seed": 3}
    ours = datasets.prepare("scenes", tmp_path / "a", **args)
    theirs = synth.generate(tmp_path / "b", **args)
    assert set(ours) == set(theirs)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    spec = importlib.util.spec_from_file_location("transfer_benchmark", ROOT / "benchmarks" / "transfer.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    defaults = {k: v for k, v in datasets.scenes.DEFAULTS.items() if k != "seed"}
    assert defaults == benchmark.PRESETS["cpu"]["scenes"]


def test_bad_requests_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown data set 'coco'"):
        datasets.prepare("coco", tmp_path)
    with pytest.raises(UserError, match="takes no option tile; its options: n_unlabeled"):
        datasets.prepare("scenes", tmp_path, tile=64)
    with pytest.raises(UserError, match="--tile must be an integer in 32..256"):
        datasets.prepare("nuclei", tmp_path, tile=300)
    with pytest.raises(UserError, match="--stride must be"):
        datasets.prepare("nuclei", tmp_path, tile=64, stride=65)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        datasets.prepare("nuclei", tmp_path / "file")


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(nuclei, "PACKAGE", "stardist_not_installed_here")
    with pytest.raises(UserError, match="pip install stardist_not_installed_here"):
        datasets.prepare("nuclei", tmp_path)


def test_cli_prints_the_numbers(tmp_path, capsys):
    from soco_det.commands.main import main

    assert main(["prepare", "nuclei", "-o", str(tmp_path), "--tile", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "unlabeled: 2 images"
    assert lines[1].startswith("train: 1 image, ") and " objects (" in lines[1] and "median side" in lines[1]
    assert main(["prepare", "scenes", "-o", str(tmp_path / "s"), "--stride", "3"]) == 2
