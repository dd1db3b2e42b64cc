"""Distributed training on CPU (gloo), launched with torchrun as a user would.

BatchNorm stays in training mode. Without ``model.sync_bn`` each process normalises with the
statistics of its own half of the global batch. The single-process run that
must give the same result is therefore not "one batch of 4" but gradient accumulation over two
micro-batches of 2 in which micro-batch r holds exactly the images process r gets
(:class:`RankMajorSampler`): every BN layer then sees the same images in both runs, DDP's
average of the two processes' gradients equals the accumulated mean, and the runs may differ only
by float rounding (reduction order). The accumulation itself is checked against one large batch
with frozen BN (there, and only there, the split does not matter).

What is compared, relative to its own size so that small weights and small steps cannot hide a
wrong gradient: the SGD momentum buffers (for 1-D parameters the raw gradients, for LARS weights
the trust-ratio-scaled ones, summed over the steps) and the parameter updates ``w_N - w_0``.
``test_the_comparison_tells_batchnorm_groupings_apart`` shows the tolerance is tight enough to
catch a gradient that is only slightly off: the same data grouped differently in BN fails it.

With ``model.sync_bn=true`` BN statistics are synchronised over gloo per call (segment-wise SyncBN,
soco_det.models.segment_bn): then 2 processes equal one process over the whole global batch
(``test_sync_bn_two_processes_equal_one_process_with_bn_training``).
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from engine_fixtures import REPO, TINY_OVERRIDES, model_state, pretrain_cli_args, run_cli, sample_data, tiny_config  # noqa: F401
from soco_det.engine import distributed as dist_utils
from soco_det.engine.distributed import ResumableSampler
from soco_det.engine.metrics import read_metrics
from soco_det.engine.trainer import Hook, pretrain

WORLD, PER_PROCESS = 2, 2
# 8 images / global batch 4 = 2 steps per epoch: 4 steps cross an epoch boundary. No warmup and a
# larger lr, so that every weight moves well above float rounding between the runs.
STEPS = ["train.max_steps=4", "train.warmup_epochs=0", "train.base_lr=16"]
# Observed: 0 between DDP and its reference (the same sums: (g0 + g1) / 2 == g0 / 2 + g1 / 2), up to
# 2e-4 between accumulation and one large batch (summation order); BN grouped differently: ~30.
RTOL = 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_errors(stderr: str) -> str:
    """The workers' own error lines (torchrun's summary at the end hides them)."""
    lines = [line for line in stderr.splitlines() if "Error" in line or "error:" in line or line.startswith("  File")]
    return "\n".join(lines[-40:]) or stderr[-3000:]


def cli_args(data, out, *extra):
    return pretrain_cli_args(data, out, *STEPS, *extra)


class RankMajorSampler(ResumableSampler):
    """One process's stand-in for ``WORLD`` processes: within each global batch, the images of
    process 0 first, then those of process 1 (``perm[r::WORLD]`` per global batch)."""

    def indices(self) -> list[int]:
        perm, step = super().indices(), WORLD * PER_PROCESS
        out: list[int] = []
        for start in range(0, len(perm) - len(perm) % step, step):
            chunk = perm[start : start + step]
            for r in range(WORLD):
                out += chunk[r::WORLD]
        return out


class InitialWeights(Hook):
    def before_train(self, trainer) -> None:  # noqa: ANN001
        self.state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def relative_errors(a: dict, b: dict, init: dict) -> dict[str, tuple[float, float]]:
    """Per tensor: (momentum-buffer error, update error), each ``||x_b - x_a|| / ||x_a||``.

    Parameters only (BN running statistics are per process under DDP and unused in training mode).
    Fails if a parameter has no gradient or most did not move: the comparison would be empty.
    """
    names = [n for n, p in init.items() if p.is_floating_point() and "running_" not in n]
    params = [n for n in names if not n.startswith("target.")]
    buffers_a = {i: s["momentum_buffer"] for i, s in a["optimizer"]["state"].items()}
    buffers_b = {i: s["momentum_buffer"] for i, s in b["optimizer"]["state"].items()}
    assert buffers_a.keys() == buffers_b.keys()
    out = {}
    for name in names:
        step_a = a["model"][name] - init[name]
        step_b = b["model"][name] - init[name]
        # Floor: a step below ~100 float32 ulps of the weight is rounding (a BN gamma of 1 that
        # gets a 1e-8 gradient stays 1); its gradient is still compared through the buffer.
        scale = max(float(step_a.norm()), 1e-5 * float(init[name].norm()))
        out[name] = (0.0, float((step_b - step_a).norm()) / scale)
    moved = sum(float((a["model"][n] - init[n]).norm()) > 0 for n in names)
    assert moved > 0.9 * len(names), f"only {moved} of {len(names)} tensors moved"
    # Optimizer state is indexed by parameter order: 1-D parameters first, then the LARS group (lars.py).
    order = [n for n in params if init[n].ndim <= 1] + [n for n in params if init[n].ndim > 1]
    assert len(order) == len(buffers_a), (len(order), len(buffers_a))
    for i, name in enumerate(order):
        buf_a, buf_b = buffers_a[i], buffers_b[i]
        assert buf_a.shape == init[name].shape and buf_a.norm() > 0, name
        out[name] = (float((buf_b - buf_a).norm() / buf_a.norm()), out[name][1])
    return out


def worst(errors: dict[str, tuple[float, float]]) -> tuple[str, float]:
    name = max(errors, key=lambda n: max(errors[n]))
    return name, max(errors[name])


@pytest.fixture(scope="module")
def reference(sample_data, tmp_path_factory):
    """Single process, BN training, micro-batch r = process r's images; and the initial weights."""
    out = tmp_path_factory.mktemp("ddp") / "single"
    hook = InitialWeights()
    mp = pytest.MonkeyPatch()
    mp.setattr(dist_utils, "ResumableSampler", RankMajorSampler)
    try:
        pretrain(
            tiny_config(sample_data, *STEPS, f"data.batch_size={PER_PROCESS}", f"train.accum_steps={WORLD}"),
            out,
            hooks=[hook],
        )
    finally:
        mp.undo()
    return out, hook.state


def test_two_processes_equal_one_process_with_the_same_batchnorm_groups(sample_data, reference, tmp_path):
    single, init = reference
    launcher = [
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]
    # A generous timeout: 4 steps in 2 processes take ~20 s on an idle machine, minutes on a loaded one.
    proc = run_cli(
        cli_args(sample_data, tmp_path / "ddp", f"data.batch_size={PER_PROCESS}"), launcher=launcher, timeout=900
    )
    assert proc.returncode == 0, worker_errors(proc.stderr)

    a, b = model_state(single), model_state(tmp_path / "ddp")
    assert a["step"] == b["step"] == 4
    assert a["epoch"] == b["epoch"] == 2 and a["sampler"] == b["sampler"]
    assert b["config"]["data"]["batch_size"] == PER_PROCESS and not b["config"]["train"]["freeze_bn"]
    errors = relative_errors(a, b, init)
    assert any(n.startswith("target.") for n in errors) and any(".bn" in n for n in errors)
    name, err = worst(errors)
    assert err < RTOL, f"{name}: relative error {err:.2e} (buffer, update) = {errors[name]}"
    # Metrics are written once (rank 0) and hold the mean over processes.
    la, lb = read_metrics(single), read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)


def test_the_comparison_tells_batchnorm_groupings_apart(sample_data, reference, tmp_path):
    # Same images, same steps, but the micro-batches group them as the plain sampler order does:
    # only the BatchNorm statistics differ, and the comparison above must see it.
    single, init = reference
    other = pretrain(
        tiny_config(sample_data, *STEPS, f"data.batch_size={PER_PROCESS}", f"train.accum_steps={WORLD}"),
        tmp_path / "other",
    )
    name, err = worst(relative_errors(model_state(single), model_state(other), init))
    assert err > 100 * RTOL, f"worst relative difference only {err:.2e} ({name})"


@pytest.mark.slow
def test_sync_bn_two_processes_equal_one_process_with_bn_training(sample_data, tmp_path):
    """Segment-wise SyncBN over gloo, BN *not* frozen: per-call (per-segment) statistics are taken
    over the global batch, so 2 processes x 2 images equal 1 process x 4 images: weights and the
    BN running statistics after 2 steps."""
    steps = ["train.max_steps=2", "model.sync_bn=true"]
    single = pretrain(tiny_config(sample_data, *steps, "data.batch_size=4"), tmp_path / "single")
    launcher = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]
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
    first = {
        **batch,
        "images": [t[:2] for t in batch["images"]],
        "corr": [t[:2] for t in batch["corr"]],
        "boxes": [tuple(t[:2] for t in side) for side in batch["boxes"]],
    }
    whole(batch)
    half(first)
    diff = half.online["head"].bn1.running_var - whole.online["head"].bn1.running_var
    assert diff.abs().max() > 1e-4


def test_two_nodes_on_loopback_train(sample_data, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        launcher = [
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]
        cmd = [
            sys.executable,
            *launcher,
            "-m",
            "soco_det",
            *cli_args(sample_data, tmp_path / "run", "data.batch_size=2", "train.max_steps=2"),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=900) for p in procs]
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
    # 2 micro-batches of 2 per step = one batch of 4 when BN is frozen (running statistics): then,
    # and only then, the split of the batch does not change the result.
    frozen = (*STEPS, "train.freeze_bn=true")
    hook = InitialWeights()
    big = pretrain(tiny_config(sample_data, *frozen, "data.batch_size=4"), tmp_path / "big", hooks=[hook])
    acc = pretrain(tiny_config(sample_data, *frozen, "data.batch_size=2", "train.accum_steps=2"), tmp_path / "acc")
    a, b = model_state(big), model_state(acc)
    assert a["step"] == b["step"] == 4 and b["epoch"] == 2
    errors = relative_errors(a, b, hook.state)
    name, err = worst(errors)
    assert err < RTOL, f"{name}: relative error {err:.2e} (buffer, update) = {errors[name]}"
    for ra, rb in zip(read_metrics(big), read_metrics(acc)):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4)
