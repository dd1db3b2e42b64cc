"""Checks that need a CUDA device (run by benchmarks/gpu_check.sh on a GPU machine; skipped here).

SyncBN (soco_det.models.segment_bn, sync=True) on NCCL: on a one-process group the synchronised
statistics equal plain BatchNorm's, so the converted model (wrapped in DDP as the engine does) must
give the plain model's loss and gradients; the synced arithmetic itself is checked against separate
calls on CUDA, and the batched calls against separate calls under bf16. AMP (bf16, fp16 + GradScaler) and the
device photometric path are checked through the real ``soco-det pretrain`` command.

Each claim also has a CPU test that runs everywhere: the conversion in
``test_models.py::test_converted_sync_bn_model_gives_the_plain_models_loss_and_gradients`` (without
the synchronisation, which has no CPU path), autocast and the AMP/device-photometric pretraining
paths in ``test_amp.py`` (CPU bf16 and fp16 autocast, fp16 with the GradScaler).
"""

from __future__ import annotations

import copy
import json
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nccl_group():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _to(batch, device):
    from soco_det.engine.trainer import move_to

    return move_to(batch, torch.device(device))


def test_sync_bn_conversion_equals_plain_bn_on_one_process(nccl_group):
    from test_models import BATCHES, make_batch, tiny
    from torch.nn.parallel import DistributedDataParallel

    from soco_det.models import build_model, convert_sync_bn

    torch.manual_seed(0)
    plain = build_model(tiny()).cuda()
    synced = convert_sync_bn(copy.deepcopy(plain)).cuda()
    bns = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.sync for m in bns)
    ddp = DistributedDataParallel(synced, device_ids=[0], broadcast_buffers=False, find_unused_parameters=True)

    batch = _to(make_batch(**BATCHES["soco_fpn"], b=4), "cuda")
    loss_plain = plain(batch)["loss"]
    loss_sync = ddp(batch)["loss"]
    torch.testing.assert_close(loss_sync, loss_plain, rtol=1e-4, atol=1e-5)
    loss_plain.backward()
    loss_sync.backward()
    for (name, p), q in zip(plain.named_parameters(), synced.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_loss_fp32_and_finite(dtype):
    from test_models import BATCHES, make_batch, tiny

    from soco_det.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny()).cuda()
    batch = _to(make_batch(**BATCHES["soco_fpn"], b=4), "cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = model(batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    with torch.no_grad():
        ref = model(batch)["loss"]
    torch.testing.assert_close(out["loss"], ref, rtol=5e-2, atol=5e-2)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from soco_det.proposals import compute_store
    from soco_det.synth import generate

    root = tmp_path_factory.mktemp("gpu_scenes")
    paths = generate(root, n_unlabeled=16, n_train=0, n_val=0, short_side=128)
    store = compute_store(paths["images"] / "unlabeled", root / "proposals")
    return paths["images"] / "unlabeled", store


@pytest.mark.parametrize(
    "extra",
    [
        ["train.loop.amp=bf16"],
        ["train.loop.amp=fp16"],
        ["train.loop.amp=bf16", "data.photometric=device", "model.channels_last=true"],
    ],
    ids=["bf16", "fp16-gradscaler", "bf16-device-photometric"],
)
def test_pretrain_command_trains_on_cuda(scenes, tmp_path, extra):
    from soco_det.commands.main import main

    images, store = scenes
    run = tmp_path / "run"
    rc = main(
        [
            "pretrain",
            "--recipe",
            "tiny_cpu",
            "--images",
            str(images),
            "--proposals",
            str(store),
            "-o",
            str(run),
            "train.loop.device=cuda",
            "train.loop.max_steps=4",
            "data.batch_size=8",
            "data.num_workers=0",
            *extra,
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (run / "checkpoints" / "last.pt").is_file()


def test_synced_segment_bn_on_nccl_equals_separate_calls(nccl_group):
    from soco_det.models.segment_bn import convert_segment_bn

    torch.manual_seed(0)
    parts = [torch.randn(8, 16, 7, 7, device="cuda") * (1 + k) + k for k in range(4)]
    ref_bn = torch.nn.BatchNorm2d(16).cuda()
    bn = convert_segment_bn(copy.deepcopy(ref_bn), sync=True)
    ref_out = torch.cat([ref_bn(x) for x in parts])
    out = bn._synced(torch.cat(parts).contiguous(memory_format=torch.channels_last), 4)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_batched_calls_equal_separate_calls_on_cuda(amp):
    import dataclasses

    from test_models import BATCHES, make_batch, tiny

    from soco_det.models import build_model

    torch.manual_seed(0)
    batched = build_model(tiny(channels_last=True)).cuda().to(memory_format=torch.channels_last)
    separate = copy.deepcopy(batched)
    separate.cfg = dataclasses.replace(batched.cfg, batched_calls=False)
    batch = _to(make_batch(**BATCHES["soco_fpn"], b=4), "cuda")
    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        lb, ls = batched(batch)["loss"], separate(batch)["loss"]
    tol = 1e-4 if amp is None else 3e-2
    torch.testing.assert_close(lb, ls, rtol=tol, atol=tol)
    lb.backward()
    ls.backward()
    for (name, p), q in zip(batched.named_parameters(), separate.parameters()):
        if q.grad is not None:
            assert (p.grad - q.grad).abs().max() <= (1e-3 if amp is None else 1e-1) * q.grad.abs().max() + 1e-5, name
