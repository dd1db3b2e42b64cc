"""What a pretraining run is doing to its network, beyond the loss (issue: a falling loss is not learning).

Logged every ``train.log_every`` steps into ``metrics.jsonl`` and TensorBoard:

* ``move/<group>``: relative movement ``||W - W0|| / ||W0||`` of the conv/linear weights of each
  online part (``encoder``, ``neck``, ``head``, ``projector``, and ``predictor``) since the start of
  the run (``W0`` is the network the run started from; on resume it is rebuilt from the config and
  seed, so it stays the same reference);
* ``lars/trust_ratio``: the mean LARS trust ratio ``eta ||w|| / ||g||`` of the last step;
* ``collapse/<part>_rank`` and ``collapse/<part>_std``: over the rows of the logged step, the
  effective rank of the outputs of the online box head (``head``) and projector (``proj``) (~1 when
  one direction carries their variance), and the mean per-channel std of the L2-normalised outputs
  times ``sqrt(D)`` (~1 when they spread over the sphere, 0 when they collapse to a point; SimSiam's
  indicator).

It warns once (after the warmup) when the encoder has moved less than 1 % — the run is not
training its features; see docs/budget.md — and when the head's effective
rank falls under 5 % of its width (dimensional collapse; see ``model.head_decorrelation``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from soco_det.engine.loop import Hook
from soco_det.logs import get_logger
from soco_det.models import init_model
from soco_det.stats import output_spread

if TYPE_CHECKING:
    from soco_det.engine.trainer import Trainer

log = get_logger(__name__)

MIN_ENCODER_MOVE = 0.01
MIN_RANK_FRACTION = 0.05
WATCHED = {"head": "head", "proj": "projector"}


def weight_groups(model: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """``{part: [(name, weight), ...]}`` of the trainable conv/linear weights (ndim > 1) of the
    online network (``online.<part>.*``) and the predictor."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or param.ndim < 2:
            continue
        parts = name.split(".")
        group = parts[1] if parts[0] == "online" else parts[0]
        groups.setdefault(group, []).append((name, param))
    return groups


class TrainingDynamics(Hook):
    """Computes the records above for :class:`~soco_det.engine.hooks.MetricsHook` (``metrics()``)."""

    def __init__(self, every: int, warmup_steps: int, model_cfg: Any = None, seed: int = 0) -> None:
        self.every, self.warmup_steps = every, warmup_steps
        self.model_cfg, self.seed = model_cfg, seed
        self.reference: dict[str, torch.Tensor] = {}
        self.captured: dict[str, list[torch.Tensor]] = {}
        self.handles: list[Any] = []
        self.warned: set[str] = set()

    # ---------------------------------------------------------------- hooks
    def before_train(self, trainer: Trainer) -> None:
        source = trainer.model
        if trainer.step > 0 and self.model_cfg is not None:
            source = init_model(self.model_cfg, self.seed)  # the run's start, rebuilt
        own = dict(source.named_parameters())
        self.reference = {
            name: own[name].detach().to(param.device, copy=True)
            for group in weight_groups(trainer.model).values()
            for name, param in group
        }

    def before_step(self, trainer: Trainer) -> None:
        step = trainer.step + 1
        if step % self.every and step < trainer.stop_step:
            return
        online = getattr(trainer.model, "online", {})
        for label, part in WATCHED.items():
            if part in online:
                self.captured[label] = []
                self.handles.append(
                    online[part].register_forward_hook(
                        lambda _m, _i, out, label=label: self.captured[label].append(out.detach())
                    )
                )

    def after_step(self, trainer: Trainer, out: dict[str, Any]) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ---------------------------------------------------------------- the record
    @torch.no_grad()
    def metrics(self, trainer: Trainer) -> dict[str, float]:
        record: dict[str, float] = {}
        for group, params in weight_groups(trainer.model).items():
            ref = [self.reference[name] for name, _ in params if name in self.reference]
            if len(ref) != len(params):
                continue
            diff = torch.stack([torch.linalg.vector_norm(p.detach() - r) ** 2 for (_, p), r in zip(params, ref)])
            base = torch.stack([torch.linalg.vector_norm(r) ** 2 for r in ref])
            record[f"move/{group}"] = float(diff.sum().sqrt() / base.sum().sqrt().clamp_min(1e-12))
        ratios = [s["trust_ratio"] for s in trainer.optimizer.state.values() if "trust_ratio" in s]
        if ratios:
            record["lars/trust_ratio"] = float(torch.stack([r.float() for r in ratios]).mean())
        for label, outputs in self.captured.items():
            if outputs:
                rows = torch.cat([o.flatten(1) for o in outputs])
                rank, std = output_spread(rows)
                record[f"collapse/{label}_rank"], record[f"collapse/{label}_std"] = rank, std
                record[f"collapse/{label}_rank_limit"] = MIN_RANK_FRACTION * min(rows.shape)
        self.captured = {}
        self._warn(trainer, record)
        return record

    def _warn(self, trainer: Trainer, record: dict[str, float]) -> None:
        if trainer.step <= self.warmup_steps:
            return
        move = record.get("move/encoder")
        if move is not None and move < MIN_ENCODER_MOVE and "move" not in self.warned:
            self.warned.add("move")
            log.warning(
                "after %d steps the encoder's weights have moved %.2f %% from their start: this run is not "
                "training its features (small batch or few steps with the paper's LARS settings); see docs/budget.md "
                "(train.optim.budget=auto)",
                trainer.step,
                100 * move,
            )
        rank, limit = record.get("collapse/head_rank"), record.get("collapse/head_rank_limit")
        if rank is not None and limit is not None and rank < limit and "collapse" not in self.warned:
            self.warned.add("collapse")
            log.warning(
                "step %d: the box head's outputs have collapsed onto %.1f effective directions (under %.0f): "
                "the features are losing information; see docs/budget.md "
                "(model.head_decorrelation)",
                trainer.step,
                rank,
                limit,
            )
