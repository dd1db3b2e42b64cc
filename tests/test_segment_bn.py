"""Segment-wise BatchNorm and the batched SoCo calls: equal to separate calls, in the official order.

The reference for a batched call with S segments is S separate calls of plain ``nn.BatchNorm``
(or of the model with ``batched_calls=false``): outputs, input/parameter gradients, running
statistics and ``num_batches_tracked`` must agree to fp32 rounding.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from soco_det.models import build_model
from soco_det.models.roi import roi_align_boxes
from soco_det.models.segment_bn import SegmentBatchNorm1d, SegmentBatchNorm2d, bn_segments, convert_segment_bn
from soco_det.models.soco import side_order
from test_models import BATCHES, make_batch, tiny


def _random_bn(cls, c, momentum=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = cls(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


@pytest.mark.parametrize(
    "shape, plain, seg, channels_last, momentum",
    [
        ((4, 6, 5, 5), nn.BatchNorm2d, SegmentBatchNorm2d, False, 0.1),
        ((4, 6, 5, 5), nn.BatchNorm2d, SegmentBatchNorm2d, True, 0.1),
        ((4, 6, 3, 7), nn.BatchNorm2d, SegmentBatchNorm2d, False, None),  # cumulative average
        ((8, 6), nn.BatchNorm1d, SegmentBatchNorm1d, False, 0.1),
    ],
    ids=["2d", "2d-channels-last", "2d-cumulative", "1d"],
)
def test_segments_equal_separate_calls(shape, plain, seg, channels_last, momentum):
    s = 3
    torch.manual_seed(1)
    # segments with different means/scales, so pooled statistics would be visibly wrong
    parts = [torch.randn(shape) * (1 + k) + 3 * k for k in range(s)]
    ref_bn = _random_bn(plain, shape[1], momentum)
    bn = convert_segment_bn(copy.deepcopy(ref_bn))
    assert type(bn) is seg and isinstance(bn, plain)

    ref_in = [p.clone().requires_grad_() for p in parts]
    ref_out = torch.cat([ref_bn(x) for x in ref_in])  # S separate calls, in order
    x = torch.cat(parts)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with bn_segments([bn], s):
        out = bn(x)
    assert bn.segments == 1  # restored on exit
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref_out)
    ref_out.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(x.grad, torch.cat([r.grad for r in ref_in]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-6, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == s
    # one segment: exactly plain BatchNorm; eval mode: the running statistics (equal up to rounding)
    with torch.no_grad():
        torch.testing.assert_close(bn(parts[0]), ref_bn(parts[0]), rtol=0, atol=0)
        bn.eval(), ref_bn.eval()
        torch.testing.assert_close(bn(x), ref_bn(x), rtol=1e-5, atol=1e-5)


def test_pooled_statistics_would_differ():
    """The check above can fail: one plain call over the whole batch is not the separate calls."""
    parts = [torch.randn(4, 6, 5, 5) + 3 * k for k in range(2)]
    bn = _random_bn(nn.BatchNorm2d, 6)
    separate = torch.cat([copy.deepcopy(bn)(p) for p in parts])
    assert (bn(torch.cat(parts)) - separate).abs().max() > 0.5


def test_uneven_rows_are_rejected():
    bn = convert_segment_bn(nn.BatchNorm1d(4))
    with bn_segments([bn], 3), pytest.raises(ValueError, match="3 equal segments"):
        bn(torch.randn(4, 4))


def test_conversion_keeps_names_and_objects():
    model = build_model(tiny())
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules())
    bn = model.online["head"].bn1
    assert isinstance(bn, SegmentBatchNorm2d) and isinstance(bn, nn.BatchNorm2d)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    keys, weight = list(plain.state_dict()), plain[1].weight
    convert_segment_bn(plain)
    assert list(plain.state_dict()) == keys and plain[1].weight is weight


# --------------------------------------------------------------------------- the model


def _pair(variant, backbone=True, **kw):
    torch.manual_seed(0)
    batched = build_model(tiny(variant, batched_backbone=backbone, **kw)).train()
    assert batched.cfg.batched_calls  # the default
    separate = copy.deepcopy(batched)
    separate.cfg = dataclasses.replace(batched.cfg, batched_calls=False)
    return batched, separate


@pytest.mark.parametrize(
    "variant, backbone", [("soco_fpn", True), ("soco_fpn", False), ("soco_star", True), ("soco_c4", True)]
)
def test_batched_calls_equal_separate_calls(variant, backbone):
    torch.set_num_threads(1)
    batched, separate = _pair(variant, backbone)
    batch = make_batch(**BATCHES[variant], b=3)
    out_b, out_s = batched(batch), separate(batch)
    torch.testing.assert_close(out_b["loss"], out_s["loss"], rtol=1e-5, atol=1e-6)
    for name in out_s["pair_losses"]:
        torch.testing.assert_close(out_b["pair_losses"][name], out_s["pair_losses"][name], rtol=1e-5, atol=1e-6)
    out_b["loss"].backward()
    out_s["loss"].backward()
    n_grads = 0
    for (name, p), q in zip(batched.named_parameters(), separate.parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        n_grads += 1
        # relative to the tensor's largest gradient (fp32 rounding of sums in another order); the
        # absolute term is for gradients that are 0 up to rounding (a Linear bias before a BN)
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max() + 2e-6, name
    assert n_grads > 50
    for (name, x), y in zip(batched.named_buffers(), separate.buffers()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(x, y), name


def test_assigned_level_is_unchanged_by_the_option():
    batched, separate = _pair("soco_fpn", roi_mode="assigned_level")
    batch = make_batch(**BATCHES["soco_fpn"], b=3)
    torch.testing.assert_close(batched(batch)["loss"], separate(batch)["loss"], rtol=1e-5, atol=1e-6)


def test_side_order_is_the_official_call_order():
    assert side_order([(0, 1), (0, 2)]) == [(0, 0, 0), (0, 1, 0), (1, 0, 1), (2, 1, 1)]
    assert [v for v, _, _ in side_order([(0, 1), (0, 2), (0, 3)])] == [0, 0, 0, 1, 2, 3]


def _head_bn1_reference(model, batch, order):
    """``online.head.bn1.running_mean`` after calls in ``order`` ((view, pair, side) per call, four
    levels each), computed by hand: RoIAlign -> conv1 -> r <- 0.9 r + 0.1 mean, one call at a time."""
    net = copy.deepcopy(model.online)
    mean = net["head"].bn1.running_mean.clone()
    with torch.no_grad():
        for v, k, s in order:
            pyramid = net["neck"](net["encoder"](batch["images"][v]))
            for feat, stride in zip(pyramid, model.strides):
                rois = roi_align_boxes(
                    feat, batch["boxes"][k][s], tuple(batch["images"][v].shape[-2:]), stride, model.roi_output_size
                )
                x = net["head"].conv1(rois)
                mean = 0.9 * mean + 0.1 * x.mean(dim=(0, 2, 3))
    return mean


@pytest.mark.parametrize("batched_calls", [True, False])
def test_head_running_stats_follow_the_official_order(batched_calls):
    """After one forward, the head's running mean is that of the official sequence of calls
    (V1-12, V1-13, V2, V3), not the pair-by-pair order (V1-12, V2, V1-13, V3)."""
    torch.set_num_threads(1)
    model = build_model(tiny(batched_calls=batched_calls)).train()
    batch = make_batch(**BATCHES["soco_fpn"], b=3)
    official = _head_bn1_reference(model, batch, [(0, 0, 0), (0, 1, 0), (1, 0, 1), (2, 1, 1)])
    pair_by_pair = _head_bn1_reference(model, batch, [(0, 0, 0), (1, 0, 1), (0, 1, 0), (2, 1, 1)])
    assert (official - pair_by_pair).abs().max() > 1e-3  # the order is visible in the statistic
    model(batch)
    torch.testing.assert_close(model.online["head"].bn1.running_mean, official, rtol=1e-5, atol=1e-6)
    assert int(model.online["head"].bn1.num_batches_tracked) == 16
    assert int(model.target["head"].bn1.num_batches_tracked) == 16
    assert int(model.online["encoder"].bn1.num_batches_tracked) == 3  # one backbone call per view


def test_synced_statistics_equal_separate_calls_on_a_gloo_group():
    """The SyncBN arithmetic (all-gather of per-segment mean/var/count, Chan's merge, autograd
    through the gather) on a 1-process gloo group; 2 processes: tests/test_ddp.py."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        s = 4
        parts = [torch.randn(3, 5, 4, 4) * (1 + k) + k for k in range(s)]
        ref_bn = _random_bn(nn.BatchNorm2d, 5)
        bn = convert_segment_bn(copy.deepcopy(ref_bn), sync=True)
        ref_in = [p.clone().requires_grad_() for p in parts]
        ref_out = torch.cat([ref_bn(x) for x in ref_in])
        x = torch.cat(parts).requires_grad_()
        out = bn._synced(x, s)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_out.backward(grad)
        torch.testing.assert_close(x.grad, torch.cat([r.grad for r in ref_in]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
