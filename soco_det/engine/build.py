"""The set-up that pretraining and fine-tuning share, as named steps (detectron2's ``DefaultTrainer``
builders): the run folder and process group (:func:`open_run`), the data loader
(:func:`build_loader`), the DDP / compile wrapper (:func:`wrap_model`), the precision
(:func:`build_precision`), resuming (:func:`resume_into`), the records and their logging back-ends
(:func:`build_writer`), the standard hooks (:func:`standard_hooks`) and the run itself
(:func:`run_training`).

``pretrain`` (:mod:`soco_det.engine.trainer`) and ``finetune`` (:mod:`soco_det.transfer.finetuning`)
read as a list of these steps plus their own model, optimizer and step; neither builder takes a
whole config, so each can be read and tested alone.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import yaml
from torch import nn

from soco_det.config import upgrade_keys
from soco_det.cpus import WorkerCount, loader_workers
from soco_det.engine import distributed as dist_utils
from soco_det.engine.checkpoint import claim_run_folder, load_resume
from soco_det.engine.hooks import CheckpointHook, MetricsHook
from soco_det.engine.loop import Hook, TrainerBase, resolve_amp
from soco_det.engine.metrics import MetricsWriter
from soco_det.engine.signals import ignore_stop_signals
from soco_det.engine.tracking import open_tracker
from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.runlock import FolderLock

log = get_logger(__name__)


@dataclass
class RunContext:
    """Where a run stands once :func:`open_run` set it up: its folder, this process's device, rank
    and the number of processes, and the checkpoint it continues from (``None``: a fresh run)."""

    run_dir: Path
    device: torch.device
    rank: int
    world: int
    ckpt: dict[str, Any] | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def open_run(run_dir: str | Path, resume: str | Path | None, overwrite: bool, device_type: str) -> Iterator[RunContext]:
    """Join the torchrun process group (if any), claim the run folder on the main process (its lock is
    held until the ``with`` block ends: one run per folder, docs/architecture.md "Run folders"), and
    read the checkpoint to resume from (``None``, ``"auto"`` or a path; checked before anything is
    written). On exit the lock is released and a process group created here is destroyed."""
    run_dir = Path(run_dir)
    created_group = not dist_utils.is_initialized()
    lock: FolderLock | None = None
    try:
        device = dist_utils.init_distributed(device_type)
        if dist_utils.is_main():  # the other ranks follow the main process
            lock = claim_run_folder(run_dir, resume, overwrite)
        ckpt = load_resume(run_dir, resume)
        yield RunContext(run_dir, device, dist_utils.rank(), dist_utils.world_size(), ckpt)
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            dist_utils.cleanup()


def build_loader(
    dataset: Any,
    *,
    batch_size: int,
    sampler: torch.utils.data.Sampler,
    collate_fn: Callable,
    num_workers: WorkerCount,
    device: torch.device,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """A training loader: pinned batches on CUDA (the asynchronous copies need them), and workers
    that leave Ctrl-C / SIGTERM to the main process (it reaches the whole process group).
    ``num_workers``: a count or ``"auto"`` (:func:`soco_det.cpus.loader_workers`).
    ``generator``: the loader's own, so that starting an iterator does not draw from the global RNG
    (``None``: it does, as torch's default)."""
    if num_workers == "auto":
        num_workers = loader_workers(num_workers)
        log.info("data.num_workers=auto: %d loader workers per process", num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )


def _ddp(model: nn.Module, device: torch.device, broadcast_buffers: bool, find_unused: bool) -> nn.Module:
    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused}
    if not broadcast_buffers:
        if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
            kwargs["forward_sync_buffers"] = False  # newer torch; buffers are still equal at init
        else:
            kwargs["broadcast_buffers"] = False
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def wrap_model(
    model: nn.Module,
    device: torch.device,
    world: int,
    *,
    broadcast_buffers: bool = True,
    find_unused: bool = False,
    compile: bool = False,
) -> nn.Module:
    """What the training step calls: ``model`` under DDP when there are several processes, then
    ``torch.compile`` d if asked. ``broadcast_buffers=False`` keeps each process's BN running
    statistics its own (pretraining, as the official runs: docs/method.md 5); fine-tuning uses
    DDP's default."""
    forward_model = model
    if world > 1:
        forward_model = _ddp(model, device, broadcast_buffers, find_unused)
    if compile:
        forward_model = torch.compile(forward_model)
    return forward_model


def build_precision(amp: str, device_type: str) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """The autocast dtype of ``amp`` (``auto|bf16|fp16|none``) and the GradScaler that goes with it
    (enabled for fp16 only)."""
    amp_dtype = resolve_amp(amp, device_type)
    return amp_dtype, torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["train.loop.epochs: 4 -> 6", ...]``: the leaves in which two config dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in config_differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def resume_into(
    trainer: TrainerBase,
    ckpt: dict[str, Any] | None,
    config: dict[str, Any],
    ignored: Sequence[str] = (),
    schema: Any = None,
) -> None:
    """Load ``ckpt`` (if any) into ``trainer`` strictly, warning about every config value that differs
    from the checkpoint's (except keys starting with one of ``ignored``; with the config's ``schema``
    class, the checkpoint's config is read with its old key names at their new places first:
    checkpoints keep the flat layout of format soco-det/1); a checkpoint that does not fit this
    config is a :class:`UserError` naming it."""
    if ckpt is None:
        return
    saved = ckpt.get("config", {})
    if schema is not None:
        saved = upgrade_keys(schema, saved, quiet=True)
    ignored = ("logging", *ignored)  # where the records go does not change the training
    diffs = [d for d in config_differences(saved, config) if not d.startswith(ignored)]
    if diffs:
        log.warning("config differs from the checkpoint's: %s", "; ".join(diffs))
    try:
        trainer.load_state_dict(ckpt)
    except (RuntimeError, ValueError, KeyError) as exc:  # e.g. optimizer state of other shapes
        raise UserError(
            f"{ckpt['path']}: cannot resume from it with this config ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        ) from exc
    log.info("resumed from %s at step %d (epoch %d)", ckpt["path"], trainer.step, trainer.epoch)


def build_writer(
    run: RunContext,
    settings: Any,
    backends: Sequence[str],
    resume_step: int,
    config: dict[str, Any],
    step_key: str = "step",
) -> MetricsWriter:
    """The run's records: ``metrics.jsonl`` and, on the main process, the logging ``backends``
    (``settings``: the config's ``logging`` section; :func:`soco_det.engine.tracking.open_tracker`)
    with the resolved ``config`` given to them as text (``config``) and to W&B / MLflow as their own."""
    tracker = open_tracker(run.run_dir, settings, backends, resume_step, config) if run.is_main else None
    writer = MetricsWriter(
        run.run_dir, enabled=run.is_main, tracker=tracker, resume_step=resume_step, step_key=step_key
    )
    writer.text("config", yaml.safe_dump(config, sort_keys=False), resume_step)
    return writer


def standard_hooks(
    run: RunContext,
    metrics: MetricsHook,
    ckpt_every: int,
    keep_last: int,
    config: dict[str, Any],
    after_save: Callable[[Path], None] | None = None,
    epoch_end: bool = False,
) -> list[Hook]:
    """The hooks every run has: its metrics records, then its checkpoints (every ``ckpt_every`` steps,
    at epoch ends if ``epoch_end``, and at the end; ``keep_last`` step files kept; ``config`` saved in each)."""
    checkpoints = CheckpointHook(run.run_dir, ckpt_every, keep_last, config, after_save=after_save, epoch_end=epoch_end)
    return [metrics, checkpoints]


def run_training(trainer: TrainerBase, writer: MetricsWriter, resume_hint: str) -> None:
    """Train to the end (stop signals handled: :meth:`TrainerBase.run`), then close the metrics files."""
    try:
        trainer.run(resume_hint=resume_hint)
    finally:
        writer.close()
