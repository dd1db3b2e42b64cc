"""LARS against a hand-written reference update (docs/method.md 5) on a toy model."""

import copy

import pytest
import torch
from torch import nn

from soco_det.engine.lars import LARS, build_lars, lars_param_groups


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    frozen = nn.Linear(2, 2)  # stands in for the target network: requires_grad=False
    for p in frozen.parameters():
        p.requires_grad_(False)
    model.add_module("frozen", frozen)
    return model


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model[:5](x).pow(2).sum()


def reference_step(params, grads, bufs, lr, wd, eta=0.001, eps=1e-8, momentum=0.9):
    """The update written out by hand: 1-D params plain SGD; others wd, trust ratio, SGD."""
    new = []
    for i, (w, g) in enumerate(zip(params, grads)):
        if w.ndim > 1:
            g = g + wd * w
            w_norm, g_norm = w.norm(), g.norm()
            if w_norm > 0 and g_norm > 0:
                g = g * (eta * w_norm / (g_norm + eps))
        bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
        new.append(w - lr * bufs[i])
    return new


def test_groups_follow_the_dimension_rule_and_skip_frozen_params():
    model = toy_model()
    plain, adapted = lars_param_groups(model, weight_decay=1e-5)
    assert plain["weight_decay"] == 0.0 and plain["lars"] is False
    assert adapted["weight_decay"] == 1e-5 and adapted["lars"] is True
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in plain["params"]) == ["0.bias", "1.bias", "1.weight", "4.bias"]
    assert sorted(names[id(p)] for p in adapted["params"]) == ["0.weight", "4.weight"]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_three_steps_match_the_reference_update(foreach):
    model = toy_model()
    ref = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = build_lars(model, lr=0.5, weight_decay=1e-2, foreach=foreach)  # large wd so its effect is visible
    bufs = [None] * len(ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(2, 3, 6, 6, generator=gen)
        lr = 0.5 * (step + 1)
        for group in opt.param_groups:
            group["lr"] = lr
        # gradient at the reference point = gradient at the optimizer's point (they are equal so far)
        opt.zero_grad()
        loss_of(model, x).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        opt.step()
        ref = reference_step(ref, grads, bufs, lr=lr, wd=1e-2)
        got = [p.detach() for p in model.parameters() if p.requires_grad]
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)
    assert not any(p.grad is not None for p in model.frozen.parameters())


def test_trust_ratio_scales_the_update_to_eta_times_weight_norm():
    w = nn.Parameter(torch.full((4, 4), 2.0))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars": True}], lr=1.0, momentum=0.9)
    w.grad = torch.full((4, 4), 1000.0)
    before = w.detach().clone()
    opt.step()
    # |update| = lr * eta * |w| whatever the gradient's magnitude
    torch.testing.assert_close((w.detach() - before).norm(), 0.001 * before.norm())


def test_zero_weight_keeps_the_decayed_gradient_unscaled():
    w = nn.Parameter(torch.zeros(3, 3))
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars": True}], lr=0.1, momentum=0.9)
    w.grad = torch.ones(3, 3)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1))


def test_state_dict_round_trip_continues_identically():
    model = toy_model()
    opt = build_lars(model, lr=0.1, weight_decay=1e-5)
    x = torch.randn(2, 3, 6, 6)
    loss_of(model, x).backward()
    opt.step()
    clone = copy.deepcopy(model)
    opt2 = build_lars(clone, lr=0.1, weight_decay=1e-5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read from a file: no shared buffers
    for m, o in ((model, opt), (clone, opt2)):
        o.zero_grad()
        loss_of(m, x).backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        LARS([nn.Parameter(torch.ones(2, 2))], lr=0.1, momentum=1.5)
