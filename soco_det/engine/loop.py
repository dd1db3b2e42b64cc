"""The training loop that pretraining and fine-tuning share: a step function and hooks around it.

A :class:`TrainerBase` holds the model, its optimizer and the step count; a subclass says how to
get the next batch (:meth:`~TrainerBase.next_batch`) and what one optimizer step is
(:meth:`~TrainerBase.run_step`); the loop, the stop signal, the non-finite-loss check and the hooks
are here, in the manner of detectron2's ``SimpleTrainer`` and its hooks. Everything around the step (metrics, progress, checkpoints, evaluation) is a
:class:`Hook`, called before/after each step and at the ends of the run
(:mod:`soco_det.engine.hooks`).

Step numbering: ``trainer.step`` counts *completed* optimizer steps; the step under way is reported
as ``trainer.step + 1``; ``checkpoints/step_00000002.pt`` holds the state after 2 steps.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from soco_det.checkpoint_files import find_resume, load_model_strict
from soco_det.engine import distributed as dist_utils
from soco_det.engine.checkpoint import capture_rng
from soco_det.engine.signals import GracefulStop
from soco_det.errors import Interrupted


def move_to(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor of a (nested) batch to ``device``; 4-D tensors optionally NHWC."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.ndim == 4:
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: move_to(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device, channels_last) for v in obj)
    return obj


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode; with ``freeze_bn`` every BatchNorm uses (and keeps) its running statistics."""
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def resolve_amp(choice: str, device_type: str) -> torch.dtype | None:
    """``auto``: bf16 on CUDA (when supported), full precision on CPU."""
    if choice == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving that state."""


class Hook:
    """Callbacks around the training step; override what you need."""

    def before_train(self, trainer: "TrainerBase") -> None: ...
    def before_step(self, trainer: "TrainerBase") -> None: ...
    def after_step(self, trainer: "TrainerBase", out: dict[str, Any]) -> None: ...
    def after_train(self, trainer: "TrainerBase") -> None: ...


class TrainerBase:
    """The loop: ``next_batch`` -> hooks' ``before_step`` -> ``run_step`` -> ``advance`` -> the
    non-finite check when due -> hooks' ``after_step``, until ``stop_step`` or a stop request.

    ``model`` is the unwrapped network (what checkpoints hold); ``forward_model`` is what the step
    calls (the model itself, or its DDP / compiled wrapper); ``scaler`` is the GradScaler of fp16
    (disabled otherwise). ``amp_dtype`` is the autocast dtype of :meth:`autocast` (``None``: full precision).
    ``check_every``: how often (in steps) the losses noted by :meth:`note_finite` are checked; a
    check is one host sync, and the last step and every checkpoint are always checked.
    ``nonfinite_hint`` ends the message of :class:`NonFiniteLossError`.
    """

    nonfinite_hint = ""
    epoch = 0  # the epoch under way (a subclass that tracks its data's epochs overrides it)

    def __init__(
        self,
        *,
        model: nn.Module,
        forward_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        device: torch.device,
        stop_step: int,
        amp_dtype: torch.dtype | None = None,
        run_dir: Path | None = None,
        hooks: Sequence[Hook] = (),
        check_every: int = 1,
    ) -> None:
        self.model, self.forward_model, self.optimizer, self.scaler = model, forward_model, optimizer, scaler
        self.device, self.stop_step, self.amp_dtype, self.run_dir = device, stop_step, amp_dtype, run_dir
        self.hooks = list(hooks)
        self.step = 0
        self.epoch_ended = False  # True right after the step that finished an epoch
        # Seconds the loop spent getting batches since it started (next_batch + advance: the wait for
        # the loader, and on CUDA the next step's batch fetched while the device computes).
        self.data_wait_s = 0.0
        self.check_every = max(1, int(check_every))
        self._first_bad: torch.Tensor | None = None  # [step of the first non-finite loss or -1, that loss]
        self._checked_step = -1
        # Asked before each step; True ends the loop early (a stop signal, see engine/signals.py).
        self.should_stop: Callable[[], bool] = lambda: False
        self.stopped = False

    # ------------------------------------------------------------------ what a subclass provides
    def next_batch(self) -> Any:
        """The input of the next :meth:`run_step`, on the device."""
        raise NotImplementedError

    def run_step(self, batch: Any) -> dict[str, Any]:
        """One optimizer step; increments ``self.step`` and returns detached metrics."""
        raise NotImplementedError

    def advance(self) -> None:
        """Bookkeeping after a step, before the hooks see it (data position, epoch end)."""

    # ------------------------------------------------------------------ state (the checkpoint format)
    def state_dict(self, config: dict) -> dict[str, Any]:
        """What a checkpoint holds (docs/architecture.md, "Checkpoint format"); subclasses add theirs."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "rng": capture_rng(),
            "config": config,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Strict: the weights (every key and shape), the optimizer, the scaler and the step."""
        load_model_strict(self.model, ckpt["model"], source=str(ckpt.get("path", "checkpoint")))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])

    # ------------------------------------------------------------------ the loop
    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def _stop_now(self) -> bool:
        self.stopped = self.stopped or self.should_stop()
        return self.stopped

    def close_data(self) -> None:
        """Drop the data iterator (its loader workers exit): called when :meth:`train` ends."""

    def train(self) -> None:
        try:
            for hook in self.hooks:
                hook.before_train(self)
            while self.step < self.stop_step and not self._stop_now():
                started = time.perf_counter()
                batch = self.next_batch()
                self.data_wait_s += time.perf_counter() - started
                for hook in self.hooks:
                    hook.before_step(self)
                out = self.run_step(batch)
                started = time.perf_counter()
                self.advance()
                self.data_wait_s += time.perf_counter() - started
                if self.step % self.check_every == 0 or self.step >= self.stop_step:
                    self.check_finite()
                for hook in self.hooks:
                    hook.after_step(self, out)
        finally:
            # Now, not whenever the trainer is collected: loader workers ignore SIGTERM
            # (engine/signals.py), so one still alive at interpreter exit would block it.
            self.close_data()
        for hook in self.hooks:
            hook.after_train(self)

    def run(self, resume_hint: str) -> None:
        """:meth:`train` with SIGINT/SIGTERM handled (:mod:`soco_det.engine.signals`): every
        process finishes the step under way, the hooks save a checkpoint, and
        :class:`~soco_det.errors.Interrupted` names it and how to continue (``resume_hint``)."""
        with GracefulStop() as stop:
            self.should_stop = stop.requested
            self.train()
        if self.stopped:
            saved = find_resume(self.run_dir) if self.run_dir is not None else None
            what = f"checkpoint {saved} saved; continue with {resume_hint}" if saved else "no step was done"
            raise Interrupted(
                f"{self.run_dir}: stopped by {stop.name or 'a signal'} after step {self.step}; {what}",
                stop.signum or 15,
            )

    # ------------------------------------------------------------------ non-finite losses
    def note_finite(self, loss: torch.Tensor) -> None:
        """Remember the first non-finite ``loss`` of the step under way, on the device (no sync)."""
        if self._first_bad is None:
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
        first = self._first_bad
        newly = ~torch.isfinite(loss) & (first[0] < 0)
        self._first_bad = torch.where(newly, torch.stack([loss.new_tensor(float(self.step + 1)), loss]), first)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a loss since the start was non-finite on any process
        (one all-reduce: every process takes the same decision, so none waits for a rank that
        raised). The state in memory is then bad, so the run stops before any hook can save it."""
        if self._first_bad is None or self._checked_step == self.step:
            return
        self._checked_step = self.step
        first = self._first_bad.clone()
        bad = dist_utils.all_reduce_mean((first[:1] >= 0).float())
        if bad.item() == 0:
            return
        step, value = (int(first[0].item()), first[1].item()) if first[0] >= 0 else (self.step, float("nan"))
        last = find_resume(self.run_dir) if self.run_dir is not None else None
        hint = f"; {self.nonfinite_hint}" if self.nonfinite_hint else ""
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at step {step} (epoch {self.epoch}); "
            f"stopped without saving this state; last good checkpoint: {last or 'none'}{hint}"
        )
