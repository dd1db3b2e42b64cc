"""The SoCo pretraining run: its training step, the builders of its parts and :func:`pretrain`.

:meth:`Trainer.run_step` is the whole optimisation step (schedules, target EMA, forward under
autocast, backward, LARS step); the loop around it, the non-finite-loss check and the hooks are
the engine's (:mod:`soco_det.engine.loop`, :mod:`soco_det.engine.hooks`), shared with fine-tuning,
and so is the set-up (:mod:`soco_det.engine.build`). The data stream is
:class:`~soco_det.engine.stream.EpochStream`. :func:`pretrain` reads as its steps: open the run,
build the stream, the model, the schedules and optimizer, the trainer; resume; hooks; train.

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

from soco_det.config import downgrade_keys, save_config, to_dict
from soco_det.data.dataset import build_pretrain_dataset, collate_views
from soco_det.engine import checkpoint as ckpt_io
from soco_det.engine import distributed as dist_utils
from soco_det.engine.build import (
    RunContext,
    build_loader,
    build_precision,
    build_writer,
    open_run,
    resume_into,
    run_training,
    standard_hooks,
    wrap_model,
)
from soco_det.engine.dynamics import TrainingDynamics
from soco_det.engine.hooks import MetricsHook
from soco_det.engine.lars import build_lars
from soco_det.engine.loop import Hook, NonFiniteLossError, TrainerBase, move_to, resolve_amp, set_train_mode
from soco_det.engine.metrics import MetricsWriter
from soco_det.engine.schedules import Schedule
from soco_det.engine.stream import EpochStream
from soco_det.engine.tracking import check_backends
from soco_det.errors import UserError
from soco_det.export.init_weights import apply_init
from soco_det.logs import get_logger
from soco_det.models import convert_sync_bn, init_model
from soco_det.torch_io import resolve_device

__all__ = ["Hook", "NonFiniteLossError", "Trainer", "move_to", "pretrain", "resolve_amp", "set_train_mode"]

log = get_logger(__name__)


class Trainer(TrainerBase):
    """The SoCo optimisation step and the state of one pretraining run (model, optimizer, scaler,
    schedules, step; the data stream's epoch and position).

    A step takes ``accum_steps`` micro-batches from ``stream`` (an
    :class:`~soco_det.engine.stream.EpochStream`, which owns the epoch and the position in it and
    is resumable mid-epoch). The loop, the hooks and the non-finite check are the engine's.
    """

    nonfinite_hint = "lower train.optim.base_lr or raise train.optim.warmup_epochs"

    def __init__(
        self,
        *,
        model: nn.Module,
        forward_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        schedule: Schedule,
        stream: EpochStream,
        amp_dtype: torch.dtype | None,
        stop_step: int,
        run_dir: Path | None = None,
        hooks: Sequence[Hook] = (),
        check_every: int = 1,
    ) -> None:
        self.stream, self.schedule = stream, schedule
        super().__init__(
            model=model,
            forward_model=forward_model,
            optimizer=optimizer,
            scaler=scaler,
            device=stream.device,
            stop_step=stop_step,
            amp_dtype=amp_dtype,
            run_dir=run_dir,
            hooks=hooks,
            check_every=check_every,
        )

    @property  # type: ignore[override]
    def epoch(self) -> int:
        return self.stream.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.stream.epoch = value

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

    # ------------------------------------------------------------------ data and state
    def next_batch(self) -> list[dict]:
        return self.stream.next()

    def advance(self) -> None:
        # The step is queued on the device: the stream loads (and starts copying) the next one meanwhile.
        self.epoch_ended = self.stream.advance(more_steps=self.step < self.stop_step)

    def close_data(self) -> None:
        self.stream.close()

    def state_dict(self, config: dict) -> dict[str, Any]:
        return {**super().state_dict(config), "sampler": self.stream.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Strict, exact resume: weights, optimizer, scaler, step, epoch, sampler position, RNG."""
        super().load_state_dict(ckpt)
        self.stream.load_state_dict(ckpt["sampler"], int(ckpt["epoch"]))
        ckpt_io.restore_rng(ckpt["rng"])


class PretrainMetricsHook(MetricsHook):
    """Pretraining's records: the loss of the record's step and its pair terms, the LR, the target
    momentum, the epoch, images/s, images skipped, and the sources' metrics (dynamics, probe)."""

    def extra(self, trainer: TrainerBase, out: dict[str, Any], steps_per_s: float) -> dict[str, Any]:
        assert isinstance(trainer, Trainer)
        return {
            "epoch": trainer.epoch,
            "momentum": out["momentum"],
            "img_per_s": steps_per_s * trainer.stream.images_per_step,
            "skipped_images": trainer.stream.skipped_images,
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
def resolve_lars_eta(optim: Any, schedule: Schedule) -> float:
    """LARS trust coefficient of a run (``optim``: ``train.optim``). ``budget=paper``: ``lars_eta`` as
    given. ``budget=auto``: large enough that a conv weight moves by ``target_update`` of its
    norm per step at the peak learning rate (``peak_lr * eta``), never below ``lars_eta``:
    the paper's batch 2048 (lr 8, eta 0.001: 8e-3 per step) is left as it is, while batch 16 (lr
    0.0625) gets eta 0.02 instead of a step of 6e-5 that leaves the features untrained
    (docs/results.md, "Budget-aware pretraining")."""
    if optim.budget == "paper":
        return optim.lars_eta
    return max(optim.lars_eta, optim.target_update / schedule.peak_lr)


def find_unused_parameters(loop: Any, model_cfg: Any) -> bool:
    """``train.loop.find_unused_parameters``, or when it is null: only in ``assigned_level`` RoI mode,
    where a level that gets no box in a batch leaves its FPN output conv without a gradient."""
    if loop.find_unused_parameters is not None:
        return bool(loop.find_unused_parameters)
    return getattr(model_cfg, "roi_mode", "all_levels") == "assigned_level"


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch seeded alike on every process: the same initial weights everywhere
    (DDP also broadcasts them from rank 0)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_stream(cfg: Any, run: RunContext) -> EpochStream:
    """The epoch stream of this process: the pretraining dataset, a resumable sampler over this
    process's share of it, and a loader with its own generator (starting an iterator must not draw
    from the global RNG, whose state the checkpoint restores; samples draw from their own
    per-sample generators)."""
    dataset = build_pretrain_dataset(cfg.data, seed=cfg.seed)
    batch_size, accum_steps = cfg.data.batch_size, cfg.train.loop.accum_steps
    sampler = dist_utils.ResumableSampler(len(dataset), run.world, run.rank, seed=cfg.seed)
    steps_per_epoch = sampler.per_replica // batch_size // accum_steps
    if steps_per_epoch < 1:
        raise UserError(
            f"{len(dataset)} training images are fewer than one step needs "
            f"(data.batch_size={batch_size} x {run.world} processes x train.loop.accum_steps={accum_steps})"
        )
    loader = build_loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_views,
        num_workers=cfg.data.num_workers,
        device=run.device,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return EpochStream(
        loader=loader,
        sampler=sampler,
        dataset=dataset,
        accum_steps=accum_steps,
        steps_per_epoch=steps_per_epoch,
        images_per_step=batch_size * run.world * accum_steps,
        device=run.device,
        channels_last=bool(cfg.model.channels_last),
        device_photometric=cfg.data.photometric == "device",
    )


def build_soco_model(cfg: Any, run: RunContext) -> tuple[nn.Module, nn.Module]:
    """``(model, forward_model)``: the SoCo network the run starts from (``init_model``, then
    ``model.init`` on a fresh run), SyncBN under several processes, on the device in train mode,
    and what the step calls (DDP without buffer broadcasts, compiled if ``train.loop.compile``)."""
    model = init_model(cfg.model, cfg.seed)
    if cfg.model.init and run.ckpt is None:
        apply_init(model, cfg.model, run.run_dir if run.is_main else None)
    if run.world > 1 and cfg.model.sync_bn:  # gloo (CPU) or NCCL: soco_det.models.segment_bn
        model = convert_sync_bn(model)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.preserve_format
    model = model.to(run.device, memory_format=memory_format)
    set_train_mode(model, cfg.train.loop.freeze_bn)
    forward_model = wrap_model(
        model,
        run.device,
        run.world,
        broadcast_buffers=False,
        find_unused=find_unused_parameters(cfg.train.loop, cfg.model),
        compile=cfg.train.loop.compile,
    )
    return model, forward_model


def build_optimizer(optim: Any, model: nn.Module, schedule: Schedule) -> tuple[torch.optim.Optimizer, float]:
    """LARS (``train.optim``) at the schedule's peak LR and the run's trust coefficient
    (:func:`resolve_lars_eta`)."""
    eta = resolve_lars_eta(optim, schedule)
    return build_lars(model, schedule.peak_lr, optim.weight_decay, optim.sgd_momentum, eta, optim.lars_eps), eta


def pretrain_hooks(
    cfg: Any, run: RunContext, writer: MetricsWriter, schedule: Schedule, hooks: Sequence[Hook], sources: Sequence[Any]
) -> list[Hook]:
    """Training dynamics, the metrics records (with the dynamics and the callers' ``sources``, main
    process), the checkpoints, then the caller's ``hooks``."""
    loop = cfg.train.loop
    dynamics = TrainingDynamics(loop.log_every, schedule.warmup_steps, cfg.model, cfg.seed)
    if cfg.train.probe.every and not sources:
        log.warning(
            "train.probe.every=%d but no probe was passed: give pretrain(..., metric_sources=[OnlineProbe(cfg)]) "
            "(soco_det.probe.online; soco-det pretrain does this)",
            cfg.train.probe.every,
        )
    metrics = PretrainMetricsHook(
        writer,
        loop.log_every,
        show_progress=loop.progress and run.is_main,
        desc="pretrain",
        sources=[dynamics, *(sources if run.is_main else ())],
    )
    # checkpoints keep the config in the key layout of their format, soco-det/1 (flat train.* / data.views.*)
    saved = downgrade_keys(type(cfg), to_dict(cfg))
    checkpoints = standard_hooks(run, metrics, loop.ckpt_every, loop.keep_last, saved, epoch_end=loop.ckpt_epoch_end)
    return [dynamics, *checkpoints, *hooks]


def logging_backends(cfg: Any) -> list[str]:
    """``logging.backends``, less TensorBoard when ``train.loop.tensorboard`` is false (the older switch)."""
    return [b for b in cfg.logging.backends if b != "tensorboard" or cfg.train.loop.tensorboard]


def log_views_picture(cfg: Any, run: RunContext, writer: MetricsWriter) -> None:
    """At the start of a fresh run, on the main process: a few samples' views drawn to
    ``RUN/views.png`` (:func:`soco_det.data.viz.render_views`) and given to the logging back-ends.
    The views are the ones the run trains on (the samples are seeded by index and epoch); a picture
    that fails is a warning, never the end of the run."""
    from dataclasses import replace

    from soco_det.data.viz import render_views

    if not (run.is_main and writer.backends):
        return
    try:
        # device photometric sends uint8 views without colour: draw the views of the CPU path
        data = replace(cfg.data, photometric="cpu") if cfg.data.photometric == "device" else cfg.data
        picture = render_views(build_pretrain_dataset(data, seed=cfg.seed), str(run.run_dir / "views.png"), samples=3)
        writer.image("data/views", picture, 0)
    except Exception as exc:  # a picture is a convenience
        log.warning("views picture skipped (%s: %s)", type(exc).__name__, exc)


def _log_start(cfg: Any, run: RunContext, trainer: Trainer, lars_eta: float) -> None:
    optim, stream, schedule = cfg.train.optim, trainer.stream, trainer.schedule
    log.info(
        "pretraining on %s x %d: %d images, %d steps/epoch, %d epochs, batch %d (%d per process), "
        "peak lr %.4g (%s scaling), LARS eta %.4g (budget %s: peak relative step %.2g), amp %s",
        run.device.type,
        run.world,
        len(stream.dataset),
        stream.steps_per_epoch,
        cfg.train.loop.epochs,
        stream.images_per_step,
        cfg.data.batch_size,
        schedule.peak_lr,
        optim.lr_scaling,
        lars_eta,
        optim.budget,
        schedule.peak_lr * lars_eta,
        trainer.amp_dtype,
    )


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
    Works in one process or under ``torchrun`` (``env://``); the main process locks ``out_dir`` for
    the run. Writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and what ``logging.backends``
    asks for (``tensorboard/``, ``wandb/``, ``mlruns/``; ``views.png``) there and returns it. On
    SIGINT/SIGTERM the current step is finished, a checkpoint saved and
    :class:`~soco_det.errors.Interrupted` raised. ``hooks`` run after the engine's own;
    ``metric_sources`` (objects with ``metrics(trainer) -> dict``, used on the main process) add
    fields to every metrics record, e.g. the online probe of ``train.probe.every``
    (:class:`soco_det.probe.online.OnlineProbe`): the engine does not import the probe stage.
    """
    loop = cfg.train.loop
    check_backends(logging_backends(cfg))  # a missing package is said before anything runs
    if loop.cpu_threads is not None:
        torch.set_num_threads(loop.cpu_threads)
    device_type = resolve_device(loop.device, "train.loop.device")
    with open_run(out_dir, resume, overwrite, device_type) as run:
        seed_everything(cfg.seed)
        stream = build_stream(cfg, run)
        model, forward_model = build_soco_model(cfg, run)
        schedule = Schedule.from_config(cfg.train, stream.steps_per_epoch, stream.images_per_step)
        optimizer, lars_eta = build_optimizer(cfg.train.optim, model, schedule)
        amp_dtype, scaler = build_precision(loop.amp, device_type)
        trainer = Trainer(
            model=model,
            forward_model=forward_model,
            optimizer=optimizer,
            scaler=scaler,
            schedule=schedule,
            stream=stream,
            amp_dtype=amp_dtype,
            stop_step=min(loop.max_steps or schedule.total_steps, schedule.total_steps),
            run_dir=run.run_dir,
            check_every=loop.log_every,
        )
        # train.loop.max_steps may change between a run and its resume: the schedules do not depend on it.
        resume_into(trainer, run.ckpt, to_dict(cfg), ignored=("train.loop.max_steps",), schema=type(cfg))
        if run.is_main:
            save_config(cfg, run.run_dir)  # only now: a rejected resume leaves the folder as it was
        writer = build_writer(run, cfg.logging, logging_backends(cfg), trainer.step, to_dict(cfg))
        if trainer.step == 0:
            log_views_picture(cfg, run, writer)
        trainer.hooks = pretrain_hooks(cfg, run, writer, schedule, hooks, metric_sources)
        _log_start(cfg, run, trainer, lars_eta)
        run_training(trainer, writer, resume_hint="--resume auto")
    return run.run_dir
