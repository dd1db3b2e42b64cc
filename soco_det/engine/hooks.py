"""Hooks that pretraining and fine-tuning share: checkpoints, metrics records and periodic evaluation.

A step's output (``TrainerBase.run_step``) is a dict with ``"loss"`` (a detached scalar tensor),
``"terms"`` (the named parts of the loss, as they are recorded: ``loss/1-2``, ``loss_mask``...)
and ``"lr"``; a trainer may add more.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from soco_det.engine import checkpoint as ckpt_io
from soco_det.engine import distributed as dist_utils
from soco_det.engine.loop import Hook, TrainerBase
from soco_det.engine.metrics import MetricsWriter
from soco_det.logs import Progress


class CheckpointHook(Hook):
    """Saves every ``every`` steps (0: never on a period), at each epoch end if ``epoch_end``, and at
    the end of the run, stopped or not (main process; atomic; the newest ``keep_last`` step files are
    kept). ``trainer.state_dict(config)`` is what is saved; ``after_save(path)`` runs on the main process."""

    def __init__(
        self,
        run_dir: Path,
        every: int,
        keep_last: int,
        config: dict,
        after_save: Callable[[Path], None] | None = None,
        epoch_end: bool = False,
    ) -> None:
        self.run_dir, self.every, self.keep_last, self.config = run_dir, every, keep_last, config
        self.after_save, self.epoch_end = after_save, epoch_end
        self.saved_step: int | None = None

    def before_train(self, trainer: TrainerBase) -> None:
        self.saved_step = trainer.step

    def _save(self, trainer: TrainerBase) -> None:
        if self.saved_step == trainer.step:
            return
        trainer.check_finite()  # never save a state that a non-finite loss produced
        if dist_utils.is_main():
            path = ckpt_io.save_checkpoint(self.run_dir, trainer.state_dict(self.config), self.keep_last)
            if self.after_save is not None:
                self.after_save(path)
        dist_utils.barrier()
        self.saved_step = trainer.step

    def after_step(self, trainer: TrainerBase, out: dict[str, Any]) -> None:
        periodic = self.every > 0 and trainer.step % self.every == 0
        if periodic or (self.epoch_end and trainer.epoch_ended) or trainer.step >= trainer.stop_step:
            self._save(trainer)

    def after_train(self, trainer: TrainerBase) -> None:
        self._save(trainer)


class EvalHook(Hook):
    """Calls ``evaluate(trainer)`` every ``every`` steps (0: never on a period) and once after the
    last step of a run that was not stopped early; keeps the last result in ``self.result``.
    ``evaluate`` runs on every process (it may need collectives) and returns what the main process
    computed (``None`` elsewhere)."""

    def __init__(self, every: int, evaluate: Callable[[TrainerBase], Any]) -> None:
        self.every, self.evaluate = every, evaluate
        self.result: Any = None

    def after_step(self, trainer: TrainerBase, out: dict[str, Any]) -> None:
        if self.every > 0 and trainer.step % self.every == 0 and trainer.step < trainer.stop_step:
            self.result = self.evaluate(trainer)

    def after_train(self, trainer: TrainerBase) -> None:
        if trainer.step >= trainer.stop_step and not trainer.stopped:
            self.result = self.evaluate(trainer)


class MetricsHook(Hook):
    """Every ``every`` steps and after the last one: a record in ``metrics.jsonl`` (and the logging
    back-ends), the progress bar's postfix and a log line (:meth:`log`).

    The loss and its terms are averaged over processes with one all-reduce: those of the record's
    step (``window=False``), or their mean over the steps since the previous record
    (``window=True``; summed on the device, no sync per step). So is ``time/data_wait``, the seconds
    per step the loop spent getting its batches since the previous record (``trainer.data_wait_s``);
    ``time/step`` is the seconds per step. ``sources`` are objects with ``metrics(trainer) -> dict``
    merged into each record; :meth:`extra` adds a subclass's own. Off a terminal the progress lines
    show the loss of the latest step (read only when a line is written).
    """

    def __init__(
        self,
        writer: MetricsWriter,
        every: int,
        show_progress: bool,
        desc: str = "train",
        window: bool = False,
        sources: Sequence[Any] = (),
    ) -> None:
        self.writer, self.every, self.show_progress, self.desc, self.window = writer, every, show_progress, desc, window
        self.sources = list(sources)
        self.bar: Progress | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0

    def before_train(self, trainer: TrainerBase) -> None:
        self.bar = Progress(
            total=trainer.stop_step, initial=trainer.step, desc=self.desc, unit="step", disable=not self.show_progress
        )
        self._t0, self._step0, self._wait0 = time.perf_counter(), trainer.step, trainer.data_wait_s
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)

    def after_step(self, trainer: TrainerBase, out: dict[str, Any]) -> None:
        assert self.bar is not None
        if not self.bar.is_bar:  # log lines: this step's loss, read when a line is written
            self.bar.set_postfix(lambda: f"loss {float(out['loss']):.4f} lr {out['lr']:.4g}")
        self.bar.update(1)
        names = sorted(out["terms"])
        values = torch.stack([out["loss"].float()] + [torch.as_tensor(out["terms"][n]).float() for n in names])
        if self.window:
            self._sum = values if self._sum is None else self._sum + values
            self._count += 1
        if trainer.step % self.every and trainer.step < trainer.stop_step:
            return
        if self.window:
            assert self._sum is not None
            values, self._sum, self._count = self._sum / self._count, None, 0
        steps = max(trainer.step - self._step0, 1)
        wait = values.new_tensor([(trainer.data_wait_s - self._wait0) / steps])
        *values, wait_per_step = dist_utils.all_reduce_mean(torch.cat([values, wait])).tolist()  # one collective
        elapsed = time.perf_counter() - self._t0
        record: dict[str, Any] = {"loss": values[0], **dict(zip(names, values[1:])), "lr": out["lr"]}
        record.update(self.extra(trainer, out, (trainer.step - self._step0) / max(elapsed, 1e-9)))
        record["time/data_wait"], record["time/step"] = wait_per_step, elapsed / steps
        for source in self.sources:
            record.update(source.metrics(trainer))
        if trainer.device.type == "cuda":
            record["gpu_mem_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self.writer.write(trainer.step, record)
        if self.bar.is_bar:
            self.bar.set_postfix(f"loss {record['loss']:.4f} lr {record['lr']:.4g}")
        self.log(trainer, record)
        self._t0, self._step0, self._wait0 = time.perf_counter(), trainer.step, trainer.data_wait_s

    def extra(self, trainer: TrainerBase, out: dict[str, Any], steps_per_s: float) -> dict[str, Any]:
        """More fields of a record; ``steps_per_s`` is measured since the previous record."""
        return {}

    def log(self, trainer: TrainerBase, record: dict[str, Any]) -> None:
        """A log line per record (none by default: the progress bar shows the loss)."""

    def after_train(self, trainer: TrainerBase) -> None:
        if self.bar is not None:
            self.bar.close()
