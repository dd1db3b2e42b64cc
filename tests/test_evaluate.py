"""COCO evaluation: agreement with pycocotools run directly, perfect predictions, category ids, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from skimage import data as skdata
from torch import nn

from soco_det.errors import UserError
from soco_det.transfer import evaluate
from soco_det.transfer.coco_data import CocoInstances, load_coco
from soco_det.transfer.evaluation import METRIC_NAMES, coco_metrics

# pycocotools 2.0 with NumPy 2 warns on every mask decode; it is harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CAT_IDS = (3, 7, 11)  # deliberately non-contiguous


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _ellipse_mask(h: int, w: int, box: tuple[float, float, float, float]) -> np.ndarray:
    x1, y1, x2, y2 = box
    yy, xx = np.mgrid[:h, :w] + 0.5
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)


@pytest.fixture(scope="module")
def gt_dataset(tmp_path_factory):
    """Two real photos (scikit-image) with hand-placed objects of categories 3, 7 and 11.

    Each mask is an ellipse and its box is the mask's exact extent (pycocotools' toBbox)."""
    root = tmp_path_factory.mktemp("gt")
    (root / "images").mkdir()
    photos = [skdata.astronaut(), skdata.chelsea()]
    objects = [  # (image index, category id, box x1 y1 x2 y2 in pixels)
        (0, 3, (10, 12, 60, 70)),
        (0, 7, (70, 20, 120, 50)),
        (0, 11, (30, 80, 90, 110)),
        (1, 3, (5, 5, 45, 40)),
        (1, 11, (60, 30, 110, 90)),
        (1, 7, (20, 60, 50, 95)),
    ]
    images, annotations = [], []
    for i, photo in enumerate(photos):
        img = Image.fromarray(photo).resize((128, 120))
        img.save(root / "images" / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": 128, "height": 120})
    for k, (i, cat, box) in enumerate(objects):
        mask = _ellipse_mask(120, 128, box)
        rle = mask_utils.encode(np.asfortranarray(mask))
        annotations.append({
            "id": k + 1, "image_id": 100 + i, "category_id": cat, "iscrowd": 0,
            "segmentation": _rle(mask), "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        })
    categories = [{"id": c, "name": f"class{c}"} for c in (11, 3, 7)]  # file order differs from id order
    path = root / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, root / "images"


def _pycocotools_stats(gt_json, results, iou_type):
    gt = COCO(str(gt_json))
    ev = COCOeval(gt, gt.loadRes(results), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats[:6]


def _handmade_detections(gt_json):
    """Detections with known overlaps: exact, shifted (IoU ~0.6: counts at 0.5, not at 0.75),
    wrong class, a confident false positive and one missed object."""
    gt = json.loads(gt_json.read_text())
    anns = gt["annotations"]
    dets = []

    def add(ann, dx, score, cat=None):
        x, y, w, h = ann["bbox"]
        box = (x + dx, y, x + dx + w, y + h)
        mask = _ellipse_mask(120, 128, box)
        dets.append({"image_id": ann["image_id"], "category_id": cat or ann["category_id"], "bbox": [x + dx, y, w, h],
                     "segmentation": _rle(mask), "score": score})

    add(anns[0], 0, 0.9)                    # exact
    add(anns[1], 0.25 * anns[1]["bbox"][2], 0.8)  # shifted by a quarter of its width: IoU 0.6
    add(anns[2], 0, 0.3, cat=3)             # right place, wrong class
    add(anns[3], 2, 0.95)                   # nearly exact
    add(anns[4], 0.25 * anns[4]["bbox"][2], 0.4)
    add(anns[3], 60, 0.99)                  # confident false positive (nothing there of class 3)
    # anns[5] (class 7 in image 101) is missed
    return dets


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_metrics_match_pycocotools_run_directly(gt_dataset, iou_type):
    gt_json, _ = gt_dataset
    dets = _handmade_detections(gt_json)
    ours = coco_metrics(load_coco(gt_json), [{k: v for k, v in d.items() if iou_type == "segm" or k != "segmentation"} for d in dets], iou_type)
    direct = _pycocotools_stats(gt_json, [{k: v for k, v in d.items() if iou_type == "segm" or k != "segmentation"} for d in dets], iou_type)
    for name, value in zip(METRIC_NAMES, direct):
        assert ours[name] == (pytest.approx(float(value)) if value >= 0 else None), name
    # The set is not degenerate: shifted matches count at IoU 0.5 but not 0.75, so AP50 > AP75 > 0.
    assert ours["AP50"] > ours["AP75"] > 0
    assert ours["AP"] < 1


class OracleModel(nn.Module):
    """Returns each image's ground truth as predictions (score 1), with labels through ``label_of``;
    images are answered in the order the evaluator visits them."""

    def __init__(self, dataset: CocoInstances, label_of=lambda label: label) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the evaluator a device
        self.targets = [dataset.target(i) for i in range(len(dataset))]
        self.calls = 0
        self.label_of = label_of

    def forward(self, images):
        outputs = []
        for image in images:
            t = self.targets[self.calls]
            self.calls += 1
            assert image.shape[-2:] == t["masks"].shape[-2:]  # evaluated at the original size
            outputs.append({
                "boxes": t["boxes"], "labels": torch.tensor([self.label_of(int(v)) for v in t["labels"]], dtype=torch.int64),
                "scores": torch.ones(len(t["labels"])), "masks": t["masks"][:, None].float() * 0.9,
            })
        return outputs


def test_perfect_predictions_score_one_and_keep_category_ids(gt_dataset, tmp_path):
    gt_json, images = gt_dataset
    dataset = CocoInstances(gt_json, images)
    assert dataset.cat_ids == list(CAT_IDS)
    metrics = evaluate(OracleModel(dataset), gt_json, images, tmp_path, show_progress=False)
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75"):
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name)
    results = json.loads((tmp_path / "segm_results.json").read_text())
    assert sorted({r["category_id"] for r in results}) == list(CAT_IDS)
    assert {r["image_id"] for r in results} == {100, 101}
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["bbox"]["AP"] == pytest.approx(1.0) and written["num_images"] == 2


def test_wrong_label_mapping_is_caught(gt_dataset):
    gt_json, images = gt_dataset
    dataset = CocoInstances(gt_json, images)
    # Labels rotated by one class: every box lands on another category id, so nothing matches.
    metrics = evaluate(OracleModel(dataset, label_of=lambda label: label % 3 + 1), gt_json, images, show_progress=False)
    assert metrics["bbox"]["AP"] == 0.0


def test_missing_image_is_named(gt_dataset, tmp_path):
    gt_json, _ = gt_dataset
    images = tmp_path / "images"
    images.mkdir()
    (images / "0.png").write_bytes((gt_dataset[1] / "0.png").read_bytes())  # 1.png is missing
    with pytest.raises(UserError, match=r"1\.png: image file not found \(referenced by .*val\.json\)"):
        CocoInstances(gt_json, images)


def test_bad_json_is_named(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(UserError, match=r"broken\.json: not valid JSON"):
        load_coco(bad)
    bad.write_text('{"annotations": []}')
    with pytest.raises(UserError, match=r"broken\.json: not a COCO instances file"):
        load_coco(bad)
