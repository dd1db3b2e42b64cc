"""``model.init=PATH``: pretraining starts from a ResNet, a detector checkpoint or one of our exports.

Every file is written by the test from real constructors with random weights (torchvision ResNets
and Mask R-CNNs, our own model and its exports); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from soco_det.errors import UserError
from soco_det.export import export_checkpoint
from soco_det.export.init_weights import init_from_weights
from soco_det.models import ModelConfig, build_model
from soco_det.models.maskrcnn import build_maskrcnn_v2
from soco_det.models.official import ours_to_official

# R18 with a narrow FPN / head; widths that torchvision's build_maskrcnn_v2 can reproduce.
NARROW = dict(depth=18, fpn_channels=64, head_conv_dim=64, head_fc_dim=128, proj_hidden_dim=32, proj_dim=16)
PARTS = ("encoder", "neck", "head")


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BN buffer random, so a misplaced or skipped tensor shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return module


def _fresh(cfg: ModelConfig, seed: int = 123) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg)


def _part(model: torch.nn.Module, net: str, part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in getattr(model, net)[part].state_dict().items() if not k.endswith("num_batches_tracked")}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def soco_run(tmp_path_factory):
    """A soco-det run folder (R18, narrow) whose online network is random everywhere."""
    root = tmp_path_factory.mktemp("run")
    cfg = ModelConfig(**NARROW)
    model = _randomise(_fresh(cfg, seed=1), seed=2)
    (root / "checkpoints").mkdir()
    torch.save(
        {"format": "soco-det/1", "model": model.state_dict(), "step": 5, "config": {"model": dataclasses.asdict(cfg)}},
        root / "checkpoints" / "last.pt",
    )
    return root, model, cfg


def test_torchvision_resnet18_loads_the_backbone_and_leaves_the_rest_random(tmp_path):
    resnet = _randomise(torchvision.models.resnet18(weights=None), seed=7)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    cfg = ModelConfig(**NARROW, init=str(path))
    model = _fresh(cfg)
    before = {part: _part(model, "online", part) for part in ("neck", "head")}

    report = init_from_weights(model, path, cfg)

    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.") and "num_batches" not in k}
    assert _equal(_part(model, "online", "encoder"), expected)
    for part in ("neck", "head"):
        assert _equal(_part(model, "online", part), before[part])  # untouched
    # The target starts as an exact copy of the online network (loaded and random parts).
    for part in PARTS:
        assert _equal(_part(model, "target", part), _part(model, "online", part))
    assert report.kind == "torchvision/timm ResNet" and report.depth == 18
    assert set(report.loaded) == {f"online.encoder.{k}" for k in expected}
    assert report.unused == ["fc.bias", "fc.weight"]
    random = set(report.random)
    assert {"online.neck.lateral_convs.0.conv.weight", "online.head.fc1.bias", "predictor.linear1.weight"} <= random
    assert not random & set(report.loaded)
    assert not any(k.startswith("online.encoder.") for k in random)


def test_a_depth_mismatch_is_refused_naming_both_depths(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    cfg = ModelConfig(**NARROW, init=str(path))
    with pytest.raises(UserError, match=r"ResNet-34 backbone but model.depth=18; set model.depth=34"):
        init_from_weights(_fresh(cfg), path, cfg)


def test_urls_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="local file"):
        ModelConfig(init="https://example.com/r50.pth").validate()
    cfg = ModelConfig(**NARROW)
    with pytest.raises(UserError, match="no such file"):
        init_from_weights(_fresh(cfg), tmp_path / "nope.pth", cfg)
    junk = tmp_path / "junk.pth"
    torch.save({"something.else": torch.zeros(3)}, junk)
    with pytest.raises(UserError, match="no ResNet / FPN / box-head names recognised"):
        init_from_weights(_fresh(cfg), junk, cfg)


@pytest.mark.parametrize("to", ["torchvision", "detectron2", "mmdet", "timm"])
def test_our_exports_load_back_into_the_parts_they_hold(soco_run, tmp_path, to):
    run, source, cfg = soco_run
    out = export_checkpoint(run, to, tmp_path / f"export_{to}{'.pkl' if to == 'detectron2' else '.pth'}")
    model = _fresh(cfg)
    report = init_from_weights(model, out, cfg)
    held = ("encoder",) if to == "timm" else PARTS
    for part in PARTS:
        same = _equal(_part(model, "online", part), _part(source, "online", part))
        assert same == (part in held), (to, part)
        assert _equal(_part(model, "target", part), _part(model, "online", part))
    assert report.unused == [] and report.skipped == {}
    # BatchNorm running statistics come along too.
    assert torch.equal(
        model.online["encoder"].layer3[1].bn2.running_var, source.online["encoder"].layer3[1].bn2.running_var
    )


def test_detectron2_short_names_of_the_official_converters_load(soco_run, tmp_path):
    run, source, cfg = soco_run
    out = export_checkpoint(run, "detectron2", tmp_path / "full.pkl")
    with open(out, "rb") as f:
        data = pickle.load(f)
    short = {}
    for k, v in data["model"].items():
        for prefix in ("backbone.bottom_up.", "backbone.", "roi_heads."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        short[k] = v
    path = tmp_path / "short.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": short, "__author__": "Yue", "matching_heuristics": True}, f)
    model = _fresh(cfg)
    report = init_from_weights(model, path, cfg)
    assert report.kind == "detectron2 (short names)"
    for part in PARTS:
        assert _equal(_part(model, "online", part), _part(source, "online", part))


def test_a_pickle_with_code_in_it_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"x": Path("/")}}, f)  # any non-numpy class
    cfg = ModelConfig(**NARROW)
    with pytest.raises(UserError, match="holds pathlib.PosixPath, which is not weights data; refused without running"):
        init_from_weights(_fresh(cfg), path, cfg)


def test_a_torchvision_mask_rcnn_v2_checkpoint_loads_backbone_fpn_and_box_head(tmp_path):
    detector = _randomise(
        build_maskrcnn_v2(18, 5, fpn_channels=64, box_conv_dims=(64,) * 4, box_fc_dims=(128,)), seed=3
    )
    path = tmp_path / "maskrcnn.pth"
    torch.save({"model": detector.state_dict(), "epoch": 12}, path)  # references/detection layout
    cfg = ModelConfig(**NARROW)
    model = _fresh(cfg)
    report = init_from_weights(model, path, cfg)
    assert report.kind == "torchvision Mask R-CNN v2" and report.skipped == {}
    tv = detector.state_dict()
    assert torch.equal(
        model.online["neck"].fpn_convs[2].bn.running_mean, tv["backbone.fpn.layer_blocks.2.1.running_mean"]
    )
    assert torch.equal(model.online["head"].conv4.weight, tv["roi_heads.box_head.3.0.weight"])
    assert torch.equal(model.online["head"].fc1.bias, tv["roi_heads.box_head.5.bias"])
    assert torch.equal(model.online["encoder"].layer4[1].conv2.weight, tv["backbone.body.layer4.1.conv2.weight"])
    # The parts SoCo does not pretrain are reported unused, by name.
    assert {k.split(".")[0] for k in report.unused} == {"rpn", "roi_heads"}
    assert all(k.startswith(("rpn.", "roi_heads.box_predictor.", "roi_heads.mask_")) for k in report.unused)


def test_a_faster_rcnn_v2_checkpoint_is_reported_as_one(tmp_path):
    """A box-only detector has the Mask R-CNN's names without the mask branch: it loads the same way and
    the report names it for what it is."""
    detector = _randomise(
        build_maskrcnn_v2(18, 5, fpn_channels=64, box_conv_dims=(64,) * 4, box_fc_dims=(128,), masks=False), seed=5
    )
    path = tmp_path / "fasterrcnn.pth"
    torch.save(detector.state_dict(), path)
    cfg = ModelConfig(**NARROW)
    model = _fresh(cfg)
    report = init_from_weights(model, path, cfg)
    assert report.kind == "torchvision Faster R-CNN v2" and report.skipped == {}
    assert report.summary_lines()[0] == f"model.init: {path} (torchvision Faster R-CNN v2, ResNet-18)"
    assert torch.equal(model.online["head"].fc1.weight, detector.state_dict()["roi_heads.box_head.5.weight"])


def test_a_v1_fpn_without_batchnorm_stays_random_and_says_why(tmp_path):
    # torchvision's v1 Mask R-CNN: FrozenBN backbone (no counters), FPN convs with bias and no
    # norm, a TwoMLPHead box head: only the backbone fits SoCo's layers.
    detector = _randomise(torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None), 4)
    path = tmp_path / "v1.pth"
    torch.save(detector.state_dict(), path)
    cfg = ModelConfig(depth=50, proj_hidden_dim=32, proj_dim=16)
    model = _fresh(cfg)
    neck_before = _part(model, "online", "neck")
    report = init_from_weights(model, path, cfg)
    assert torch.equal(
        model.online["encoder"].layer3[5].conv3.weight, detector.state_dict()["backbone.body.layer3.5.conv3.weight"]
    )
    assert _equal(_part(model, "online", "neck"), neck_before)
    assert "8 of its 40 tensors" in report.skipped["neck"]
    assert "backbone.fpn.inner_blocks.0.0.weight" in report.unused
    assert "online.neck.lateral_convs.0.conv.weight" in report.random
    assert not any(k.startswith("online.head.") for k in report.loaded)


def test_an_official_checkpoint_and_a_byol_run_are_read_with_our_names(soco_run, tmp_path):
    _, source, cfg = soco_run
    official = tmp_path / "ckpt_epoch_3.pth"
    torch.save({"model": {ours_to_official(k): v for k, v in source.state_dict().items()}, "epoch": 3}, official)
    model = _fresh(cfg)
    report = init_from_weights(model, official, cfg)
    assert report.kind.startswith("official soco_fpn")
    for part in PARTS:
        assert _equal(_part(model, "online", part), _part(source, "online", part))

    # An image-level BYOL run: its encoder is loaded, the FPN and box head stay random.
    byol_cfg = ModelConfig(variant="image_byol", depth=18, proj_hidden_dim=32, proj_dim=16)
    byol = _randomise(_fresh(byol_cfg, seed=5), seed=6)
    (tmp_path / "byol" / "checkpoints").mkdir(parents=True)
    torch.save(
        {
            "format": "soco-det/1",
            "model": byol.state_dict(),
            "step": 1,
            "config": {"model": dataclasses.asdict(byol_cfg)},
        },
        tmp_path / "byol" / "checkpoints" / "last.pt",
    )
    model = _fresh(cfg)
    report = init_from_weights(model, tmp_path / "byol", cfg)
    assert report.kind == "soco-det image_byol run"
    assert _equal(_part(model, "online", "encoder"), _part(byol, "online", "encoder"))
    assert not _equal(_part(model, "online", "neck"), _part(source, "online", "neck"))
    assert not any(k.startswith(("online.neck", "online.head")) for k in report.loaded)


def test_a_width_mismatch_names_the_config_fields(soco_run, tmp_path):
    run, _, cfg = soco_run
    out = export_checkpoint(run, "torchvision", tmp_path / "tv.pth")
    wide = dataclasses.replace(cfg, fpn_channels=32)
    with pytest.raises(UserError, match=r"FPN shapes differ \(set model.fpn_channels"):
        init_from_weights(_fresh(wide), out, wide)


def test_pretrain_with_init_logs_and_writes_the_report(soco_run, tmp_path, caplog):
    """End to end through the engine: the first checkpoint's online encoder moved from the init
    only by one optimizer step, and init_weights.json lists every loaded key."""
    from engine_fixtures import make_sample_data, tiny_config

    from soco_det.engine import pretrain

    run, source, _ = soco_run
    data = make_sample_data(tmp_path / "data", n_images=4)
    timm_file = export_checkpoint(run, "timm", tmp_path / "r18_timm.pth")
    cfg = tiny_config(data, f"model.init={timm_file}", "train.loop.max_steps=1")
    caplog.set_level("INFO")
    out = pretrain(cfg, tmp_path / "pre")
    report = json.loads((out / "init_weights.json").read_text())
    assert report["kind"] == "torchvision/timm ResNet" and len(report["loaded"]) == 100  # R18 minus counters
    assert any("model.init:" in r.getMessage() for r in caplog.records)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
    want = source.state_dict()["online.encoder.layer2.0.conv1.weight"]
    got = state["online.encoder.layer2.0.conv1.weight"]
    # One LARS step (trust 0.001, warmup lr) moves a weight by far less than 1e-3 of its scale.
    assert torch.allclose(got, want, rtol=0, atol=1e-3 * want.abs().max().item())
    assert not torch.allclose(
        got, _fresh(dataclasses.replace(cfg.model, init=None)).online["encoder"].layer2[0].conv1.weight, atol=1e-2
    )


def test_a_detectron2_c4_export_puts_res5_back_into_the_c4_encoder(tmp_path):
    cfg = ModelConfig(variant="soco_c4", depth=50, proj_hidden_dim=32, proj_dim=16)
    source = _randomise(_fresh(cfg, seed=8), seed=9)
    (tmp_path / "c4" / "checkpoints").mkdir(parents=True)
    torch.save(
        {"format": "soco-det/1", "model": source.state_dict(), "step": 1, "config": {"model": dataclasses.asdict(cfg)}},
        tmp_path / "c4" / "checkpoints" / "last.pt",
    )
    out = export_checkpoint(tmp_path / "c4", "detectron2", tmp_path / "c4.pkl")
    model = _fresh(cfg)
    report = init_from_weights(model, out, cfg)
    assert report.kind == "detectron2 C4" and report.unused == []
    assert _equal(_part(model, "online", "encoder"), _part(source, "online", "encoder"))
    assert _equal(_part(model, "target", "encoder"), _part(source, "online", "encoder"))
