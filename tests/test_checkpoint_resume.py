"""Checkpoints: exact resume (bitwise on CPU), schedules across a resume, non-finite loss handling."""

import math

import pytest
import torch

from engine_fixtures import model_state, sample_data, tiny_config  # noqa: F401
from soco_det.engine import checkpoint as ckpt_io
from soco_det.engine.metrics import read_metrics
from soco_det.engine.trainer import Hook, NonFiniteLossError, pretrain


def test_killed_and_resumed_run_equals_uninterrupted_run(sample_data, tmp_path):
    # 8 images, batch 2: 4 steps per epoch; stop mid-epoch (k=3), finish after the epoch boundary (n=5).
    full = pretrain(tiny_config(sample_data, "train.max_steps=5"), tmp_path / "full")
    part = tmp_path / "part"
    pretrain(tiny_config(sample_data, "train.max_steps=3"), part)
    assert model_state(part)["step"] == 3 and model_state(part)["sampler"]["global_position"] == 6
    pretrain(tiny_config(sample_data, "train.max_steps=5"), part, resume="auto")

    a, b = model_state(full), model_state(part)
    assert a["step"] == b["step"] == 5 and a["epoch"] == b["epoch"] == 1
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])

    # Same metric history, and the schedules follow their formulas across the resume (step k -> k+1).
    ma, mb = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5]
    cfg = tiny_config(sample_data)
    peak, warmup, total = 1.0 * 2 / 256, 4, 16  # base_lr * batch / 256; 1 warmup epoch; 4 epochs x 4 steps
    for ra, rb in zip(ma, mb):
        t = rb["step"] - 1  # the record of step s used the schedules at global step s - 1
        expected_lr = (
            peak / 100 * (99 * t / warmup + 1)
            if t < warmup
            else 1e-6 + (peak - 1e-6) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2
        )
        expected_tau = 1 - (1 - cfg.train.target_momentum) * (math.cos(math.pi * t / total) + 1) / 2
        assert rb["lr"] == pytest.approx(expected_lr, rel=1e-12) and rb["momentum"] == pytest.approx(expected_tau)
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]


def test_checkpoint_files_are_complete_pruned_and_found(sample_data, tmp_path):
    run = pretrain(
        tiny_config(sample_data, "train.max_steps=3", "train.ckpt_every=1", "train.keep_last=2"), tmp_path / "run"
    )
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["last.pt", "step_00000002.pt", "step_00000003.pt"]
    assert ckpt_io.find_resume(run) == run / "checkpoints" / "last.pt"
    ckpt = ckpt_io.load_checkpoint(run)
    assert ckpt["format"] == "soco-det/1" and ckpt["step"] == 3
    assert set(ckpt) >= {"model", "optimizer", "scaler", "step", "epoch", "sampler", "rng", "config"}
    assert ckpt["config"]["train"]["max_steps"] == 3
    assert any(k.startswith("target.encoder.") for k in ckpt["model"])
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_resume_rejects_a_checkpoint_of_another_model(sample_data, tmp_path):
    from soco_det.errors import UserError

    run = pretrain(tiny_config(sample_data, "train.max_steps=1"), tmp_path / "run")
    with pytest.raises(UserError, match="model keys do not match"):
        pretrain(
            tiny_config(
                sample_data,
                "train.max_steps=2",
                "model.variant=soco_c4",
                "data.views.recipe=soco_c4",
                "data.views.view_sizes=[64,64]",
            ),
            tmp_path / "other",
            resume=run,
        )


class PoisonWeights(Hook):
    """Makes the next forward pass produce NaN once ``at_step`` steps are done."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def before_step(self, trainer) -> None:
        if trainer.step == self.at_step:
            with torch.no_grad():
                trainer.model.online.encoder.conv1.weight.fill_(float("nan"))


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(sample_data, tmp_path):
    cfg = tiny_config(sample_data, "train.max_steps=4", "train.ckpt_every=2")
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3 .*last good checkpoint: .*last\.pt"
    ):
        pretrain(cfg, tmp_path / "run", hooks=[PoisonWeights(at_step=2)])
    ckpt = model_state(tmp_path / "run")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.pt", "step_00000002.pt"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_lazy_non_finite_check_still_refuses_to_save_the_bad_state(sample_data, tmp_path):
    # The loss is checked on the host only every log_every (5) steps, but always before a save:
    # NaN from step 3 on, the save at step 4 finds it and stops; step 2 stays the last checkpoint.
    cfg = tiny_config(sample_data, "train.max_steps=6", "train.ckpt_every=2", "train.log_every=5")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3 "):
        pretrain(cfg, tmp_path / "run", hooks=[PoisonWeights(at_step=2)])
    ckpt = model_state(tmp_path / "run")
    assert ckpt["step"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.pt", "step_00000002.pt"]
