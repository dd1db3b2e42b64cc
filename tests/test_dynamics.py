"""Training dynamics (weight movement, trust ratio, collapse indicators), the budget rule and the
decorrelation option."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from soco_det.engine.dynamics import output_spread, weight_groups
from soco_det.engine.metrics import read_metrics
from soco_det.engine.schedules import Schedule, scaled_lr
from soco_det.engine.trainer import pretrain, resolve_lars_eta
from soco_det.losses import decorrelation_loss
from soco_det.models import init_model

from engine_fixtures import model_state, sample_data, tiny_config  # noqa: F401 - fixture


def test_output_spread_tells_collapse_from_spread():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(512, 64, generator=g)
    direction = torch.randn(1, 64, generator=g)
    one_axis = torch.randn(512, 1, generator=g) * direction + 1e-3 * spread  # dimensional collapse
    one_point = (1 + 0.1 * torch.randn(512, 1, generator=g)) * direction + 1e-3 * spread  # complete collapse
    rank, std = output_spread(spread)
    assert rank > 40 and std == pytest.approx(1.0, abs=0.1)
    assert output_spread(one_axis)[0] < 1.5
    assert output_spread(one_point)[1] < 0.05


def test_decorrelation_loss_values_and_gradient():
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(8192, 8, generator=g)  # std 2 >= 1, independent channels
    assert decorrelation_loss([x]).item() < 0.05
    same = 2.0 * torch.randn(8192, 1, generator=g).repeat(1, 8)  # one direction: covariance 4 everywhere
    assert decorrelation_loss([same]).item() == pytest.approx(7 * 16, rel=0.1)  # (D - 1) * 4^2
    tiny = 0.01 * torch.randn(8192, 8, generator=g)  # uncorrelated but nearly constant channels
    assert decorrelation_loss([tiny]).item() == pytest.approx(0.99, abs=0.01)
    # segments are centred separately: a shift between segments is not a covariance
    assert decorrelation_loss([x[:4096], x[4096:] + 100.0]).item() < 0.05
    y = (torch.randn(256, 8, generator=g) @ torch.randn(8, 8, generator=g)).requires_grad_(True)
    decorrelation_loss([y]).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_budget_rule():
    sched = Schedule(peak_lr=scaled_lr(1.0, 16), warmup_steps=10, total_steps=100)
    paper = SimpleNamespace(budget="paper", lars_eta=0.001, target_update=1.25e-3)
    auto = SimpleNamespace(budget="auto", lars_eta=0.001, target_update=1.25e-3)
    assert resolve_lars_eta(paper, sched) == 0.001
    assert resolve_lars_eta(auto, sched) == pytest.approx(0.02)  # 1.25e-3 / 0.0625
    big = Schedule(peak_lr=scaled_lr(1.0, 2048), warmup_steps=10, total_steps=100)
    assert resolve_lars_eta(auto, big) == 0.001  # the paper's batch keeps the paper's eta
    assert scaled_lr(1.0, 64, rule="sqrt") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        scaled_lr(1.0, 64, rule="cubic")


def test_run_logs_dynamics_and_warns_when_the_encoder_does_not_move(sample_data, tmp_path, caplog):  # noqa: F811
    # 8 images / batch 2 = 4 steps per epoch, warmup 1 epoch; paper eta: the encoder barely moves
    cfg = tiny_config(
        sample_data,
        "train.loop.epochs=3",
        "train.optim.warmup_epochs=1",
        "model.head_decorrelation=0.1",
        "train.optim.budget=paper",
    )
    with caplog.at_level(logging.WARNING, logger="soco_det"):
        run = pretrain(cfg, tmp_path / "run")
    records = read_metrics(run)
    last = records[-1]
    for key in (
        "move/encoder",
        "move/neck",
        "move/head",
        "move/projector",
        "move/predictor",
        "lars/trust_ratio",
        "collapse/head_rank",
        "collapse/head_std",
        "collapse/proj_rank",
        "loss/head_decorrelation",
    ):
        assert key in last, key
    assert 0 < last["move/encoder"] < 0.01
    assert records[0]["move/encoder"] <= last["move/encoder"]
    assert sum("encoder's weights have moved" in r.message for r in caplog.records) == 1
    # the movement is measured against the run's start, rebuilt on resume
    cfg_more = tiny_config(
        sample_data,
        "train.loop.epochs=4",
        "train.optim.warmup_epochs=1",
        "model.head_decorrelation=0.1",
        "train.optim.budget=paper",
    )
    pretrain(cfg_more, run, resume="auto")
    after = read_metrics(run)[len(records) :]
    per_epoch = last["step"] // 3
    assert [r["step"] for r in after] == list(range(3 * per_epoch + 1, 4 * per_epoch + 1))  # its 4th epoch
    # ... and measured them from the run's start (init_model of the config and seed), not from the
    # weights it resumed from: recompute ||W - W0|| / ||W0|| over the encoder from the last checkpoint
    start = dict(init_model(cfg_more.model, cfg_more.seed).named_parameters())
    final = model_state(run)["model"]
    names = [name for name, _ in weight_groups(init_model(cfg_more.model, cfg_more.seed))["encoder"]]
    moved = sum(float((final[n] - start[n].detach()).pow(2).sum()) for n in names) ** 0.5
    expected = moved / sum(float(start[n].detach().pow(2).sum()) for n in names) ** 0.5
    assert after[-1]["move/encoder"] == pytest.approx(expected, rel=1e-5)
    assert after[-1]["move/encoder"] > last["move/encoder"]


def test_weight_groups_cover_every_trainable_matrix():
    from soco_det.models import ModelConfig, build_model

    model = build_model(
        ModelConfig(depth=18, fpn_channels=16, head_conv_dim=16, head_fc_dim=32, proj_hidden_dim=32, proj_dim=16)
    )
    groups = weight_groups(model)
    assert set(groups) == {"encoder", "neck", "head", "projector", "predictor"}
    n = sum(len(v) for v in groups.values())
    assert n == sum(1 for p in model.parameters() if p.requires_grad and p.ndim > 1)


def test_head_decorrelation_is_the_same_with_batched_and_separate_calls():
    from test_models import BATCHES, make_batch, tiny

    from soco_det.models import build_model

    losses = {}
    for batched in (True, False):
        torch.manual_seed(0)
        model = build_model(tiny(head_decorrelation=1.0, batched_calls=batched))
        out = model(make_batch(**BATCHES["soco_fpn"], b=4))
        losses[batched] = (out["loss"].item(), out["aux_losses"]["head_decorrelation"].item())
    assert losses[True][1] > 0
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
