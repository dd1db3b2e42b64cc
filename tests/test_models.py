"""SoCo models: state-dict contract, init, RoI scaling, level modes, target network, every variant."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from soco_det.data.levels import correspondence
from soco_det.models import ModelConfig, build_model, convert_sync_bn
from soco_det.models.backbone import ResNetTrunk
from soco_det.models.fpn import FPN
from soco_det.models.roi import roi_align_boxes

TINY = dict(depth=18, fpn_channels=16, head_conv_dim=16, head_fc_dim=32, proj_hidden_dim=32, proj_dim=16)


def tiny(variant="soco_fpn", **kw) -> ModelConfig:
    return ModelConfig(variant=variant, **{**TINY, **kw})


def make_batch(view_sizes, pairs, num_levels, b=2, k=4, seed=0):
    """A random batch in the documented layout (docs/architecture.md, "Batch layout")."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(b, 3, s, s, generator=g) for s in view_sizes]
    boxes, ids, levels, corr = [], [], [], []
    for _ in pairs:
        side_boxes, side_ids, side_levels = [], [], []
        for _side in range(2):
            xy = torch.rand(b, k, 2, generator=g) * 0.6
            wh = torch.rand(b, k, 2, generator=g) * 0.35 + 0.05
            side_boxes.append(torch.cat([xy, xy + wh], dim=-1))
            side_ids.append(torch.randint(1, 4, (b, k), generator=g))  # few ids: some rows match
            low = -1 if num_levels > 1 else 0  # -1: unassigned box
            side_levels.append(torch.randint(low, num_levels, (b, k), generator=g))
        boxes.append(tuple(side_boxes))
        ids.append(tuple(side_ids))
        levels.append(tuple(side_levels))
        corr.append(correspondence(side_ids[0], side_levels[0], side_ids[1], side_levels[1], num_levels))
    return {
        "images": images,
        "pairs": list(pairs),
        "boxes": boxes,
        "ids": ids,
        "levels": levels,
        "corr": corr,
        "index": torch.arange(b),
    }


BATCHES = {
    "soco_fpn": dict(view_sizes=[64, 64, 32], pairs=[(0, 1), (0, 2)], num_levels=4),
    "soco_star": dict(view_sizes=[64, 64, 48, 32], pairs=[(0, 1), (0, 2), (0, 3)], num_levels=4),
    "soco_c4": dict(view_sizes=[64, 64], pairs=[(0, 1)], num_levels=1),
    "image_byol": dict(view_sizes=[64, 64, 32], pairs=[(0, 1), (0, 2)], num_levels=4),
}


# ---------------------------------------------------------------------------- state-dict names


def test_state_dict_names_follow_the_contract():
    model = build_model(tiny())
    keys = list(model.state_dict())
    tv = [k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")]
    assert [k[len("online.encoder.") :] for k in keys if k.startswith("online.encoder.")] == tv
    for i in range(4):
        for part in ("lateral_convs", "fpn_convs"):
            assert f"online.neck.{part}.{i}.conv.weight" in keys
            assert f"online.neck.{part}.{i}.conv.bias" not in keys  # the BN holds the bias
            for bn_key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                assert f"online.neck.{part}.{i}.bn.{bn_key}" in keys
    head = {k for k in keys if k.startswith("online.head.")}
    assert head == {f"online.head.conv{c}.weight" for c in range(1, 5)} | {
        f"online.head.bn{c}.{n}"
        for c in range(1, 5)
        for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    } | {"online.head.fc1.weight", "online.head.fc1.bias"}
    assert "predictor.linear1.weight" in keys and "online.projector.bn1.running_var" in keys
    online = [k[len("online.") :] for k in keys if k.startswith("online.")]
    target = [k[len("target.") :] for k in keys if k.startswith("target.")]
    assert online == target
    assert not any(k.startswith("target.predictor") for k in keys)
    assert set(keys) == {f"online.{k}" for k in online} | {f"target.{k}" for k in target} | {
        k for k in keys if k.startswith("predictor.")
    }


def test_c4_keeps_res5_in_the_encoder_and_has_no_neck():
    keys = list(build_model(tiny("soco_c4")).state_dict())
    tv = [k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")]
    assert [k[len("online.encoder.") :] for k in keys if k.startswith("online.encoder.")] == tv
    assert {k.split(".")[1] for k in keys if k.startswith(("online.", "target."))} == {"encoder", "projector"}


# ---------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("depth, last_bn", [(18, "bn2"), (50, "bn3")])
def test_last_bn_gamma_of_every_block_is_zero(depth, last_bn):
    trunk = ResNetTrunk(depth)
    blocks = [blk for layer in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4) for blk in layer]
    assert blocks
    for blk in blocks:
        assert torch.all(getattr(blk, last_bn).weight == 0)
        assert torch.all(blk.bn1.weight == 1) and torch.all(blk.bn1.bias == 0)
    assert torch.all(trunk.bn1.weight == 1)
    kept = ResNetTrunk(depth, zero_init_residual=False)
    assert torch.all(getattr(kept.layer1[0], last_bn).weight == 1)


def test_conv_init_std_is_sqrt_2_over_fan_out():
    torch.manual_seed(0)
    trunk = ResNetTrunk(18)
    w = trunk.layer4[0].conv2.weight  # 3x3, 512 -> 512: 2.4M samples
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (9 * 512)), rel=0.01)
    neck = FPN((64, 128, 256, 512), 256)
    w = neck.fpn_convs[0].conv.weight  # Kaiming normal, fan_out = 256 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (9 * 256)), rel=0.02)
    assert torch.all(neck.lateral_convs[3].bn.weight == 1) and torch.all(neck.lateral_convs[3].bn.bias == 0)


def test_trunk_outputs_c2_to_c5_or_c4():
    x = torch.randn(1, 3, 64, 64)
    c2, c3, c4, c5 = ResNetTrunk(18).eval()(x)
    assert [tuple(t.shape[1:]) for t in (c2, c3, c4, c5)] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert tuple(ResNetTrunk(18, out="c4").eval()(x).shape) == (1, 256, 4, 4)


# ---------------------------------------------------------------------------- RoI scaling


def ramp_map(h, w):
    """Channel 0 holds each cell's column index, channel 1 its row index: ``[1, 2, h, w]``."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys])[None]


@pytest.mark.parametrize("view", [64, 60])
def test_default_scaling_pools_the_cells_a_pixel_box_covers(view):
    # Stride 8: the pixel box [16, 24) x [32, 40) is exactly cell (col 2, row 4) whatever the view
    # size; a 60-px view has an 8x8 map covering 64 px, so scaling by feature size would miss it.
    feat = ramp_map(8, 8)
    box = torch.tensor([[[16 / view, 32 / view, 24 / view, 40 / view]]])
    pooled = roi_align_boxes(feat, box, (view, view), stride=8, output_size=1)
    assert pooled.shape == (1, 2, 1, 1)
    assert pooled[0, :, 0, 0].tolist() == pytest.approx([2.0, 4.0], abs=1e-5)
    # Per-bin values of a 2x2 output: bin centres at a quarter and three quarters of the cell.
    pooled = roi_align_boxes(feat, box, (view, view), stride=8, output_size=2)
    assert pooled[0, 0, 0].tolist() == pytest.approx([1.75, 2.25], abs=1e-5)
    assert pooled[0, 1, :, 0].tolist() == pytest.approx([3.75, 4.25], abs=1e-5)


def test_legacy_scaling_multiplies_by_feature_map_size():
    feat = ramp_map(8, 8)
    box = torch.tensor([[[16 / 64, 32 / 64, 24 / 64, 40 / 64]]])
    legacy = roi_align_boxes(feat, box, (64, 64), stride=8, output_size=1, legacy=True)
    # View side a multiple of the stride: both conventions agree.
    assert legacy[0, :, 0, 0].tolist() == pytest.approx([2.0, 4.0], abs=1e-5)
    box60 = torch.tensor([[[16 / 60, 32 / 60, 24 / 60, 40 / 60]]])
    legacy60 = roi_align_boxes(feat, box60, (60, 60), stride=8, output_size=1, legacy=True)
    # x * W_feat = x * 8: centre of [16/60*8, 24/60*8] minus aligned's half cell.
    expected = [(16 + 24) / 2 / 60 * 8 - 0.5, (32 + 40) / 2 / 60 * 8 - 0.5]
    assert legacy60[0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert abs(expected[0] - 2.0) > 0.1  # the misalignment the default convention removes


def test_roi_align_runs_in_fp32_under_autocast():
    feat = ramp_map(8, 8).bfloat16()
    box = torch.tensor([[[0.1, 0.1, 0.6, 0.7]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align_boxes(feat, box, (64, 64), stride=8, output_size=7)
    assert out.dtype == torch.float32


# ---------------------------------------------------------------------------- every variant


@pytest.mark.parametrize("variant", ["soco_fpn", "soco_star", "soco_c4", "image_byol"])
def test_forward_backward_every_variant(variant):
    torch.manual_seed(0)
    model = build_model(tiny(variant))
    batch = make_batch(**BATCHES[variant])
    out = model(batch)
    names = [f"{a + 1}-{b + 1}" for a, b in batch["pairs"]]
    assert set(out["pair_losses"]) == set(names) | {f"{n[2]}-{n[0]}" for n in names}
    assert out["loss"].dtype == torch.float32 and out["loss"].dim() == 0
    assert torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in out["pair_losses"].values()), abs=1e-5)
    # Each term lies in [-2, 2]: weighted means of -2 cos.
    assert all(-2.0 - 1e-4 <= v.item() <= 2.0 + 1e-4 for v in out["pair_losses"].values())
    out["loss"].backward()
    assert model.online["encoder"].conv1.weight.grad is not None
    assert model.predictor.linear1.weight.grad.abs().sum() > 0
    for name, p in model.target.named_parameters():
        assert not p.requires_grad and p.grad is None, name


def test_bad_batch_gives_clear_error():
    model = build_model(tiny())
    batch = make_batch(**BATCHES["soco_c4"])  # P = 1 corr for a P = 4 model
    with pytest.raises(ValueError, match=r"batch\['corr'\]\[0\].*P\*K"):
        model(batch)
    batch = make_batch(**BATCHES["soco_fpn"])
    batch["pairs"] = [(0, 5), (0, 2)]
    with pytest.raises(ValueError, match=r"batch\['pairs'\]\[0\]"):
        model(batch)


# ---------------------------------------------------------------------------- level modes


def test_all_levels_and_assigned_level_agree_with_eval_bn():
    torch.manual_seed(0)
    all_levels = build_model(tiny(roi_mode="all_levels"))
    assigned = build_model(tiny(roi_mode="assigned_level"))
    assigned.load_state_dict(all_levels.state_dict())
    # Random running statistics so eval-mode BN is not the identity.
    with torch.no_grad():
        for name, buf in all_levels.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    assigned.load_state_dict(all_levels.state_dict())
    all_levels.eval()
    assigned.eval()
    batch = make_batch(**BATCHES["soco_fpn"], seed=3)
    assert sum(c.sum() for c in batch["corr"]) > 0
    with torch.no_grad():
        a, b = all_levels(batch), assigned(batch)
    for name in a["pair_losses"]:
        assert a["pair_losses"][name].item() == pytest.approx(b["pair_losses"][name].item(), abs=1e-5), name
    assert a["loss"].item() != 0.0


def test_channels_last_gives_the_same_loss():
    torch.manual_seed(0)
    plain = build_model(tiny())
    nhwc = build_model(tiny(channels_last=True))
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.online["encoder"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = make_batch(**BATCHES["soco_fpn"], seed=1)
    with torch.no_grad():
        assert nhwc(batch)["loss"].item() == pytest.approx(plain(batch)["loss"].item(), abs=1e-4)


# ---------------------------------------------------------------------------- target network


def test_target_starts_as_a_copy_and_gets_no_gradient():
    model = build_model(tiny())
    for (n_o, p_o), (n_t, p_t) in zip(model.online.named_parameters(), model.target.named_parameters()):
        assert n_o == n_t and torch.equal(p_o, p_t) and p_o.data_ptr() != p_t.data_ptr()
        assert p_o.requires_grad and not p_t.requires_grad
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for p in model.target.parameters())


def test_update_target_is_the_ema_rule_and_leaves_buffers_alone():
    torch.manual_seed(0)
    model = build_model(tiny())
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
        for buf in model.online.buffers():
            if buf.is_floating_point():
                buf.add_(1.0)
    before = {k: v.clone() for k, v in model.target.state_dict().items()}
    online = dict(model.online.named_parameters())
    tau = 0.9
    model.update_target(tau)
    params = dict(model.target.named_parameters())
    for name, value in model.target.state_dict().items():
        if name in params:
            expected = tau * before[name] + (1 - tau) * online[name].detach()
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
            assert not torch.equal(value, before[name]) or torch.equal(before[name], online[name])
        else:  # BN running statistics and counters: not EMA'd
            assert torch.equal(value, before[name]), name
    model.update_target(1.0)
    torch.testing.assert_close(
        dict(model.target.named_parameters())["encoder.conv1.weight"], params["encoder.conv1.weight"]
    )
    model.update_target(0.0)
    assert torch.equal(model.target["head"].fc1.weight, model.online["head"].fc1.weight)
    with pytest.raises(ValueError, match="momentum"):
        model.update_target(1.5)


def test_convert_sync_bn_keeps_names_and_pairing():
    model = build_model(tiny())
    keys = list(model.state_dict())
    model = convert_sync_bn(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(getattr(m, "sync", False) for m in bns)
    assert any(getattr(m, "sync", False) for m in model.target.modules())
    assert list(model.state_dict()) == keys
    model.update_target(0.0)
    assert torch.equal(model.target["neck"].fpn_convs[0].bn.weight, model.online["neck"].fpn_convs[0].bn.weight)


def test_converted_sync_bn_model_gives_the_plain_models_loss_and_gradients():
    # The CPU half of tests/test_gpu.py's SyncBN check: without a process group SyncBatchNorm
    # normalises like BatchNorm, so equal results mean the conversion carried every weight and buffer.
    torch.manual_seed(0)
    plain = build_model(tiny())
    synced = convert_sync_bn(copy.deepcopy(plain))
    batch = make_batch(**BATCHES["soco_fpn"], b=4)
    loss_plain, loss_sync = plain(batch)["loss"], synced(batch)["loss"]
    torch.testing.assert_close(loss_sync, loss_plain, rtol=1e-5, atol=1e-6)
    loss_plain.backward()
    loss_sync.backward()
    for (name, p), q in zip(plain.named_parameters(), synced.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)  # running statistics updated alike


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="depth"):
        ModelConfig(depth=42).validate()
    with pytest.raises(ValueError, match="num_levels"):
        ModelConfig(num_levels=3).validate()
    with pytest.raises(ValueError, match="roi_output_size"):
        ModelConfig(variant="soco_c4", roi_output_size=7).validate()
    assert ModelConfig(variant="soco_c4").resolved_roi_output_size() == 14
    assert ModelConfig().resolved_roi_output_size() == 7


def test_pair_loss_equals_a_box_by_box_recomputation():
    """Level-major rows, corr orientation and the online/target split, checked one RoI at a time."""
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    model = build_model(tiny()).eval()  # eval BN: each RoI's embedding is independent of the batch
    with torch.no_grad():
        for p in model.target.parameters():  # a target that differs from the online network
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(view_sizes=[64, 48], pairs=[(0, 1)], num_levels=4, seed=7)
    with torch.no_grad():
        out = model(batch)

        def rows(net, view, boxes, predict):
            image = batch["images"][view]
            pyramid = net["neck"](net["encoder"](image))
            size = image.shape[-1]
            vecs = torch.zeros(image.shape[0], 4 * boxes.shape[1], 16)
            for n in range(image.shape[0]):
                for p, stride in enumerate((4, 8, 16, 32)):
                    for i in range(boxes.shape[1]):
                        roi = torch.cat([torch.tensor([float(n)]), boxes[n, i] * size / stride])[None]
                        v = net["projector"](net["head"](roi_align(pyramid[p], roi, 7, 1.0, -1, True)))
                        vecs[n, p * boxes.shape[1] + i] = (model.predictor(v) if predict else v)[0]
            return vecs

        box_a, box_b = batch["boxes"][0]
        p_a, p_b = rows(model.online, 0, box_a, True), rows(model.online, 1, box_b, True)
        z_a, z_b = rows(model.target, 0, box_a, False), rows(model.target, 1, box_b, False)
    corr = batch["corr"][0]
    assert corr.sum() > 0

    def reference_directional(pred, target, c):
        per_image = []
        for n in range(c.shape[0]):
            matches = [(i, j) for i in range(c.shape[1]) for j in range(c.shape[2]) if c[n, i, j] > 0]
            cos = sum(torch.cosine_similarity(pred[n, i], target[n, j], dim=0).item() for i, j in matches)
            per_image.append(cos / (len(matches) + 1e-6))
        return -2.0 * sum(per_image) / len(per_image)

    assert out["pair_losses"]["1-2"].item() == pytest.approx(reference_directional(p_a, z_b, corr), abs=1e-5)
    assert out["pair_losses"]["2-1"].item() == pytest.approx(
        reference_directional(p_b, z_a, corr.transpose(1, 2)), abs=1e-5
    )
