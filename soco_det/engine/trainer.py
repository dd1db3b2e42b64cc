"""The SoCo pretraining run: its training step, its data stream and :func:`pretrain`.

:meth:`Trainer.run_step` is the whole optimisation step (schedules, target EMA, forward under
autocast, backward, LARS step); the loop around it, the non-finite-loss check and the hooks are
the engine's (:mod:`soco_det.engine.loop`, :mod:`soco_det.engine.hooks`), shared with fine-tuning.

Step numbering: ``trainer.step`` counts *completed* optimizer steps (the global step of
docs/method.md 9.11); the step under way uses the schedules at ``trainer.step`` and is reported to the
user as step ``trainer.step + 1``; ``checkpoints/step_00000002.pt`` holds the state after 2 steps.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from soco_det.config import save_config, to_dict
from soco_det.data.dataset import build_pretrain_dataset, collate_views
from soco_det.data.device_photometric import apply_device_photometric
from soco_det.engine import checkpoint as ckpt_io
from soco_det.engine import distributed as dist_utils
from soco_det.engine.dynamics import TrainingDynamics
from soco_det.engine.hooks import CheckpointHook, MetricsHook
from soco_det.engine.lars import build_lars
from soco_det.engine.loop import Hook, NonFiniteLossError, TrainerBase, move_to, resolve_amp, set_train_mode
from soco_det.engine.metrics import MetricsWriter
from soco_det.engine.prefetch import CopyStream
from soco_det.engine.schedules import Schedule
from soco_det.engine.signals import ignore_stop_signals
from soco_det.errors import UserError
from soco_det.export.init_weights import apply_init
from soco_det.logs import get_logger
from soco_det.models import convert_sync_bn, init_model
from soco_det.runlock import FolderLock
from soco_det.torch_io import resolve_device

__all__ = ["Hook", "NonFiniteLossError", "Trainer", "move_to", "pretrain", "resolve_amp", "set_train_mode"]

log = get_logger(__name__)


class Trainer(TrainerBase):
    """Owns the model, optimizer, data and state of one pretraining run.

    ``model`` is the unwrapped SoCo model (``update_target``, ``state_dict``); ``forward_model``
    is what the forward pass calls (the model itself, or its DDP / compiled wrapper). The data
    stream is epoch-based and resumable mid-epoch (``sampler.position``); a step takes
    ``accum_steps`` micro-batches, and an epoch's tail that cannot fill a step is skipped.
    """

    nonfinite_hint = "lower train.base_lr or raise train.warmup_epochs"

    def __init__(
        self,
        *,
        model: nn.Module,
        forward_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        schedule: Schedule,
        loader: torch.utils.data.DataLoader,
        sampler: dist_utils.ResumableSampler,
        dataset: Any,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        accum_steps: int,
        steps_per_epoch: int,
        stop_step: int,
        images_per_step: int,
        run_dir: Path | None = None,
        channels_last: bool = False,
        device_photometric: bool = False,
        hooks: Sequence[Hook] = (),
        check_every: int = 1,
    ) -> None:
        super().__init__(
            device=device,
            stop_step=stop_step,
            amp_dtype=amp_dtype,
            run_dir=run_dir,
            hooks=hooks,
            check_every=check_every,
        )
        self.model, self.forward_model, self.optimizer, self.scaler = model, forward_model, optimizer, scaler
        self.schedule, self.loader, self.sampler, self.dataset = schedule, loader, sampler, dataset
        self.accum_steps, self.steps_per_epoch, self.images_per_step = accum_steps, steps_per_epoch, images_per_step
        self.channels_last, self.device_photometric = channels_last, device_photometric
        self.skipped_images = 0  # in this process since the start (or resume) of the run
        self._copies = CopyStream(device)  # the next batch's host-to-device copies (CUDA only)
        self._iterator: Any = None  # over the loader, for the epoch under way
        self._pending: list | None = None  # the next step's micro-batches, already being copied
        self._done_micro = 0  # micro-batches of this epoch consumed on this process

    def prepare_batch(self, batch: dict) -> dict:
        """Move a collated batch to the device; with ``data.photometric=device`` the colour, blur,
        solarize, normalisation and cutout of the views run there (the loader sent uint8 views)."""
        if self.device_photometric:
            batch = apply_device_photometric(move_to(batch, self.device))
        return move_to(batch, self.device, self.channels_last)

    # ------------------------------------------------------------------ the training step
    def run_step(self, micro_batches: Sequence[dict]) -> dict[str, Any]:
        """One optimizer step over ``accum_steps`` micro-batches; returns detached metrics."""
        # 1. Schedules are functions of the global step (restored from the checkpoint on resume).
        lr = self.schedule.lr(self.step)
        tau = self.schedule.momentum(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # 2. Target EMA with tau(step), once per step and before the forward pass (official order).
        self.model.update_target(tau)

        total_loss = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients on the last micro-batch only.
            no_sync = getattr(self.forward_model, "no_sync", None)
            sync_ctx = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync_ctx:
                # 3. Forward under autocast; RoIAlign and the loss run in fp32, BN accumulates its
                #    statistics in fp32 (its input and output follow autocast; tests/test_amp.py).
                with self.autocast():
                    out = self.forward_model(batch)
                loss = out["loss"].float() / len(micro_batches)
                # 4. Note a non-finite loss on the device, without a host sync: the loop checks it
                #    every check_every steps and before any checkpoint is saved (check_finite).
                self.note_finite(loss.detach())
                # 5. Backward (scaled for fp16; the scale is 1 and disabled otherwise).
                self.scaler.scale(loss).backward()
            total_loss += loss.detach()
            # pair losses and auxiliary terms (e.g. model.head_decorrelation), logged as loss/<name>
            for name, value in {**out.get("pair_losses", {}), **out.get("aux_losses", {})}.items():
                key = f"loss/{name}"
                terms[key] = terms.get(key, 0) + value.detach().float() / len(micro_batches)

        # 6. LARS/SGD step at lr(step); GradScaler skips it if fp16 gradients overflowed.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": total_loss, "terms": terms, "lr": lr, "momentum": tau}

    # ------------------------------------------------------------------ the data stream
    @property
    def _micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum_steps

    def _fetch(self) -> list:
        """The next ``accum_steps`` micro-batches; on CUDA their copies to the device have started."""
        micro = [next(self._iterator) for _ in range(self.accum_steps)]
        # bad images the dataset replaced (counted in the workers, reported here)
        self.skipped_images += sum(int(b["skipped"].sum()) for b in micro if "skipped" in b)
        return self._copies.start(micro, lambda b: move_to(b, self.device))

    def _start_epoch(self) -> None:
        """Iterate the epoch ``self.epoch`` from ``sampler.position`` (skipping an epoch whose
        remaining micro-batches cannot fill a step)."""
        batch_size = self.loader.batch_size
        while True:
            self.sampler.set_epoch(self.epoch, self.sampler.position)
            self.dataset.set_epoch(self.epoch)
            self._done_micro = self.sampler.position // batch_size
            if self._micro_per_epoch - self._done_micro >= self.accum_steps:
                break
            self.epoch, self.sampler.position = self.epoch + 1, 0
        self._iterator = iter(self.loader)

    def next_batch(self) -> list:
        if self._iterator is None:
            self._start_epoch()
        micro = self._pending if self._pending is not None else self._fetch()
        self._pending = None
        return [self.prepare_batch(self._copies.arrived(b)) for b in micro]

    def advance(self) -> None:
        # The step is queued on the device: load and start copying the next one meanwhile.
        more = self._done_micro + 2 * self.accum_steps <= self._micro_per_epoch and self.step < self.stop_step
        self._pending = self._fetch() if more and self._copies.enabled else None
        self._done_micro += self.accum_steps
        self.sampler.position = self._done_micro * self.loader.batch_size
        self.epoch_ended = self._done_micro + self.accum_steps > self._micro_per_epoch
        if self.epoch_ended:
            self.epoch, self.sampler.position = self.epoch + 1, 0
            self._iterator = None  # the loader's workers end with it

    def close_data(self) -> None:
        self._iterator = self._pending = None

    # ------------------------------------------------------------------ state
    def state_dict(self, config: dict) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "sampler": {**self.sampler.state_dict(), "epoch": self.epoch},
            "rng": ckpt_io.capture_rng(),
            "config": config,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Strict, exact resume: weights, optimizer, scaler, step, epoch, sampler position, RNG."""
        ckpt_io.load_model_strict(self.model, ckpt["model"], source=ckpt.get("path", "checkpoint"))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.sampler.load_state_dict(ckpt["sampler"])
        ckpt_io.restore_rng(ckpt["rng"])


class PretrainMetricsHook(MetricsHook):
    """Pretraining's records: the loss of the record's step and its pair terms, the LR, the target
    momentum, the epoch, images/s, images skipped, and the sources' metrics (dynamics, probe)."""

    def extra(self, trainer: TrainerBase, out: dict[str, Any], steps_per_s: float) -> dict[str, Any]:
        assert isinstance(trainer, Trainer)
        return {
            "epoch": trainer.epoch,
            "momentum": out["momentum"],
            "img_per_s": steps_per_s * trainer.images_per_step,
            "skipped_images": trainer.skipped_images,
        }

    def log(self, trainer: TrainerBase, record: dict[str, Any]) -> None:
        dynamics = "".join(
            f" {key.split('/', 1)[1]} {record[key]:.3g}"
            for key in ("move/encoder", "collapse/head_rank")
            if key in record
        )
        log.info(
            "step %d/%d epoch %d loss %.4f lr %.4g tau %.5f %.1f img/s%s",
            trainer.step,
            trainer.stop_step,
            trainer.epoch,
            record["loss"],
            record["lr"],
            record["momentum"],
            record["img_per_s"],
            dynamics,
        )


# ---------------------------------------------------------------------- assembling a run
def resolve_lars_eta(train: Any, schedule: Schedule) -> float:
    """LARS trust coefficient of a run. ``train.budget=paper``: ``train.lars_eta`` as given.
    ``train.budget=auto``: large enough that a conv weight moves by ``train.target_update`` of its
    norm per step at the peak learning rate (``peak_lr * eta``), never below ``train.lars_eta``:
    the paper's batch 2048 (lr 8, eta 0.001: 8e-3 per step) is left as it is, while batch 16 (lr
    0.0625) gets eta 0.02 instead of a step of 6e-5 that leaves the features untrained
    (docs/results.md, "Budget-aware pretraining")."""
    if train.budget == "paper":
        return train.lars_eta
    return max(train.lars_eta, train.target_update / schedule.peak_lr)


def find_unused_parameters(train: Any, model_cfg: Any) -> bool:
    """``train.find_unused_parameters``, or when it is null: only in ``assigned_level`` RoI mode,
    where a level that gets no box in a batch leaves its FPN output conv without a gradient."""
    if train.find_unused_parameters is not None:
        return bool(train.find_unused_parameters)
    return getattr(model_cfg, "roi_mode", "all_levels") == "assigned_level"


def wrap_ddp(model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """DDP without buffer broadcasts in forward (docs/method.md 5: ``broadcast_buffers=False``): each
    process keeps its own BN running statistics, as in the official runs."""
    import inspect

    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
        kwargs["forward_sync_buffers"] = False  # newer torch; buffers are still equal at init
    else:
        kwargs["broadcast_buffers"] = False
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def _config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _config_differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def pretrain(
    cfg: Any,
    out_dir: str | Path,
    resume: str | Path | None = None,
    hooks: Sequence[Hook] = (),
    overwrite: bool = False,
    metric_sources: Sequence[Any] = (),
) -> Path:
    """Train SoCo with ``cfg`` (a :class:`~soco_det.engine.config.PretrainConfig`) into ``out_dir``.

    ``resume``: ``None`` (start fresh; refused if ``out_dir`` holds checkpoints, unless
    ``overwrite``, which moves the old run to ``OUT.old-<time>``), ``"auto"`` (continue from
    ``out_dir``'s newest intact checkpoint if there is one) or a checkpoint file / run folder.
    Works in one process or under ``torchrun`` (``env://``). The main process holds an exclusive
    lock on ``out_dir`` for the whole run. The checkpoint is checked against the config (names and
    shapes) before anything is written. Writes ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``
    and ``checkpoints/`` in ``out_dir`` and returns it. On SIGINT/SIGTERM the current step is
    finished, a checkpoint saved and :class:`~soco_det.errors.Interrupted` raised.

    ``hooks`` run after the engine's own; ``metric_sources`` (objects with ``metrics(trainer) ->
    dict``, used on the main process) add fields to every metrics record, e.g. the online object
    probe of ``train.probe_every`` (:class:`soco_det.probe.online.OnlineProbe`), which the caller
    builds: the engine does not import the probe stage.
    """
    import random

    import numpy as np

    run_dir = Path(out_dir)
    train = cfg.train
    if train.cpu_threads is not None:
        torch.set_num_threads(train.cpu_threads)
    device_type = resolve_device(train.device, "train.device")
    created_group = not dist_utils.is_initialized()
    device = dist_utils.init_distributed(device_type)
    world, rank = dist_utils.world_size(), dist_utils.rank()
    lock: FolderLock | None = None
    try:
        if dist_utils.is_main():  # one run per folder; the other ranks follow the main process
            lock = ckpt_io.claim_run_folder(run_dir, resume, overwrite)
        # The checkpoint to resume from, read (and checked) before anything is written.
        ckpt = ckpt_io.load_resume(run_dir, resume)
        config_dict = to_dict(cfg)

        # Same initial weights on every process (DDP also broadcasts them from rank 0).
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        dataset = build_pretrain_dataset(cfg.data, seed=cfg.seed)
        batch_size = cfg.data.batch_size
        sampler = dist_utils.ResumableSampler(len(dataset), world, rank, seed=cfg.seed)
        steps_per_epoch = sampler.per_replica // batch_size // train.accum_steps
        if steps_per_epoch < 1:
            raise UserError(
                f"{len(dataset)} training images are fewer than one step needs "
                f"(data.batch_size={batch_size} x {world} processes x train.accum_steps={train.accum_steps})"
            )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_views,
            num_workers=cfg.data.num_workers,
            pin_memory=device_type == "cuda",
            drop_last=True,
            # Its own generator: starting a loader iterator must not consume the global RNG, whose
            # state the checkpoint restores (samples draw from their own per-sample generators).
            generator=torch.Generator().manual_seed(cfg.seed),
            # Ctrl-C reaches the whole process group: the workers leave it to the main process.
            worker_init_fn=ignore_stop_signals if cfg.data.num_workers > 0 else None,
        )

        model = init_model(cfg.model, cfg.seed)
        if cfg.model.init and ckpt is None:
            apply_init(model, cfg.model, run_dir if dist_utils.is_main() else None)
        if world > 1 and cfg.model.sync_bn:  # gloo (CPU) or NCCL: soco_det.models.segment_bn
            model = convert_sync_bn(model)
        channels_last = bool(cfg.model.channels_last)
        model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        set_train_mode(model, train.freeze_bn)
        forward_model: nn.Module = model
        if world > 1:
            forward_model = wrap_ddp(model, device, find_unused_parameters(train, cfg.model))
        if train.compile:
            forward_model = torch.compile(forward_model)

        images_per_step = batch_size * world * train.accum_steps
        schedule = Schedule.from_config(train, steps_per_epoch, images_per_step)
        lars_eta = resolve_lars_eta(train, schedule)
        optimizer = build_lars(
            model, schedule.peak_lr, train.weight_decay, train.sgd_momentum, lars_eta, train.lars_eps
        )
        amp_dtype = resolve_amp(train.amp, device_type)
        scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
        stop_step = schedule.total_steps if train.max_steps is None else min(train.max_steps, schedule.total_steps)

        trainer = Trainer(
            model=model,
            forward_model=forward_model,
            optimizer=optimizer,
            scaler=scaler,
            schedule=schedule,
            loader=loader,
            sampler=sampler,
            dataset=dataset,
            device=device,
            amp_dtype=amp_dtype,
            accum_steps=train.accum_steps,
            steps_per_epoch=steps_per_epoch,
            stop_step=stop_step,
            images_per_step=images_per_step,
            run_dir=run_dir,
            channels_last=channels_last,
            device_photometric=cfg.data.photometric == "device",
            check_every=train.log_every,
        )
        if ckpt is not None:
            # On the CPU: RNG states must stay CPU tensors; weights and optimizer state are copied
            # to the parameters' device by load_state_dict.
            diffs = [
                d
                for d in _config_differences(ckpt.get("config", {}), config_dict)
                if not d.startswith("train.max_steps")
            ]
            if diffs:
                log.warning("config differs from the checkpoint's: %s", "; ".join(diffs))
            try:
                trainer.load_state_dict(ckpt)
            except (RuntimeError, ValueError, KeyError) as exc:  # e.g. optimizer state of other shapes
                raise UserError(
                    f"{ckpt['path']}: cannot resume from it with this config "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0]})"
                ) from exc
            log.info("resumed from %s at step %d (epoch %d)", ckpt["path"], trainer.step, trainer.epoch)
        if dist_utils.is_main():
            save_config(cfg, run_dir)  # only now: a rejected resume leaves the folder as it was

        writer = MetricsWriter(
            run_dir, enabled=dist_utils.is_main(), tensorboard=train.tensorboard, resume_step=trainer.step
        )
        dynamics = TrainingDynamics(train.log_every, schedule.warmup_steps, cfg.model, cfg.seed)
        if train.probe_every and not metric_sources:
            log.warning(
                "train.probe_every=%d but no probe was passed: give pretrain(..., metric_sources=[OnlineProbe(cfg)]) "
                "(soco_det.probe.online; soco-det pretrain does this)",
                train.probe_every,
            )
        sources: list[Any] = [dynamics, *(metric_sources if dist_utils.is_main() else ())]
        trainer.hooks = [
            dynamics,
            PretrainMetricsHook(
                writer,
                train.log_every,
                show_progress=train.progress and dist_utils.is_main(),
                desc="pretrain",
                sources=sources,
            ),
            CheckpointHook(run_dir, train.ckpt_every, train.keep_last, config_dict),
            *hooks,
        ]
        log.info(
            "pretraining on %s x %d: %d images, %d steps/epoch, %d epochs, batch %d (%d per process), "
            "peak lr %.4g (%s scaling), LARS eta %.4g (budget %s: peak relative step %.2g), amp %s",
            device_type,
            world,
            len(dataset),
            steps_per_epoch,
            train.epochs,
            images_per_step,
            batch_size,
            schedule.peak_lr,
            train.lr_scaling,
            lars_eta,
            train.budget,
            schedule.peak_lr * lars_eta,
            amp_dtype,
        )
        try:
            trainer.run(resume_hint="--resume auto")
        finally:
            writer.close()
        return run_dir
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            dist_utils.cleanup()
