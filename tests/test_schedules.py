"""Learning-rate and target-momentum schedules against their formulas (docs/method.md 3.6, 5)."""

import math

import pytest

from soco_det.engine.config import LoopConfig, OptimConfig, TrainConfig
from soco_det.engine.schedules import Schedule, learning_rate, scaled_lr, target_momentum


def test_linear_scaling_rule_paper_batch():
    assert scaled_lr(1.0, 128 * 16) == 8.0
    cfg = TrainConfig(optim=OptimConfig(warmup_epochs=10), loop=LoopConfig(epochs=100))
    sched = Schedule.from_config(cfg, steps_per_epoch=625, effective_batch=2048)
    assert sched.peak_lr == 8.0 and sched.warmup_steps == 6250 and sched.total_steps == 62500


@pytest.mark.parametrize("t", [0, 1, 37, 499, 999])
def test_warmup_formula(t):
    lr, tw = 8.0, 1000
    assert learning_rate(t, lr, tw, 10_000) == pytest.approx(lr / 100 * (99 * t / tw + 1), rel=1e-12)


@pytest.mark.parametrize("t", [1000, 1001, 4321, 9999, 10_000])
def test_cosine_formula(t):
    lr, tw, total = 8.0, 1000, 10_000
    tc, tp = total - tw, t - tw
    expected = 1e-6 + (lr - 1e-6) * (1 + math.cos(math.pi * tp / tc)) / 2
    assert learning_rate(t, lr, tw, total) == pytest.approx(expected, rel=1e-12)


def test_schedule_is_continuous_at_the_end_of_warmup():
    before, at = learning_rate(999, 8.0, 1000, 10_000), learning_rate(1000, 8.0, 1000, 10_000)
    assert at == 8.0 and abs(at - before) < 8.0 * 0.99 / 1000 + 1e-12
    assert learning_rate(10_000, 8.0, 1000, 10_000) == pytest.approx(1e-6)


@pytest.mark.parametrize("k", [0, 1, 250, 500, 999, 1000])
def test_target_momentum_formula(k):
    K, tau0 = 1000, 0.99
    expected = 1 - (1 - tau0) * (math.cos(math.pi * k / K) + 1) / 2
    assert target_momentum(k, K, tau0) == pytest.approx(expected, rel=1e-12)
    assert target_momentum(0, K, tau0) == pytest.approx(0.99) and target_momentum(K, K, tau0) == pytest.approx(1.0)


def test_momentum_rises_monotonically():
    values = [target_momentum(k, 100, 0.99) for k in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))
