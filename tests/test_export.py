"""Exporters: every output loads into (or names exactly the keys of) the real target framework.

Real parts only: the real SoCo model (``soco_det.models.build_model``), torchvision's Mask R-CNN v2,
timm's ResNet, a photo from scikit-image. detectron2 and mmdetection cannot be installed here, so
their exports are compared with the exact key sets of their models, enumerated below from their
module code (detectron2 ``modeling/backbone/resnet.py``, ``fpn.py``, ``roi_heads/box_head.py``,
``roi_heads.py``::Res5ROIHeads; mmdetection ``ResNet``, ``FPN`` and ``ConvFCBBoxHead`` with
``ConvModule``), independently of the exporters' renaming code.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from soco_det.commands.main import main
from soco_det.errors import UserError
from soco_det.export import export, export_checkpoint
from soco_det.models import ModelConfig, build_model
from soco_det.models.maskrcnn import build_maskrcnn_v2

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}
SMALL = dict(proj_hidden_dim=64, proj_dim=32)  # the MLPs are not exported: keep them tiny
# R18 with narrow FPN / head (also exercises exports of non-default widths).
NARROW = dict(fpn_channels=64, head_conv_dim=64, head_fc_dim=128, **SMALL)

# The parts of torchvision's Mask R-CNN v2 that SoCo does not pretrain (num_batches_tracked
# left out: BatchNorm fills in a missing counter itself, so torch does not report it).
TV_NEW_KEYS = (
    {f"rpn.head.conv.{i}.0.{p}" for i in range(2) for p in ("weight", "bias")}
    | {f"rpn.head.{m}.{p}" for m in ("cls_logits", "bbox_pred") for p in ("weight", "bias")}
    | {f"roi_heads.box_predictor.{m}.{p}" for m in ("cls_score", "bbox_pred") for p in ("weight", "bias")}
    | {f"roi_heads.mask_head.{i}.0.weight" for i in range(4)}
    | {f"roi_heads.mask_head.{i}.1.{b}" for i in range(4) for b in BN[:4]}
    | {f"roi_heads.mask_predictor.{m}.{p}" for m in ("conv5_mask", "mask_fcn_logits") for p in ("weight", "bias")}
)


# ----------------------------------------------------------------------------- fixtures
def _randomise_bn(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine and running statistics, so eval-mode outputs test every tensor
    (the official init zeroes the last gamma of each block, which would hide a misplaced one)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean = 0.1 * torch.randn(n, generator=gen)
            m.running_var = 0.5 + torch.rand(n, generator=gen)
            m.num_batches_tracked.fill_(seed)


def _write_run(root: Path, cfg: ModelConfig, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A run folder with ``checkpoints/last.pt`` in the soco-det format; online != target."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    _randomise_bn(model.online, seed + 1)
    _randomise_bn(model.target, seed + 2)
    with torch.no_grad():  # a target that has drifted from the online network
        for p in model.target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = {
        "format": "soco-det/1",
        "model": model.state_dict(),
        "step": 7,
        "epoch": 1,
        "config": {"model": dataclasses.asdict(cfg)},
    }
    (root / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, root / "checkpoints" / "last.pt")
    return root, model.eval()


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("r18"), ModelConfig(depth=18, **NARROW), seed=0)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    return _write_run(tmp_path_factory.mktemp("r50"), ModelConfig(depth=50, **SMALL), seed=10)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """scikit-image's astronaut, 128x128, ImageNet-normalised: float32 [1, 3, 128, 128]."""
    from skimage import data
    from skimage.transform import resize

    img = resize(data.astronaut(), (128, 128), anti_aliasing=True).astype(np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


def _load_tv(model: torch.nn.Module, path: Path) -> set[str]:
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert result.unexpected_keys == []
    return {k for k in result.missing_keys if not k.endswith("num_batches_tracked")}


# ----------------------------------------------------------------------------- torchvision
def test_torchvision_r18_loads_with_exactly_the_new_parts_missing(r18, tmp_path, image):
    run, model = r18
    out = export_checkpoint(run, "torchvision", tmp_path / "tv.pth")
    tv = build_maskrcnn_v2(
        depth=18, num_classes=91, fpn_channels=64, box_conv_dims=(64,) * 4, box_fc_dims=(128,)
    ).eval()
    assert _load_tv(tv, out) == TV_NEW_KEYS

    # Same backbone + FPN features as the pretraining model (eval mode): P2..P5 = '0'..'3'.
    with torch.no_grad():
        ours = model.online["neck"](model.online["encoder"](image))
        theirs = tv.backbone(image)
    assert list(theirs) == ["0", "1", "2", "3", "pool"]
    for level, p in enumerate(ours):
        torch.testing.assert_close(theirs[str(level)], p, rtol=1e-4, atol=1e-5)

    # Box head: the same 4conv1fc output on the same RoI features.
    rois = torch.randn(3, 64, 7, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tv.roi_heads.box_head(rois), model.online["head"](rois), rtol=1e-4, atol=1e-5)


def test_torchvision_r50_loads_into_maskrcnn_resnet50_fpn_v2(r50, tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    run, model = r50
    out = export_checkpoint(run, "torchvision", tmp_path / "tv50.pth")
    tv = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    assert _load_tv(tv, out) == TV_NEW_KEYS
    # Values arrive unchanged (e.g. the last FPN output conv and the fc of the head).
    state = tv.state_dict()
    ours = model.state_dict()
    assert torch.equal(
        state["backbone.fpn.layer_blocks.3.1.running_var"], ours["online.neck.fpn_convs.3.bn.running_var"]
    )
    assert torch.equal(state["roi_heads.box_head.5.weight"], ours["online.head.fc1.weight"])
    assert torch.equal(state["backbone.body.layer4.2.bn3.weight"], ours["online.encoder.layer4.2.bn3.weight"])
    # build_maskrcnn_v2(50) is that same model (names and shapes), so fine-tuning code can use it for any depth.
    with torch.device("meta"):
        built = build_maskrcnn_v2(depth=50).state_dict()
    assert list(built) == list(state)
    assert all(built[k].shape == state[k].shape for k in state)


def test_the_torchvision_check_rejects_a_wrong_key_set(r18, tmp_path):
    from soco_det.export.torchvision import load_torchvision_export

    run, _ = r18
    state = torch.load(export_checkpoint(run, "torchvision", tmp_path / "tv.pth"), weights_only=True)
    with torch.device("meta"):  # names and shapes only
        model = build_maskrcnn_v2(18, fpn_channels=64, box_conv_dims=(64,) * 4, box_fc_dims=(128,))
    dropped = dict(state)
    del dropped["backbone.fpn.layer_blocks.2.0.weight"]
    with pytest.raises(UserError, match="missing but expected to load backbone.fpn.layer_blocks.2.0.weight"):
        load_torchvision_export(model, dropped, assign=True)
    renamed = dict(state)
    renamed["roi_heads.box_head.6.weight"] = renamed.pop("roi_heads.box_head.5.weight")
    with pytest.raises(UserError, match="unexpected keys roi_heads.box_head.6.weight"):
        load_torchvision_export(model, renamed, assign=True)
    with torch.device("meta"):
        wide = build_maskrcnn_v2(18)  # 256-channel FPN: the 64-channel export does not fit
    with pytest.raises(UserError, match="do not fit the model"):
        load_torchvision_export(wide, state, assign=True)


def test_a_resnet18_export_says_how_to_build_its_mask_and_faster_rcnn(r18, tmp_path, image):
    """torchvision has builders for ResNet-50 only: the export prints the build_maskrcnn_v2 call of its
    network, and both the Mask R-CNN and the Faster R-CNN built that way load it and run."""
    from soco_det.export.torchvision import load_torchvision_export

    run, _ = r18
    result = export(run, "torchvision", tmp_path / "tv18.pth")
    assert result.settings == dict(
        depth=18, fpn_channels=64, box_conv_dims=(64,) * 4, box_fc_dims=(128,), box_roi_size=7
    )
    assert "build_maskrcnn_v2(depth=18, num_classes=<classes + 1>, fpn_channels=64" in result.usage
    assert "masks=False: the Faster R-CNN" in result.usage and "(and its Faster R-CNN)" in result.check
    settings = dict(result.settings)
    depth = settings.pop("depth")
    boxes_new = {k for k in TV_NEW_KEYS if not k.startswith("roi_heads.mask_")}
    for masks, new in ((True, TV_NEW_KEYS), (False, boxes_new)):
        torch.manual_seed(0)
        model = build_maskrcnn_v2(depth, num_classes=3, masks=masks, min_size=128, max_size=128, **settings)
        assert set(load_torchvision_export(model, result.path)) == new
        with torch.no_grad():
            (out,) = model.eval()([image[0] * 0.2 + 0.5])  # any [0, 1] image
        assert set(out) == ({"boxes", "labels", "scores", "masks"} if masks else {"boxes", "labels", "scores"})


def test_build_maskrcnn_v2_without_masks_is_torchvisions_faster_rcnn_v2():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    with torch.device("meta"):
        ours = build_maskrcnn_v2(50, masks=False).state_dict()
        theirs = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# ----------------------------------------------------------------------------- detectron2
def _d2_conv(prefix: str) -> set[str]:
    """detectron2 Conv2d with a norm: ``prefix.weight`` (no bias) + ``prefix.norm.*``."""
    return {f"{prefix}.weight"} | {f"{prefix}.norm.{b}" for b in BN}


def detectron2_keys(depth: int, c4: bool = False) -> set[str]:
    """State-dict keys of detectron2's ResNet-FPN (or C4) Mask R-CNN parts SoCo pretrains."""
    bottleneck = depth >= 50
    keys = _d2_conv("backbone.bottom_up.stem.conv1")
    in_ch, out_ch = 64, (256 if bottleneck else 64)
    for stage, n_blocks in zip(range(2, 6), BLOCKS[depth]):
        owner = "roi_heads" if c4 and stage == 5 else "backbone.bottom_up"
        for j in range(n_blocks):
            for conv in ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2"):
                keys |= _d2_conv(f"{owner}.res{stage}.{j}.{conv}")
            if j == 0 and in_ch != out_ch:  # a block has a shortcut conv iff its in != out channels
                keys |= _d2_conv(f"{owner}.res{stage}.{j}.shortcut")
        in_ch, out_ch = out_ch, out_ch * 2
    if not c4:
        for s in range(2, 6):
            keys |= _d2_conv(f"backbone.fpn_lateral{s}") | _d2_conv(f"backbone.fpn_output{s}")
        for k in range(1, 5):
            keys |= _d2_conv(f"roi_heads.box_head.conv{k}")
        keys |= {"roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc1.bias"}
    return keys


def _read_pkl(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # as detectron2 reads it


@pytest.mark.parametrize("which", ["r18", "r50"])
def test_detectron2_names_are_exactly_detectron2s(which, request, tmp_path):
    run, model = request.getfixturevalue(which)
    depth = 18 if which == "r18" else 50
    out = export_checkpoint(run, "detectron2", tmp_path / "d2.pkl")
    data = _read_pkl(out)
    assert data["__author__"] == "soco-det" and data["matching_heuristics"] is True
    assert set(data["model"]) == detectron2_keys(depth)
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    ours = model.state_dict()
    np.testing.assert_array_equal(
        data["model"]["backbone.bottom_up.res3.0.shortcut.norm.running_mean"],
        ours["online.encoder.layer2.0.downsample.1.running_mean"].numpy(),
    )
    np.testing.assert_array_equal(
        data["model"]["backbone.fpn_lateral5.norm.weight"], ours["online.neck.lateral_convs.3.bn.weight"].numpy()
    )
    np.testing.assert_array_equal(
        data["model"]["roi_heads.box_head.conv4.norm.running_var"], ours["online.head.bn4.running_var"].numpy()
    )
    assert data["model"]["backbone.bottom_up.stem.conv1.norm.num_batches_tracked"].shape == ()


def test_detectron2_c4_puts_res5_in_the_roi_head(tmp_path):
    run, model = _write_run(tmp_path / "c4", ModelConfig(variant="soco_c4", depth=50, **SMALL))
    data = _read_pkl(export_checkpoint(run, "detectron2", tmp_path / "c4.pkl"))
    assert set(data["model"]) == detectron2_keys(50, c4=True)
    np.testing.assert_array_equal(
        data["model"]["roi_heads.res5.2.conv3.weight"],
        model.state_dict()["online.encoder.layer4.2.conv3.weight"].numpy(),
    )
    # torchvision has no C4 Mask R-CNN: the backbone goes into the FPN model, whose FPN and box
    # head then stay new as well, which the export's own check states.
    result = export(run, "torchvision", tmp_path / "c4_tv.pth")
    assert result.source.variant == "soco_c4"
    assert "backbone.fpn.* 40," in result.check and "roi_heads.box_head.* 22," in result.check


# Config keys of detectron2's defaults (detectron2/config/defaults.py) used by the shipped files.
D2_CONFIG_KEYS = {
    "VERSION",
    "MODEL.META_ARCHITECTURE",
    "MODEL.WEIGHTS",
    "MODEL.MASK_ON",
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "MODEL.BACKBONE.NAME",
    "MODEL.BACKBONE.FREEZE_AT",
    "MODEL.RESNETS.DEPTH",
    "MODEL.RESNETS.OUT_FEATURES",
    "MODEL.RESNETS.NORM",
    "MODEL.RESNETS.STRIDE_IN_1X1",
    "MODEL.FPN.IN_FEATURES",
    "MODEL.FPN.NORM",
    "MODEL.ANCHOR_GENERATOR.SIZES",
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
    "MODEL.RPN.IN_FEATURES",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.ROI_HEADS.NAME",
    "MODEL.ROI_HEADS.IN_FEATURES",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "MODEL.ROI_BOX_HEAD.NAME",
    "MODEL.ROI_BOX_HEAD.NUM_CONV",
    "MODEL.ROI_BOX_HEAD.NUM_FC",
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION",
    "MODEL.ROI_MASK_HEAD.NAME",
    "MODEL.ROI_MASK_HEAD.NUM_CONV",
    "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION",
    "INPUT.FORMAT",
    "INPUT.MIN_SIZE_TRAIN",
    "INPUT.MIN_SIZE_TEST",
    "DATASETS.TRAIN",
    "DATASETS.TEST",
    "SOLVER.IMS_PER_BATCH",
    "SOLVER.BASE_LR",
    "SOLVER.STEPS",
    "SOLVER.MAX_ITER",
    "SOLVER.WEIGHT_DECAY",
    "TEST.PRECISE_BN.ENABLED",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_shipped_detectron2_configs_use_detectron2_keys_and_socos_settings():
    from soco_det.export.detectron2 import C4_CONFIG, FPN_CONFIG

    fpn = _flatten(yaml.safe_load(FPN_CONFIG.read_text()))
    c4 = _flatten(yaml.safe_load(C4_CONFIG.read_text()))
    for cfg in (fpn, c4):
        assert set(cfg) <= D2_CONFIG_KEYS, set(cfg) - D2_CONFIG_KEYS
        assert cfg["MODEL.RESNETS.NORM"] == "SyncBN" and cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False
        assert cfg["MODEL.BACKBONE.FREEZE_AT"] == 0 and cfg["SOLVER.WEIGHT_DECAY"] == pytest.approx(2.5e-5)
        assert cfg["INPUT.FORMAT"] == "RGB" and cfg["MODEL.PIXEL_MEAN"] == [123.675, 116.28, 103.53]
        assert cfg["MODEL.PIXEL_STD"] == [58.395, 57.12, 57.375] and cfg["TEST.PRECISE_BN.ENABLED"] is True
    assert fpn["MODEL.FPN.NORM"] == fpn["MODEL.ROI_BOX_HEAD.NORM"] == fpn["MODEL.ROI_MASK_HEAD.NORM"] == "SyncBN"
    assert (fpn["MODEL.ROI_BOX_HEAD.NUM_CONV"], fpn["MODEL.ROI_BOX_HEAD.NUM_FC"]) == (4, 1)
    assert c4["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeads" and c4["MODEL.RESNETS.OUT_FEATURES"] == ["res4"]


# ----------------------------------------------------------------------------- mmdetection
def _mm_conv(prefix: str) -> set[str]:
    """mmcv ConvModule with a BN norm: ``prefix.conv.weight`` + ``prefix.bn.*``."""
    return {f"{prefix}.conv.weight"} | {f"{prefix}.bn.{b}" for b in BN}


def mmdet_keys(depth: int) -> set[str]:
    """Keys of mmdet's ResNet + FPN(norm) + Shared4Conv1FCBBoxHead(norm) parts SoCo pretrains."""
    bottleneck = depth >= 50
    keys = {"backbone.conv1.weight"} | {f"backbone.bn1.{b}" for b in BN}
    for stage, n_blocks in zip(range(1, 5), BLOCKS[depth]):
        for j in range(n_blocks):
            for c in (1, 2, 3) if bottleneck else (1, 2):
                keys |= {f"backbone.layer{stage}.{j}.conv{c}.weight"} | {
                    f"backbone.layer{stage}.{j}.bn{c}.{b}" for b in BN
                }
            # downsample when the first block changes stride or width (not R18/R34's layer1)
            if j == 0 and (stage > 1 or bottleneck):
                keys |= {f"backbone.layer{stage}.0.downsample.0.weight"}
                keys |= {f"backbone.layer{stage}.0.downsample.1.{b}" for b in BN}
    for i in range(4):
        keys |= _mm_conv(f"neck.lateral_convs.{i}") | _mm_conv(f"neck.fpn_convs.{i}")
        keys |= _mm_conv(f"roi_head.bbox_head.shared_convs.{i}")
    return keys | {"roi_head.bbox_head.shared_fcs.0.weight", "roi_head.bbox_head.shared_fcs.0.bias"}


@pytest.mark.parametrize("which", ["r18", "r50"])
def test_mmdet_names_are_exactly_mmdets(which, request, tmp_path):
    run, model = request.getfixturevalue(which)
    depth = 18 if which == "r18" else 50
    out = export_checkpoint(run, "mmdet", tmp_path / "mm.pth")
    data = torch.load(out, weights_only=True)
    assert set(data) == {"state_dict", "meta"} and data["meta"]["depth"] == depth
    assert set(data["state_dict"]) == mmdet_keys(depth)
    ours = model.state_dict()
    assert torch.equal(
        data["state_dict"]["roi_head.bbox_head.shared_convs.3.bn.running_mean"], ours["online.head.bn4.running_mean"]
    )
    assert torch.equal(data["state_dict"]["roi_head.bbox_head.shared_fcs.0.bias"], ours["online.head.fc1.bias"])


def test_shipped_mmdet_config():
    from soco_det.export.mmdet import CONFIG

    cfg = runpy.run_path(str(CONFIG))  # plain dicts: no mmdet needed to read it
    assert cfg["_base_"] == "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py" and cfg["load_from"]
    model = cfg["model"]
    sync = dict(type="SyncBN", requires_grad=True)
    assert model["backbone"]["norm_cfg"] == model["neck"]["norm_cfg"] == sync
    assert model["backbone"]["frozen_stages"] == -1 and model["backbone"]["init_cfg"] is None
    head = model["roi_head"]["bbox_head"]
    assert head["type"] == "Shared4Conv1FCBBoxHead" and head["norm_cfg"] == sync
    assert model["roi_head"]["mask_head"]["norm_cfg"] == sync
    assert cfg["optim_wrapper"]["optimizer"]["weight_decay"] == pytest.approx(2.5e-5)


# ----------------------------------------------------------------------------- timm / ResNet
def test_timm_and_torchvision_resnet_load_strictly(r18, tmp_path, image):
    import timm
    import torchvision

    run, model = r18
    state = torch.load(export_checkpoint(run, "timm", tmp_path / "r18.pth"), weights_only=True)
    tm = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    tm.load_state_dict(state, strict=True)
    tv = torchvision.models.resnet18(weights=None)
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(state, strict=True)
    with torch.no_grad():
        c5 = model.online["encoder"](image)[-1]
        torch.testing.assert_close(tm.forward_features(image), c5, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- sources
def test_target_network_is_selectable(r18, tmp_path):
    run, model = r18
    online = torch.load(export_checkpoint(run, "timm", tmp_path / "on.pth"), weights_only=True)
    target = torch.load(export_checkpoint(run, "timm", tmp_path / "tg.pth", network="target"), weights_only=True)
    ours = model.state_dict()
    key = "layer3.1.conv2.weight"
    assert torch.equal(online[key], ours[f"online.encoder.{key}"])
    assert torch.equal(target[key], ours[f"target.encoder.{key}"])
    assert not torch.equal(online[key], target[key])


def test_a_run_folder_of_step_files_exports_its_newest_intact_one(r18, tmp_path):
    import shutil

    from soco_det.export.source import load_source, resolve_checkpoint_path

    run, _ = r18
    folder = tmp_path / "steps"
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.pt", folder / "checkpoints" / "step_00000007.pt")  # no last.pt
    assert resolve_checkpoint_path(folder).name == "step_00000007.pt"
    assert load_source(folder).step == 7
    # a newer but damaged step file is passed over for the older intact one
    newer = folder / "checkpoints" / "step_00000009.pt"
    data = bytearray((run / "checkpoints" / "last.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    newer.write_bytes(bytes(data))
    assert resolve_checkpoint_path(folder).name == "step_00000007.pt"
    with pytest.raises(UserError, match="damaged"):
        resolve_checkpoint_path(newer)


def test_official_checkpoint_exports_like_ours(r18, tmp_path):
    from soco_det.models.official import ours_to_official

    run, model = r18
    official = {
        "model": {ours_to_official(k): v for k, v in model.state_dict().items()},
        "opt": argparse.Namespace(arch="resnet18", model="SoCo_FPN"),
        "epoch": 5,
    }
    path = tmp_path / "ckpt_epoch_5.pth"
    torch.save(official, path)
    result = export(path, "mmdet", tmp_path / "official_mm.pth")
    assert result.source.origin == "official" and result.source.depth == 18
    ours = torch.load(export_checkpoint(run, "mmdet", tmp_path / "ours_mm.pth"), weights_only=True)["state_dict"]
    theirs = torch.load(result.path, weights_only=True)["state_dict"]
    assert set(theirs) == set(ours) == mmdet_keys(18)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_cli_prints_the_mapping_and_the_check(r18, tmp_path, capsys):
    run, _ = r18
    out = tmp_path / "cli_mm.pth"
    assert main(["export", str(run), "--to", "mmdet", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file()
    assert "key mapping:" in text and "check: all" in text
    assert "online.head.fc1.weight -> roi_head.bbox_head.shared_fcs.0.weight" in text
    for group, count in (("backbone", 120), ("fpn", 48), ("box_head", 26)):
        assert f"{group}" in text and f"{count:4d} tensors" in text
    assert "target.* (" in text  # the other network is listed as not exported


def test_bad_sources_give_clear_errors(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="nope.pt: no such file"):
        export_checkpoint(missing, "torchvision", tmp_path / "x.pth")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match="no checkpoints/last.pt"):
        export_checkpoint(tmp_path / "empty_run", "timm", tmp_path / "x.pth")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt: cannot be read"):
        export_checkpoint(junk, "timm", tmp_path / "x.pth")
    assert main(["export", str(missing), "--to", "timm", "-o", str(tmp_path / "x.pth")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
