"""Mixed precision on the CPU: what stays fp32 under autocast, and the AMP paths of `soco-det pretrain`.

tests/test_gpu.py holds the same claims on CUDA; these CPU versions run everywhere. Under
``torch.autocast`` BatchNorm is not cast up: its input and output are in the autocast dtype, but its
weights and running statistics stay fp32 and its batch statistics are accumulated in fp32 (the CPU
kernel's mixed-type path, as cuDNN's on CUDA). RoIAlign and the loss are cast up explicitly.
"""

from __future__ import annotations

import json

import pytest
import torch
from engine_fixtures import TINY_OVERRIDES, sample_data  # noqa: F401
from test_models import BATCHES, make_batch, tiny
from torch import nn

from soco_det.commands.main import main
from soco_det.models import build_model


def test_batchnorm_under_cpu_bf16_autocast_computes_its_statistics_in_fp32():
    torch.manual_seed(0)
    # one backbone call per view (model.batched_calls=false), so that each call is one plain BN step
    model = build_model(tiny(batched_calls=False))
    bn = model.online["encoder"].bn1
    calls = []  # (input, output, running stats before, after) of each call (one per view)

    def before(module, inp):
        calls.append([inp[0].detach().clone(), None, module.running_mean.clone(), module.running_var.clone()])

    def after(module, inp, out):  # clone: the ReLU that follows works in place
        calls[-1][1:2] = [out.detach().clone()]
        calls[-1] += [module.running_mean.clone(), module.running_var.clone()]

    bn.register_forward_pre_hook(before)
    bn.register_forward_hook(after)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(make_batch(**BATCHES["soco_fpn"], b=4))
    assert len(calls) == 3
    for x, y, mean0, var0, mean1, var1 in calls:
        assert x.dtype == y.dtype == torch.bfloat16  # BN's input and output follow autocast ...
        assert bn.weight.dtype == mean1.dtype == var1.dtype == torch.float32
        # ... its statistics are those of fp32 arithmetic on that bf16 input (momentum 0.1) ...
        mean, var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(mean1.double(), 0.9 * mean0.double() + 0.1 * mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(var1.double(), 0.9 * var0.double() + 0.1 * var, rtol=1e-5, atol=1e-7)
        # ... and its output is the fp32 result rounded once to bf16 (half a bf16 ulp: 2**-9 relative).
        ref = nn.functional.batch_norm(
            x.float(), None, None, bn.weight.detach(), bn.bias.detach(), training=True, eps=bn.eps
        )
        torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-3)


def test_batchnorm_statistics_would_be_wrong_in_bf16_arithmetic():
    # What the test above rules out: summing bf16 values in bf16 loses the mean of a large map.
    x = (torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.5 + 30).bfloat16()
    bn = nn.BatchNorm2d(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bn(x)
    exact = x.double().mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * exact, rtol=1e-5, atol=0)
    in_bf16 = x.sum((0, 2, 3), dtype=torch.bfloat16).double() / x[:, 0].numel()
    assert ((in_bf16 - exact).abs() > 1e-3).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_loss_under_cpu_autocast_is_fp32_finite_and_close_to_full_precision(dtype):
    torch.manual_seed(0)
    model = build_model(tiny())
    batch = make_batch(**BATCHES["soco_fpn"], b=4)
    with torch.no_grad():
        ref = model(batch)["loss"]
    with torch.autocast("cpu", dtype=dtype):
        out = model(batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"], ref, rtol=5e-2, atol=5e-2)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "extra",
    [
        ["train.loop.amp=bf16"],
        ["train.loop.amp=fp16"],
        ["train.loop.amp=bf16", "data.photometric=device", "model.channels_last=true"],
    ],
    ids=["bf16", "fp16-gradscaler", "bf16-device-photometric-channels-last"],
)
def test_pretrain_command_with_amp_on_cpu(sample_data, tmp_path, extra):
    run = tmp_path / "run"
    args = [
        "pretrain",
        "--recipe",
        "tiny_cpu",
        "--images",
        str(sample_data["images"]),
        "--proposals",
        str(sample_data["proposals"]),
        "-o",
        str(run),
        "--device",
        "cpu",
        *TINY_OVERRIDES,
        "train.loop.max_steps=2",
        *extra,
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    # fp16 needs the GradScaler (its state is saved and its scale is live); the others disable it.
    assert bool(ckpt["scaler"]) == ("train.loop.amp=fp16" in extra)
