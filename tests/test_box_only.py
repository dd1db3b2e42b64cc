"""Box-only fine-tuning: annotations without segmentation train a Faster R-CNN scored on bbox AP.

The data are the sample scenes' COCO files with the segmentations removed (box-only) or removed
from some annotations (mixed, refused).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_finetune import tiny_finetune_argv

from soco_det.commands.main import main
from soco_det.errors import UserError
from soco_det.models.maskrcnn import build_maskrcnn
from soco_det.transfer.box_only import annotation_kind, has_mask_branch
from soco_det.transfer.coco_data import CocoInstances

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY = [
    "model.fpn_channels=64",
    "model.box_conv_dims=[64,64,64,64]",
    "model.box_fc_dims=[256]",
    "solver.iterations=6",
    "solver.steps=[5]",
    "solver.warmup_iters=2",
    "solver.batch_size=2",
    "model.roi_batch_size=16",
    "model.rpn_batch_size=64",
    "model.detections_per_img=10",
    "input.min_size_train=[112]",
    "input.max_size_train=200",
    "input.min_size_test=128",
    "input.max_size_test=200",
    "data.num_workers=0",
    "checkpoint_period=3",
    "log_period=3",
]


def _strip(src, dst, keep_every: int = 0):
    """``src`` COCO file without segmentations (all, or all but every ``keep_every``-th annotation)."""
    data = json.loads(src.read_text())
    for i, ann in enumerate(data["annotations"]):
        if not keep_every or i % keep_every:
            ann.pop("segmentation", None)
    dst.write_text(json.dumps(data))
    return dst, data


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    import soco_det.synth as synth

    root = tmp_path_factory.mktemp("scenes")
    paths = synth.generate(root, n_unlabeled=0, n_train=4, n_val=2, short_side=112, seed=5)
    paths["train_boxes"], _ = _strip(paths["train"], root / "train_boxes.json")
    paths["val_boxes"], _ = _strip(paths["val"], root / "val_boxes.json")
    return paths


def test_annotation_kind_and_the_mixed_set_message(scenes, tmp_path):
    assert annotation_kind(CocoInstances(scenes["train"], scenes["images"])) == "masks"
    assert annotation_kind(CocoInstances(scenes["train_boxes"], scenes["images"])) == "boxes"
    mixed, data = _strip(scenes["train"], tmp_path / "mixed.json", keep_every=3)
    n = len(data["annotations"])
    with_seg = sum(1 for a in data["annotations"] if "segmentation" in a)
    assert 0 < with_seg < n
    with pytest.raises(
        UserError, match=rf"{with_seg} of {n} annotations have a segmentation and {n - with_seg} have none"
    ):
        annotation_kind(CocoInstances(mixed, scenes["images"]))


def test_settings_reach_torchvisions_constructor_for_both_detectors():
    for masks in (True, False):
        model = build_maskrcnn(
            18,
            4,
            min_size_test=320,
            max_size_test=512,
            roi_batch_size=64,
            rpn_batch_size=32,
            rpn_pre_nms_top_n=(600, 300),
            rpn_post_nms_top_n=(500, 200),
            detections_per_img=17,
            score_thresh=0.3,
            fpn_channels=32,
            box_conv_dims=(32,) * 4,
            box_fc_dims=(64,),
            masks=masks,
        )
        model.train()
        assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (600, 500)
        model.eval()
        assert (model.rpn.pre_nms_top_n(), model.rpn.post_nms_top_n()) == (300, 200)
        assert model.rpn.fg_bg_sampler.batch_size_per_image == 32
        assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
        assert (model.roi_heads.detections_per_img, model.roi_heads.score_thresh) == (17, 0.3)
        assert (model.transform.min_size, model.transform.max_size) == ((320,), 512)


def test_box_only_detector_is_the_mask_rcnn_without_its_mask_branch():
    full = build_maskrcnn(18, 4, fpn_channels=32, box_conv_dims=(32,) * 4, box_fc_dims=(64,))
    boxes = build_maskrcnn(18, 4, fpn_channels=32, box_conv_dims=(32,) * 4, box_fc_dims=(64,), masks=False)
    assert has_mask_branch(full) and not has_mask_branch(boxes)
    shapes = {k: v.shape for k, v in boxes.state_dict().items()}
    mask_keys = {k for k in full.state_dict() if k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor."))}
    assert mask_keys and shapes == {k: v.shape for k, v in full.state_dict().items() if k not in mask_keys}


@pytest.mark.slow  # ~20 s on an idle core
def test_box_only_finetune_trains_a_faster_rcnn_and_reports_bbox_ap_only(scenes, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    # this file's TINY (6 iterations) after test_finetune's, whose keys it all overrides
    argv = tiny_finetune_argv(scenes, out, *TINY, train=scenes["train_boxes"], val=scenes["val_boxes"])
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train and all("loss_mask" not in r for r in train)
    assert all(math.isfinite(r["loss_box_reg"]) for r in train)
    final = json.loads((out / "metrics.json").read_text())
    assert set(final) == {"bbox", "num_images"} and set(final["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert not has_mask_branch(ckpt["model"]) and "roi_heads.box_head.5.weight" in ckpt["model"]
    # `soco-det evaluate` rebuilds the box-only model from the checkpoint and scores boxes only,
    # also on a val file that has masks.
    ev = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--json",
                str(scenes["val"]),
                "--images",
                str(scenes["images"]),
                "-o",
                str(ev),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    again = json.loads((ev / "metrics.json").read_text())
    assert set(again) == {"bbox", "num_images"}
    assert not (ev / "segm_results.json").exists()
