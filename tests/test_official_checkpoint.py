"""Loading official ``ckpt_epoch_*.pth`` files: every key mapped or dropped, every model key filled.

``data/official_soco_fpn_state_dict_keys.tsv`` lists every key, shape and dtype of a real official
SoCo_FPN state dict (hologerry/SoCo, ResNet-50, saved under DDP; a copy of
``../shared/official/soco_fpn_state_dict_keys.tsv``): the first test loads a checkpoint made from that
list alone, so it does not depend on our inverse mapping ``ours_to_official``. The other fake checkpoints are written with the official key names (DDP ``module.`` prefix,
``encoder_k``/``neck_k``/``head_k``/``projector_k`` targets, mmcv FPN names, ``mlps.MLP`` names
``linear1``/``bn1``/``linear2``), plus what the official script stores next to the weights.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from soco_det.models import ModelConfig, build_model
from soco_det.models.official import (
    OfficialCheckpointError,
    load_official_state_dict,
    official_to_ours,
    ours_to_official,
)

OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_soco_fpn_state_dict_keys.tsv"
TINY = dict(depth=18, fpn_channels=16, head_conv_dim=16, head_fc_dim=32, proj_hidden_dim=32, proj_dim=16)


def official_checkpoint(variant: str) -> tuple[dict, dict]:
    """(``ckpt`` as the official script saves it, our state dict it was made from)."""
    torch.manual_seed(0)
    ours = build_model(ModelConfig(variant=variant, **TINY)).state_dict()
    # Make every tensor distinct so a mix-up between keys cannot pass the comparison.
    ours = {k: (torch.randn_like(v) if v.is_floating_point() else v + i) for i, (k, v) in enumerate(ours.items())}
    model = {ours_to_official(k): v for k, v in ours.items()}
    if variant == "soco_c4":  # MoCo leftovers of SoCo_C4
        model["module.queue"] = torch.randn(128, 16)
        model["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    ckpt = {
        "opt": argparse.Namespace(arch="resnet50", batch_size=128, aware_range=[48, 96, 192, 224, 0]),
        "model": model,
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": 10},
        "epoch": 1,
    }
    return ckpt, ours


def test_checkpoint_with_every_key_of_a_real_official_run_loads_completely():
    rows = [line.split("\t") for line in OFFICIAL_KEYS.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 811 and all(key.startswith("module.") for key, _, _ in rows)
    # Value i in every element of key i (a broadcast view: no memory), so each tensor is traceable.
    model = {
        key: torch.full((), i, dtype=getattr(torch, dtype)).expand(ast.literal_eval(shape))
        for i, (key, shape, dtype) in enumerate(rows)
    }
    state, report = load_official_state_dict({"model": model, "epoch": 100}, "soco_fpn")
    assert report.dropped == [] and sorted(report.mapping) == sorted(model)
    fresh = build_model(ModelConfig(variant="soco_fpn"))
    ours = fresh.state_dict()
    assert set(state) == set(ours) and len(state) == len(rows)
    for i, (key, _, _) in enumerate(rows):
        name = report.mapping[key]
        side = "target." if "_k." in key else "predictor." if key.startswith("module.predictor.") else "online."
        assert name.startswith(side), (key, name)
        assert state[name].dtype == ours[name].dtype and state[name].shape == ours[name].shape, name
        assert int(state[name].reshape(-1)[0]) == i, (key, name)
    fresh.load_state_dict(state, strict=True)
    index = {key: i for i, (key, _, _) in enumerate(rows)}
    assert (fresh.target["neck"].fpn_convs[3].conv.weight == index["module.neck_k.fpn_convs.3.conv.weight"]).all()
    assert (fresh.predictor.linear2.bias == index["module.predictor.linear2.bias"]).all()


def test_official_names_map_onto_ours():
    assert official_to_ours("neck.lateral_convs.2.bn.running_var") == "online.neck.lateral_convs.2.bn.running_var"
    assert official_to_ours("neck_k.fpn_convs.0.conv.weight") == "target.neck.fpn_convs.0.conv.weight"
    assert official_to_ours("encoder_k.layer1.0.conv1.weight") == "target.encoder.layer1.0.conv1.weight"
    assert official_to_ours("encoder.layer4.2.bn3.weight") == "online.encoder.layer4.2.bn3.weight"
    assert official_to_ours("head.fc1.weight") == "online.head.fc1.weight"
    assert official_to_ours("head_k.bn4.num_batches_tracked") == "target.head.bn4.num_batches_tracked"
    assert official_to_ours("projector.linear1.weight") == "online.projector.linear1.weight"
    assert official_to_ours("projector_k.bn1.running_mean") == "target.projector.bn1.running_mean"
    assert official_to_ours("predictor.linear2.bias") == "predictor.linear2.bias"
    assert official_to_ours("queue") is None
    assert ours_to_official("target.head.conv3.weight") == "module.head_k.conv3.weight"


@pytest.mark.parametrize("variant", ["soco_fpn", "soco_star", "soco_c4"])
def test_fake_official_checkpoint_loads_exactly(tmp_path, variant):
    ckpt, ours = official_checkpoint(variant)
    path = tmp_path / "ckpt_epoch_1.pth"
    torch.save(ckpt, path)
    cfg = ModelConfig(**TINY)
    state, report = load_official_state_dict(path, variant, cfg)
    assert set(state) == set(ours)
    for key, value in ours.items():
        assert torch.equal(state[key], value), key
    assert len(report.mapping) == len(ours)
    assert report.dropped == (["module.queue", "module.queue_ptr"] if variant == "soco_c4" else [])
    assert report.meta["epoch"] == 1 and str(path) in report.summary()
    # The result loads strictly into a freshly built model.
    model = build_model(ModelConfig(variant=variant, **TINY))
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.target["projector"].linear1.weight, ckpt["model"]["module.projector_k.linear1.weight"])


def test_checkpoint_without_module_prefix_or_wrapper_loads(tmp_path):
    ckpt, ours = official_checkpoint("soco_fpn")
    bare = {k[len("module.") :]: v for k, v in ckpt["model"].items()}
    state, _ = load_official_state_dict(bare, "soco_fpn", ModelConfig(**TINY))
    assert set(state) == set(ours)


def test_missing_extra_and_mis_shaped_keys_are_named(tmp_path):
    cfg = ModelConfig(**TINY)
    ckpt, _ = official_checkpoint("soco_fpn")
    missing = dict(ckpt["model"])
    del missing["module.neck_k.fpn_convs.3.bn.running_mean"]
    with pytest.raises(
        OfficialCheckpointError, match=r"not in the checkpoint: target\.neck\.fpn_convs\.3\.bn\.running_mean"
    ):
        load_official_state_dict({"model": missing}, "soco_fpn", cfg)

    extra = dict(ckpt["model"], **{"module.roi_avg_pool.weight": torch.zeros(1)})
    with pytest.raises(OfficialCheckpointError, match=r"no mapping: module\.roi_avg_pool\.weight"):
        load_official_state_dict({"model": extra}, "soco_fpn", cfg)

    # A known prefix but a key our model lacks (a 5th FPN level, P6).
    p6 = dict(ckpt["model"], **{"module.neck.fpn_convs.4.conv.weight": torch.zeros(16, 16, 3, 3)})
    with pytest.raises(OfficialCheckpointError, match=r"does not have: online\.neck\.fpn_convs\.4\.conv\.weight"):
        load_official_state_dict({"model": p6}, "soco_fpn", cfg)

    shaped = dict(ckpt["model"], **{"module.head.fc1.weight": torch.zeros(3, 3)})
    with pytest.raises(OfficialCheckpointError, match=r"shape mismatches: online\.head\.fc1\.weight"):
        load_official_state_dict({"model": shaped}, "soco_fpn", cfg)

    # A C4 checkpoint is not an FPN one.
    c4, _ = official_checkpoint("soco_c4")
    with pytest.raises(OfficialCheckpointError, match="online.neck"):
        load_official_state_dict(c4, "soco_fpn", cfg)


def test_unreadable_files_raise_user_errors(tmp_path):
    with pytest.raises(OfficialCheckpointError, match="no such checkpoint"):
        load_official_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "ckpt_epoch_2.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(OfficialCheckpointError, match=r"ckpt_epoch_2\.pth: cannot read"):
        load_official_state_dict(bad)
    with pytest.raises(ValueError, match="variant"):
        load_official_state_dict({"model": {}}, "image_byol")
