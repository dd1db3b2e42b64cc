"""Every shipped detectron2 / mmdetection config, read as text, against what our export writes.

For each file under ``soco_det/configs`` the test runs the export command the file documents
(``soco-det export RUN --to ...``) on a real soco-det run, then derives from the config's own
values the weight names the framework's model will look for in the parts SoCo pretrains (ResNet
stages and norms, FPN levels and norms, box-head convs/fcs and their norms, res5 in the RoI head
for C4) and checks that the exported file has exactly those names. Neither framework can be
installed here, so the names follow their module code (detectron2 ``resnet.py``, ``fpn.py``,
``box_head.py``, ``roi_heads.py``; mmdetection ``ResNet``, ``FPN``, ``ConvFCBBoxHead`` built from
mmcv ``ConvModule``), independently of the exporters. A config whose norm settings would leave a
pretrained layer unloaded (e.g. an FPN without norm expects conv biases) fails here.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import runpy
from pathlib import Path

import pytest
import torch
import yaml
from test_export import D2_CONFIG_KEYS, _flatten

from soco_det.commands.main import main
from soco_det.models import ModelConfig, build_model

CONFIGS = Path(__file__).resolve().parents[1] / "soco_det" / "configs"
D2_FILES = sorted((CONFIGS / "detectron2").glob("*.yaml"))
MM_FILES = sorted((CONFIGS / "mmdet").glob("*.py"))
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
SMALL = dict(proj_hidden_dim=32, proj_dim=16)

# detectron2/config/defaults.py keys the shipped files may set: the COCO configs' (test_export.py)
# and the LVIS config's sampler and test settings.
D2_KEYS = D2_CONFIG_KEYS | {
    "DATALOADER.REPEAT_THRESHOLD",
    "DATALOADER.SAMPLER_TRAIN",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
    "TEST.DETECTIONS_PER_IMAGE",
}
EXPORT_COMMAND = re.compile(r"soco-det export RUN --to (\w+)(?: -o (\S+))?")


def _run(root: Path, variant: str, depth: int) -> Path:
    cfg = ModelConfig(variant=variant, depth=depth, **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg)
    (root / "checkpoints").mkdir(parents=True)
    torch.save(
        {"format": "soco-det/1", "model": model.state_dict(), "step": 1, "config": {"model": dataclasses.asdict(cfg)}},
        root / "checkpoints" / "last.pt",
    )
    return root


def _documented_export(text: str, tmp_path: Path, run: Path) -> Path:
    """Run the ``soco-det export RUN --to X -o FILE`` the config documents; returns the file."""
    found = EXPORT_COMMAND.findall(text)
    assert found, "the config documents no `soco-det export RUN --to ...` command"
    to, name = found[0]
    out = tmp_path / (name or f"soco_{to}.pkl")
    assert main(["export", str(run), "--to", to, "-o", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- detectron2
def d2_conv(prefix: str, norm: str, bias_without_norm: bool) -> set[str]:
    """detectron2 ``Conv2d(..., norm=get_norm(norm))``: a norm has weight/bias/stats (SyncBN and BN
    also the counter); without a norm the conv has a bias where the module asks for one."""
    if norm in ("SyncBN", "BN"):
        return {f"{prefix}.weight"} | {f"{prefix}.norm.{b}" for b in BN}
    if norm == "FrozenBN":
        return {f"{prefix}.weight"} | {f"{prefix}.norm.{b}" for b in BN[:4]}
    return {f"{prefix}.weight"} | ({f"{prefix}.bias"} if bias_without_norm else set())


def detectron2_expected(cfg: dict) -> set[str]:
    """Names of the pretrained parts of the detectron2 model ``cfg`` (flattened) builds."""
    depth, norm = cfg["MODEL.RESNETS.DEPTH"], cfg["MODEL.RESNETS.NORM"]
    c4 = cfg["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeads"
    last_stage = max(int(f[3:]) for f in cfg["MODEL.RESNETS.OUT_FEATURES"])  # build_resnet_backbone stops there
    bottleneck = depth >= 50
    keys = d2_conv("backbone.bottom_up.stem.conv1", norm, False)  # ResNet convs never have a bias
    in_ch, out_ch = 64, (256 if bottleneck else 64)
    for stage, n_blocks in zip(range(2, 6), BLOCKS[depth]):
        owner = "backbone.bottom_up" if stage <= last_stage else ("roi_heads" if c4 and stage == 5 else None)
        for j in range(n_blocks):
            if owner is None:
                continue
            for conv in ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2"):
                keys |= d2_conv(f"{owner}.res{stage}.{j}.{conv}", norm, False)
            if j == 0 and in_ch != out_ch:
                keys |= d2_conv(f"{owner}.res{stage}.{j}.shortcut", norm, False)
        in_ch, out_ch = out_ch, out_ch * 2
    if cfg["MODEL.BACKBONE.NAME"] == "build_resnet_fpn_backbone":
        fpn_norm = cfg.get("MODEL.FPN.NORM", "")
        for feature in cfg["MODEL.FPN.IN_FEATURES"]:
            s = int(feature[3:])
            keys |= d2_conv(f"backbone.fpn_lateral{s}", fpn_norm, True) | d2_conv(
                f"backbone.fpn_output{s}", fpn_norm, True
            )
    if cfg.get("MODEL.ROI_BOX_HEAD.NAME") == "FastRCNNConvFCHead" and not c4:
        box_norm = cfg.get("MODEL.ROI_BOX_HEAD.NORM", "")
        for k in range(1, cfg["MODEL.ROI_BOX_HEAD.NUM_CONV"] + 1):
            keys |= d2_conv(f"roi_heads.box_head.conv{k}", box_norm, True)
        for k in range(1, cfg["MODEL.ROI_BOX_HEAD.NUM_FC"] + 1):
            keys |= {f"roi_heads.box_head.fc{k}.weight", f"roi_heads.box_head.fc{k}.bias"}
    return keys


def test_the_shipped_detectron2_configs_include_lvis():
    names = {p.name for p in D2_FILES}
    assert {
        "soco_mask_rcnn_R_50_FPN_1x.yaml",
        "soco_mask_rcnn_R_50_C4_1x.yaml",
        "soco_mask_rcnn_R_50_FPN_1x_lvis.yaml",
    } <= names
    lvis = _flatten(yaml.safe_load((CONFIGS / "detectron2" / "soco_mask_rcnn_R_50_FPN_1x_lvis.yaml").read_text()))
    assert lvis["MODEL.ROI_HEADS.NUM_CLASSES"] == 1203 and lvis["DATASETS.TRAIN"] == '("lvis_v1_train",)'
    assert (
        lvis["DATALOADER.SAMPLER_TRAIN"] == "RepeatFactorTrainingSampler"
        and lvis["DATALOADER.REPEAT_THRESHOLD"] == 0.001
    )
    assert lvis["MODEL.ROI_HEADS.SCORE_THRESH_TEST"] == 1e-4 and lvis["TEST.DETECTIONS_PER_IMAGE"] == 300
    coco = _flatten(yaml.safe_load((CONFIGS / "detectron2" / "soco_mask_rcnn_R_50_FPN_1x.yaml").read_text()))
    # Only the dataset-specific keys differ from the COCO file.
    differ = {k for k in set(coco) | set(lvis) if coco.get(k) != lvis.get(k)}
    assert differ == {
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
        "DATASETS.TRAIN",
        "DATASETS.TEST",
        "DATALOADER.SAMPLER_TRAIN",
        "DATALOADER.REPEAT_THRESHOLD",
        "TEST.DETECTIONS_PER_IMAGE",
    }


@pytest.mark.parametrize("path", D2_FILES, ids=lambda p: p.name)
def test_detectron2_config_expects_exactly_the_exported_names(path, tmp_path):
    text = path.read_text()
    cfg = _flatten(yaml.safe_load(text))
    assert set(cfg) <= D2_KEYS, set(cfg) - D2_KEYS
    assert cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is False and cfg["SOLVER.WEIGHT_DECAY"] == pytest.approx(2.5e-5)
    c4 = cfg["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeads"
    run = _run(tmp_path / "run", "soco_c4" if c4 else "soco_fpn", cfg["MODEL.RESNETS.DEPTH"])
    out = _documented_export(text, tmp_path, run)
    with open(out, "rb") as f:
        exported = set(pickle.load(f, encoding="latin1")["model"])
    expected = detectron2_expected(cfg)
    assert exported == expected, (sorted(expected - exported)[:5], sorted(exported - expected)[:5])


def test_the_detectron2_check_catches_a_config_without_norms():
    """A config whose FPN has no norm expects conv biases our (bias-free) FPN cannot give."""
    cfg = _flatten(yaml.safe_load((CONFIGS / "detectron2" / "soco_mask_rcnn_R_50_FPN_1x.yaml").read_text()))
    cfg["MODEL.FPN.NORM"] = ""
    assert "backbone.fpn_lateral2.bias" in detectron2_expected(cfg)
    assert "backbone.fpn_lateral2.norm.weight" not in detectron2_expected(cfg)


# ----------------------------------------------------------------------------- mmdetection
# Values of mmdet's mask-rcnn_r50_fpn_1x_coco.py (the shipped file's _base_) that it does not override.
MM_BASE = {"neck_in_channels": [256, 512, 1024, 2048], "num_stages": 4}


def mm_conv(prefix: str, norm_cfg: dict | None) -> set[str]:
    """mmcv ``ConvModule``: ``conv`` (bias='auto': none with a norm) and the norm, named ``bn`` for BN/SyncBN."""
    if norm_cfg:
        assert norm_cfg["type"] in ("BN", "SyncBN")
        return {f"{prefix}.conv.weight"} | {f"{prefix}.bn.{b}" for b in BN}
    return {f"{prefix}.conv.weight", f"{prefix}.conv.bias"}


def mmdet_expected(model: dict) -> set[str]:
    backbone, neck, head = model["backbone"], model["neck"], model["roi_head"]["bbox_head"]
    depth, bottleneck = backbone["depth"], backbone["depth"] >= 50
    keys = {"backbone.conv1.weight"} | {f"backbone.bn1.{b}" for b in BN}
    for stage, n_blocks in zip(range(1, MM_BASE["num_stages"] + 1), BLOCKS[depth]):
        for j in range(n_blocks):
            for c in (1, 2, 3) if bottleneck else (1, 2):
                keys |= {f"backbone.layer{stage}.{j}.conv{c}.weight"} | {
                    f"backbone.layer{stage}.{j}.bn{c}.{b}" for b in BN
                }
            if j == 0 and (stage > 1 or bottleneck):
                keys |= {f"backbone.layer{stage}.0.downsample.0.weight"} | {
                    f"backbone.layer{stage}.0.downsample.1.{b}" for b in BN
                }
    for i in range(len(neck.get("in_channels", MM_BASE["neck_in_channels"]))):
        keys |= mm_conv(f"neck.lateral_convs.{i}", neck.get("norm_cfg")) | mm_conv(
            f"neck.fpn_convs.{i}", neck.get("norm_cfg")
        )
    # Shared4Conv1FCBBoxHead = ConvFCBBoxHead(num_shared_convs=4, num_shared_fcs=1).
    assert head["type"] == "Shared4Conv1FCBBoxHead"
    for i in range(4):
        keys |= mm_conv(f"roi_head.bbox_head.shared_convs.{i}", head.get("norm_cfg"))
    return keys | {"roi_head.bbox_head.shared_fcs.0.weight", "roi_head.bbox_head.shared_fcs.0.bias"}


@pytest.mark.parametrize("path", MM_FILES, ids=lambda p: p.name)
def test_mmdet_config_expects_exactly_the_exported_names(path, tmp_path):
    text = path.read_text()
    cfg = runpy.run_path(str(path))  # plain dicts: mmdet is not needed to read it
    run = _run(tmp_path / "run", "soco_fpn", cfg["model"]["backbone"]["depth"])
    out = _documented_export(text, tmp_path, run)
    assert Path(cfg["load_from"]).name == out.name  # the config loads the file the command writes
    exported = set(torch.load(out, weights_only=True)["state_dict"])
    expected = mmdet_expected(cfg["model"])
    assert exported == expected, (sorted(expected - exported)[:5], sorted(exported - expected)[:5])


# ----------------------------------------------------------------------------- configs written for other widths
# The widths of the tiny_cpu recipe: ResNet-18, 64-channel FPN and box-head convs, a 256-wide fc.
TINY_WIDTHS = dict(depth=18, fpn_channels=64, head_conv_dim=64, head_fc_dim=256)
# detectron2/config/defaults.py keys the written configs set beyond the shipped files' ones.
D2_WIDTH_KEYS = {
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "MODEL.FPN.OUT_CHANNELS",
    "MODEL.ROI_BOX_HEAD.CONV_DIM",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = ModelConfig(variant="soco_fpn", **TINY_WIDTHS, **SMALL)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny") / "run"
    (root / "checkpoints").mkdir(parents=True)
    state = build_model(cfg).state_dict()
    torch.save(
        {"format": "soco-det/1", "model": state, "step": 1, "config": {"model": dataclasses.asdict(cfg)}},
        root / "checkpoints" / "last.pt",
    )
    return root


def test_a_resnet18_detectron2_export_writes_the_config_it_fits(tiny_run, tmp_path, capsys):
    out = tmp_path / "soco_detectron2.pkl"
    assert main(["export", str(tiny_run), "--to", "detectron2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    config = out.with_suffix(".yaml")
    cfg = _flatten(yaml.safe_load(config.read_text()))
    assert set(cfg) <= D2_KEYS | D2_WIDTH_KEYS, set(cfg) - D2_KEYS - D2_WIDTH_KEYS
    assert cfg["MODEL.WEIGHTS"] == str(out.resolve())
    widths = {
        "MODEL.RESNETS.DEPTH": 18,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
        "MODEL.FPN.OUT_CHANNELS": 64,
        "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
        "MODEL.ROI_BOX_HEAD.CONV_DIM": 64,
        "MODEL.ROI_BOX_HEAD.NUM_FC": 1,
        "MODEL.ROI_BOX_HEAD.FC_DIM": 256,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
        "MODEL.FPN.NORM": "SyncBN",
        "MODEL.ROI_BOX_HEAD.NORM": "SyncBN",
    }
    assert {k: cfg[k] for k in widths} == widths
    for key, value in widths.items():  # every key is printed with its value
        assert f"  {key}: {value}" in printed
    assert f"(set in {config})" in printed and "names and shapes" in printed
    with open(out, "rb") as f:
        exported = pickle.load(f, encoding="latin1")["model"]
    assert set(exported) == detectron2_expected(cfg)  # names, derived here independently of the exporter
    # shapes worked out by hand from detectron2's modules for these widths
    assert exported["backbone.bottom_up.res3.0.shortcut.weight"].shape == (128, 64, 1, 1)
    assert exported["backbone.fpn_lateral3.weight"].shape == (64, 128, 1, 1)
    assert exported["backbone.fpn_output5.weight"].shape == (64, 64, 3, 3)
    assert exported["roi_heads.box_head.conv1.weight"].shape == (64, 64, 3, 3)
    assert exported["roi_heads.box_head.fc1.weight"].shape == (256, 64 * 7 * 7)


def test_a_resnet18_mmdet_export_writes_the_config_it_fits(tiny_run, tmp_path):
    out = tmp_path / "soco_mmdet.pth"
    assert main(["export", str(tiny_run), "--to", "mmdet", "-o", str(out)]) == 0
    cfg = runpy.run_path(str(out.with_suffix(".py")))  # plain dicts: mmdet is not needed to read it
    assert cfg["_base_"] == "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py" and cfg["load_from"] == str(out.resolve())
    model, roi = cfg["model"], cfg["model"]["roi_head"]
    assert model["backbone"]["depth"] == 18 and model["neck"]["in_channels"] == [64, 128, 256, 512]
    assert model["neck"]["out_channels"] == model["rpn_head"]["in_channels"] == model["rpn_head"]["feat_channels"] == 64
    assert roi["bbox_roi_extractor"]["out_channels"] == roi["mask_roi_extractor"]["out_channels"] == 64
    assert roi["mask_head"]["in_channels"] == roi["bbox_head"]["in_channels"] == 64
    head = roi["bbox_head"]
    assert (head["type"], head["conv_out_channels"], head["fc_out_channels"], head["roi_feat_size"]) == (
        "Shared4Conv1FCBBoxHead",
        64,
        256,
        7,
    )
    assert model["backbone"]["norm_cfg"] == model["neck"]["norm_cfg"] == head["norm_cfg"] == cfg["norm_cfg"]
    exported = torch.load(out, weights_only=True)["state_dict"]
    assert set(exported) == mmdet_expected(model)
    assert exported["neck.lateral_convs.1.conv.weight"].shape == (64, 128, 1, 1)
    assert exported["roi_head.bbox_head.shared_fcs.0.weight"].shape == (256, 64 * 7 * 7)


def _source_and_mapping(run: Path, module):
    from soco_det.export.source import load_source

    source = load_source(run)
    return source, module.map_source(source)


def test_the_detectron2_check_compares_shapes_not_only_names(tiny_run, tmp_path):
    """The hint printed before gave depth and res2 width only: that config has every name of the export,
    but its 256-channel FPN and 1024-wide fc do not fit, which the check now says."""
    from soco_det.errors import UserError
    from soco_det.export import detectron2

    source, mapping = _source_and_mapping(tiny_run, detectron2)
    old_hint = yaml.safe_load(detectron2.FPN_CONFIG.read_text())
    old_hint["MODEL"]["RESNETS"].update(DEPTH=18, RES2_OUT_CHANNELS=64)
    assert set(mapping.state_dict) == detectron2_expected(_flatten(old_hint))  # the names all match
    with pytest.raises(UserError, match=r"tensors of another shape \(backbone.fpn_lateral2.weight \(64, 64, 1, 1\)"):
        detectron2.check_layout(mapping, source, yaml.safe_dump(old_hint))
    written = detectron2.config_text(source, detectron2.target_settings(source, tmp_path / "x.pkl"))
    assert "names and shapes" in detectron2.check_layout(mapping, source, written)


def test_the_mmdet_check_compares_shapes_not_only_names(tiny_run, tmp_path):
    from soco_det.errors import UserError
    from soco_det.export import mmdet

    source, mapping = _source_and_mapping(tiny_run, mmdet)
    settings = mmdet.target_settings(source, tmp_path / "x.pth")
    text = mmdet.config_text(source, settings)
    assert "names and shapes" in mmdet.check_layout(mapping, source, settings, text)
    old_hint = {
        k: v for k, v in settings.items() if k in ("load_from", "model.backbone.depth", "model.neck.in_channels")
    }
    old_hint["model.roi_head.bbox_head.type"] = "Shared4Conv1FCBBoxHead"
    with pytest.raises(UserError, match=r"another shape \(neck.lateral_convs.0.conv.weight \(64, 64, 1, 1\) vs"):
        mmdet.check_layout(mapping, source, old_hint, mmdet.config_text(source, old_hint))


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_the_derived_mmdet_backbone_is_torchvisions_resnet(depth):
    """mmdet's ResNet has torchvision's names and shapes: the layout derived from a config must too."""
    import torchvision

    from soco_det.export.layouts import mmdet_layout

    with torch.device("meta"):
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in resnet.items() if not k.startswith("fc.")}
    layout = mmdet_layout({"backbone": {"depth": depth}})
    assert {k: v for k, v in layout.items() if k.startswith("backbone.")} == expected
