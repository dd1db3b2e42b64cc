"""LARS around SGD with momentum, as the official SoCo code uses it (docs/method.md 5, 9.13).

Two parameter groups, chosen by a rule rather than by names:

* every 1-D parameter (biases, BatchNorm weight and bias): no weight decay and no LARS adaptation,
  i.e. plain SGD with momentum at the scheduled learning rate;
* every other parameter (conv and linear weights): ``g <- g + wd * w``, then, when both ``||w||``
  and ``||g||`` are > 0, ``g <- g * eta * ||w|| / (||g|| + eps)``; then SGD with momentum.

Weight decay is folded in *before* the trust ratio, exactly as in the official code. Only
parameters with ``requires_grad`` are included, so the BYOL target network is never optimised.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split ``model``'s trainable parameters into the no-adaptation group (1-D) and the LARS group."""
    plain, adapted = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (plain if param.ndim <= 1 else adapted).append(param)
    return [
        {"params": plain, "weight_decay": 0.0, "lars": False},
        {"params": adapted, "weight_decay": weight_decay, "lars": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD (momentum, no dampening, no Nesterov) with layer-wise adaptive rate scaling per group.

    Each param group carries ``lars`` (bool) and ``weight_decay``; build them with
    :func:`lars_param_groups`. The per-parameter state is SGD's ``momentum_buffer``.

    ``foreach=True`` updates each group with a few multi-tensor ``torch._foreach_*`` kernels instead
    of ~8 kernels per parameter (~1,700 launches per step for a ResNet-50 SoCo); ``False`` is the
    per-parameter loop; ``None`` (default) uses foreach for CUDA parameters only (on the CPU the
    loop is as fast: benchmarks/lars_step.py). Both compute the same update.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 1e-8,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0 or not (0 <= momentum < 1) or weight_decay < 0 or eta <= 0 or eps <= 0:
            raise ValueError(f"invalid LARS settings lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, lars=True)
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if self.foreach or (self.foreach is None and params and params[0].is_cuda):
                self._foreach_group(group)
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["lars"]:
                    grad = self._adapt(param, grad, group, self.state[param])
                self._sgd_update(param, grad, group)
        return loss

    @staticmethod
    def _adapt(param: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        # Weight decay first, then the trust ratio on the decayed gradient (official order).
        grad = grad.add(param, alpha=group["weight_decay"])
        w_norm = torch.linalg.vector_norm(param)
        g_norm = torch.linalg.vector_norm(grad)
        ratio = group["eta"] * w_norm / (g_norm + group["eps"])
        # A zero-norm weight or gradient keeps the decayed gradient unscaled; stays on device (no sync).
        ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        state["trust_ratio"] = ratio  # read by the training-dynamics metrics (no sync here)
        return grad.mul_(ratio)

    def _foreach_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if group["lars"]:
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            else:
                grads = [g.clone() for g in grads]
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = group["eta"] * w_norm / (g_norm + group["eps"])
            ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
            torch._foreach_mul_(grads, list(ratio.to(grads[0].dtype).unbind()))
        momentum = group["momentum"]
        if momentum:
            bufs = []
            for param, grad in zip(params, grads):
                state = self.state[param]
                buf = state.get("momentum_buffer")
                if buf is None:  # torch.optim.SGD starts the buffer at the first gradient
                    state["momentum_buffer"] = grad.detach().clone()
                else:
                    bufs.append((buf, grad))
            if bufs:
                old = [b for b, _ in bufs]
                torch._foreach_mul_(old, momentum)
                torch._foreach_add_(old, [g for _, g in bufs])
            grads = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_add_(params, grads, alpha=-group["lr"])

    def _sgd_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        momentum = group["momentum"]
        if momentum:
            state = self.state[param]
            buf = state.get("momentum_buffer")
            if buf is None:
                # torch.optim.SGD starts the buffer at the first gradient.
                buf = state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad)
            grad = buf
        param.add_(grad, alpha=-group["lr"])


def build_lars(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    eta: float = 0.001,
    eps: float = 1e-8,
    foreach: bool | None = None,
) -> LARS:
    """LARS over ``model``'s trainable parameters with the rule-based groups."""
    return LARS(lars_param_groups(model, weight_decay), lr=lr, momentum=momentum, eta=eta, eps=eps, foreach=foreach)
