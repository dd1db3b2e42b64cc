"""Distributed training on CPU (gloo), launched with torchrun as a user would.

BatchNorm: most runs use ``train.freeze_bn=true`` (BN on running statistics): then the gradient
of the 2-process run (each process half of the global batch, gradients averaged by DDP) equals the single-process gradient over the whole
global batch, and the parameters after a few steps must agree within float tolerance. The SyncBN
test trains BN on batch statistics, synchronised over gloo (soco_det.models.segment_bn).
"""

import socket

import pytest
import torch

from engine_fixtures import TINY_OVERRIDES, model_state, run_cli, sample_data, tiny_config  # noqa: F401
from soco_det.engine.distributed import ResumableSampler
from soco_det.engine.metrics import read_metrics
from soco_det.engine.trainer import pretrain

STEPS = ["train.max_steps=2", "train.freeze_bn=true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_errors(stderr: str) -> str:
    """The workers' own error lines (torchrun's summary at the end hides them)."""
    lines = [l for l in stderr.splitlines() if "Error" in l or "error:" in l or l.startswith("  File")]
    return "\n".join(lines[-40:]) or stderr[-3000:]


def cli_args(data, out, *extra):
    return ["pretrain", "--recipe", "tiny_cpu", "--images", str(data["images"]), "--proposals",
            str(data["proposals"]), "-o", str(out), "--device", "cpu", *TINY_OVERRIDES, *STEPS, *extra]


def test_two_processes_equal_one_process_over_the_same_global_batch(sample_data, tmp_path):
    single = pretrain(tiny_config(sample_data, *STEPS, "data.batch_size=4"), tmp_path / "single")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    proc = run_cli(cli_args(sample_data, tmp_path / "ddp", "data.batch_size=2"), launcher=launcher)
    assert proc.returncode == 0, worker_errors(proc.stderr)

    a, b = model_state(single), model_state(tmp_path / "ddp")
    assert a["step"] == b["step"] == 2
    # 8 images / global batch 4: both steps used the whole epoch, the next run starts epoch 1
    assert a["sampler"] == b["sampler"] and a["epoch"] == b["epoch"] == 1
    assert b["config"]["data"]["batch_size"] == 2
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # The weights moved: the target (an EMA that lags the online network) no longer equals it.
    drift = a["model"]["online.encoder.conv1.weight"] - a["model"]["target.encoder.conv1.weight"]
    assert drift.abs().max() > 0
    # Metrics are written once (rank 0) and hold the mean over processes.
    la, lb = read_metrics(single), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in lb] == [1, 2]
    assert lb[0]["loss"] == pytest.approx(la[0]["loss"], abs=1e-5)


@pytest.mark.slow
def test_sync_bn_two_processes_equal_one_process_with_bn_training(sample_data, tmp_path):
    """Segment-wise SyncBN over gloo, BN *not* frozen: per-call (per-segment) statistics are taken
    over the global batch, so 2 processes x 2 images equal 1 process x 4 images: weights and the
    BN running statistics after 2 steps."""
    steps = ["train.max_steps=2", "model.sync_bn=true"]
    single = pretrain(tiny_config(sample_data, *steps, "data.batch_size=4"), tmp_path / "single")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    args = cli_args(sample_data, tmp_path / "ddp", "data.batch_size=2")
    args = [a for a in args if a not in STEPS] + steps
    proc = run_cli(args, launcher=launcher, timeout=300)
    assert proc.returncode == 0, worker_errors(proc.stderr)
    a, b = model_state(single), model_state(tmp_path / "ddp")
    assert a["step"] == b["step"] == 2
    n_stats = 0
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        n_stats += name.endswith("running_var")
    assert n_stats > 50
    # the statistics moved away from their initial values: BN really trained on batch statistics
    assert not torch.allclose(a["model"]["online.head.bn1.running_var"], torch.ones(16))
    assert read_metrics(tmp_path / "ddp")[0]["loss"] == pytest.approx(read_metrics(single)[0]["loss"], abs=1e-5)


def test_per_process_statistics_would_differ():
    """BN statistics over 2 of the 4 images are not those over 4: the SyncBN test above can fail."""
    import copy

    from soco_det.models import build_model
    from test_models import BATCHES, make_batch, tiny

    torch.manual_seed(0)
    whole = build_model(tiny()).train()
    half = copy.deepcopy(whole)
    batch = make_batch(**BATCHES["soco_fpn"], b=4)
    first = {**batch, "images": [t[:2] for t in batch["images"]], "corr": [t[:2] for t in batch["corr"]],
             "boxes": [tuple(t[:2] for t in side) for side in batch["boxes"]]}
    whole(batch)
    half(first)
    diff = half.online["head"].bn1.running_var - whole.online["head"].bn1.running_var
    assert diff.abs().max() > 1e-4


def test_two_nodes_on_loopback_train(sample_data, tmp_path):
    import subprocess
    import sys
    import os

    from engine_fixtures import REPO

    port = free_port()
    procs = []
    for node in (0, 1):
        launcher = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                    "--master_addr=127.0.0.1", f"--master_port={port}"]
        cmd = [sys.executable, *launcher, "-m", "soco_det",
               *cli_args(sample_data, tmp_path / "run", "data.batch_size=2")]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, worker_errors(err)
    ckpt = model_state(tmp_path / "run")
    assert ckpt["step"] == 2 and ckpt["epoch"] == 1
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_sampler_shards_cover_the_single_process_order_and_resume_mid_epoch():
    n, world = 11, 2
    single = ResumableSampler(n, 1, 0, seed=5)
    shards = [ResumableSampler(n, world, r, seed=5) for r in range(world)]
    for s in (single, *shards):
        s.set_epoch(3)
    order = single.indices()[: (n // world) * world]
    # consecutive global batches of 4 = the union of each rank's batches of 2
    for start in range(0, 8, 4):
        union = sorted(i for s in shards for i in s.indices()[start // world : start // world + 2])
        assert union == sorted(order[start : start + 4])
    # resume: the state stores the global position; a new sampler continues where the old one stopped
    shards[0].position = 2
    resumed = ResumableSampler(n, world, 0, seed=5)
    resumed.load_state_dict(shards[0].state_dict())
    assert resumed.epoch == 3 and list(resumed) == shards[0].indices()[2:]
    assert len(resumed) == n // world - 2
    other = ResumableSampler(n, world, 0, seed=5)
    other.set_epoch(4)
    assert other.indices() != shards[0].indices()  # a new permutation each epoch


def test_gradient_accumulation_equals_one_large_batch(sample_data, tmp_path):
    # 2 micro-batches of 2 per step = one batch of 4 (BN frozen, as in the 2-process test).
    big = pretrain(tiny_config(sample_data, *STEPS, "data.batch_size=4"), tmp_path / "big")
    acc = pretrain(tiny_config(sample_data, *STEPS, "data.batch_size=2", "train.accum_steps=2"), tmp_path / "acc")
    a, b = model_state(big), model_state(acc)
    assert a["step"] == b["step"] == 2 and b["epoch"] == 1
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert read_metrics(acc)[0]["loss"] == pytest.approx(read_metrics(big)[0]["loss"], abs=1e-5)
