"""COCO evaluation: AP worked out by hand, agreement with pycocotools run directly, perfect predictions,
category ids, bad input."""

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
from soco_det.transfer.evaluation import METRIC_NAMES, coco_metrics, to_coco_results

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
        annotations.append(
            {
                "id": k + 1,
                "image_id": 100 + i,
                "category_id": cat,
                "iscrowd": 0,
                "segmentation": _rle(mask),
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            }
        )
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
        dets.append(
            {
                "image_id": ann["image_id"],
                "category_id": cat or ann["category_id"],
                "bbox": [x + dx, y, w, h],
                "segmentation": _rle(mask),
                "score": score,
            }
        )

    add(anns[0], 0, 0.9)  # exact
    add(anns[1], 0.25 * anns[1]["bbox"][2], 0.8)  # shifted by a quarter of its width: IoU 0.6
    add(anns[2], 0, 0.3, cat=3)  # right place, wrong class
    add(anns[3], 2, 0.95)  # nearly exact
    add(anns[4], 0.25 * anns[4]["bbox"][2], 0.4)
    add(anns[3], 60, 0.99)  # confident false positive (nothing there of class 3)
    # anns[5] (class 7 in image 101) is missed
    return dets


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_metrics_match_pycocotools_run_directly(gt_dataset, iou_type):
    gt_json, _ = gt_dataset
    dets = _handmade_detections(gt_json)
    ours = coco_metrics(
        load_coco(gt_json),
        [{k: v for k, v in d.items() if iou_type == "segm" or k != "segmentation"} for d in dets],
        iou_type,
    )
    direct = _pycocotools_stats(
        gt_json, [{k: v for k, v in d.items() if iou_type == "segm" or k != "segmentation"} for d in dets], iou_type
    )
    for name, value in zip(METRIC_NAMES, direct):
        assert ours[name] == (pytest.approx(float(value)) if value >= 0 else None), name
    # The set is not degenerate: shifted matches count at IoU 0.5 but not 0.75, so AP50 > AP75 > 0.
    assert ours["AP50"] > ours["AP75"] > 0
    assert ours["AP"] < 1


def interpolated_ap(ranked_tp: list[bool], n_gt: int) -> float:
    """COCO's 101-point AP of one category at one IoU threshold, from the detections' TP/FP flags
    in score order: the mean over recall r in 0, 0.01, .., 1 of the best precision at recall >= r
    (0 where that recall is never reached)."""
    tp = np.cumsum(ranked_tp)
    recall, precision = tp / n_gt, tp / np.arange(1, len(tp) + 1)
    return float(
        np.mean([max((p for p, rc in zip(precision, recall) if rc >= r), default=0.0) for r in np.linspace(0, 1, 101)])
    )


def test_ap_of_known_matches_equals_the_hand_computed_value(tmp_path):
    # One 200 x 200 image; labels 1, 2, 3 are category ids 5, 9, 12 (12 has no ground truth, so
    # COCO leaves it out of the mean). Box IoUs are chosen away from the 0.5:0.05:0.95 thresholds.
    gt_boxes = {5: [(0, 0, 100, 100), (120, 120, 180, 180), (120, 0, 190, 50)], 9: [(20, 120, 80, 180)]}
    anns = [
        {
            "id": k + 1,
            "image_id": 1,
            "category_id": cat,
            "iscrowd": 0,
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float((x2 - x1) * (y2 - y1)),
        }
        for k, (cat, (x1, y1, x2, y2)) in enumerate((c, b) for c, bs in gt_boxes.items() for b in bs)
    ]
    gt_json = tmp_path / "gt.json"
    gt_json.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.png", "width": 200, "height": 200}],
                "annotations": anns,
                "categories": [{"id": c, "name": str(c)} for c in (5, 9, 12)],
            }
        )
    )
    predictions = [  # (label, score, box): what each one matches
        (1, 0.9, (0, 0, 100, 100)),  # GT 5a exactly: TP at every threshold
        (1, 0.8, (0, 150, 40, 190)),  # nothing there: FP
        (1, 0.7, (132, 120, 192, 180)),  # GT 5b shifted by 12 of 60: IoU 48/72 = 2/3, TP up to 0.65
        (1, 0.6, (0, 0, 100, 100)),  # GT 5a again: a duplicate, FP
        (2, 0.99, (0, 0, 100, 100)),  # no class-9 object there: FP ranked first
        (2, 0.95, (26, 120, 86, 180)),  # GT 9 shifted by 6 of 60: IoU 54/66 = 0.818, TP up to 0.8
        (3, 0.5, (10, 10, 50, 50)),  # category 12: no ground truth anywhere, ignored
    ]  # GT 5c is missed
    output = {
        "boxes": torch.tensor([p[2] for p in predictions], dtype=torch.float32),
        "scores": torch.tensor([p[1] for p in predictions]),
        "labels": torch.tensor([p[0] for p in predictions]),
    }
    bbox, segm = to_coco_results(output, image_id=1, cat_ids=[5, 9, 12])
    assert segm == [] and [r["category_id"] for r in bbox] == [5, 5, 5, 5, 9, 9, 12]
    assert bbox[2]["bbox"] == [132.0, 120.0, 60.0, 60.0]

    thresholds = np.linspace(0.5, 0.95, 10)
    ap_5 = [interpolated_ap([True, False, t < 2 / 3, False], n_gt=3) for t in thresholds]
    ap_9 = [interpolated_ap([False, t < 54 / 66], n_gt=1) for t in thresholds]
    # By hand: class 5 reaches recall 1/3 at precision 1 and, up to IoU 0.65, recall 2/3 at
    # precision 2/3 -> (34 + 33 * 2/3) / 101 = 56/101, else 34/101. Class 9: precision 1/2 at every
    # recall up to IoU 0.8, else nothing.
    assert ap_5 == pytest.approx([56 / 101] * 4 + [34 / 101] * 6)
    assert ap_9 == pytest.approx([0.5] * 7 + [0.0] * 3)
    metrics = coco_metrics(load_coco(gt_json), bbox, "bbox")
    assert metrics["AP"] == pytest.approx((4 * 56 / 101 + 6 * 34 / 101 + 7 * 0.5) / 20)
    assert metrics["AP50"] == pytest.approx((56 / 101 + 0.5) / 2)
    assert metrics["AP75"] == pytest.approx((34 / 101 + 0.5) / 2)
    assert metrics["APs"] is None  # no ground truth smaller than 32 x 32


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
            outputs.append(
                {
                    "boxes": t["boxes"],
                    "labels": torch.tensor([self.label_of(int(v)) for v in t["labels"]], dtype=torch.int64),
                    "scores": torch.ones(len(t["labels"])),
                    "masks": t["masks"][:, None].float() * 0.9,
                }
            )
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
