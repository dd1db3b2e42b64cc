"""The SoCo pretraining loop: one short training step and the hooks around it.

:meth:`Trainer.run_step` is the whole optimisation step (schedules, target EMA, forward under
autocast, backward, LARS step). Everything else (metrics, progress, checkpoints) is a
:class:`Hook`, called before/after each step and at the ends of the run.

Step numbering: ``trainer.step`` counts *completed* optimizer steps (the global step of
SOCO_SPEC 9.11); the step under way uses the schedules at ``trainer.step`` and is reported to the
user as step ``trainer.step + 1``; ``checkpoints/step_00000002.pt`` holds the state after 2 steps.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from soco_det.engine import checkpoint as ckpt_io
from soco_det.engine import distributed as dist_utils
from soco_det.engine.metrics import MetricsWriter
from soco_det.engine.prefetch import CopyStream
from soco_det.engine.schedules import Schedule
from soco_det.logs import Progress, get_logger
from soco_det.torch_io import resolve_device

log = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving that state."""


class Hook:
    """Callbacks around the training step; override what you need."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer", out: dict[str, Any]) -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...


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


class Trainer:
    """Owns the model, optimizer, data and state of one pretraining run.

    ``model`` is the unwrapped SoCo model (``update_target``, ``state_dict``); ``forward_model``
    is what the forward pass calls (the model itself, or its DDP / compiled wrapper).
    """

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
        self.model, self.forward_model, self.optimizer, self.scaler = model, forward_model, optimizer, scaler
        self.schedule, self.loader, self.sampler, self.dataset = schedule, loader, sampler, dataset
        self.device, self.amp_dtype, self.accum_steps = device, amp_dtype, accum_steps
        self.steps_per_epoch, self.stop_step, self.images_per_step = steps_per_epoch, stop_step, images_per_step
        self.channels_last, self.run_dir = channels_last, run_dir
        self.device_photometric = device_photometric
        self.hooks = list(hooks)
        self.step = 0
        self.epoch = 0
        self.epoch_ended = False  # True right after the step that finished an epoch
        self.skipped_images = 0  # in this process since the start (or resume) of the run
        # Non-finite losses are noted on the device (no host sync per step) and checked every
        # ``check_every`` steps and before any checkpoint is written (:meth:`check_finite`).
        self.check_every = max(1, int(check_every))
        self._first_bad: torch.Tensor | None = None  # [step of the first non-finite loss or -1, that loss]
        self._checked_step = -1
        self._copies = CopyStream(device)  # the next batch's host-to-device copies (CUDA only)
        # Asked before each step; True ends the loop early (a stop signal, see engine/signals.py).
        self.should_stop: Callable[[], bool] = lambda: False
        self.stopped = False

    def _stop_now(self) -> bool:
        self.stopped = self.stopped or self.should_stop()
        return self.stopped

    def prepare_batch(self, batch: dict) -> dict:
        """Move a collated batch to the device; with ``data.photometric=device`` the colour, blur,
        solarize, normalisation and cutout of the views run there (the loader sent uint8 views)."""
        if self.device_photometric:
            from soco_det.data.device_photometric import apply_device_photometric

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
        pair_losses: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients on the last micro-batch only.
            no_sync = getattr(self.forward_model, "no_sync", None)
            sync_ctx = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync_ctx:
                # 3. Forward under autocast; RoIAlign and the loss run in fp32, BN accumulates its
                #    statistics in fp32 (its input and output follow autocast; tests/test_amp.py).
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
                ):
                    out = self.forward_model(batch)
                loss = out["loss"].float() / len(micro_batches)
                # 4. Note a non-finite loss on the device, without a host sync: train() checks it
                #    every check_every steps and before any checkpoint is saved (check_finite).
                self._note_finite(loss.detach())
                # 5. Backward (scaled for fp16; the scale is 1 and disabled otherwise).
                self.scaler.scale(loss).backward()
            total_loss += loss.detach()
            # pair losses and auxiliary terms (e.g. model.head_decorrelation), logged as loss/<name>
            for name, value in {**out.get("pair_losses", {}), **out.get("aux_losses", {})}.items():
                pair_losses[name] = pair_losses.get(name, 0) + value.detach().float() / len(micro_batches)

        # 6. LARS/SGD step at lr(step); GradScaler skips it if fp16 gradients overflowed.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": total_loss, "pair_losses": pair_losses, "lr": lr, "momentum": tau}

    def _note_finite(self, loss: torch.Tensor) -> None:
        if self._first_bad is None:
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
        first = self._first_bad
        newly = ~torch.isfinite(loss) & (first[0] < 0)
        self._first_bad = torch.where(newly, torch.stack([loss.new_tensor(float(self.step + 1)), loss]), first)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a loss since the start was non-finite on any process
        (one host sync; the same decision on every process). The state in memory is then bad, so the
        run stops before any hook can save it."""
        if self._first_bad is None or self._checked_step == self.step:
            return
        self._checked_step = self.step
        first = self._first_bad.clone()
        bad = dist_utils.all_reduce_mean((first[:1] >= 0).float())
        if bad.item() == 0:
            return
        step, value = (int(first[0].item()), first[1].item()) if first[0] >= 0 else (self.step, float("nan"))
        last = ckpt_io.find_resume(self.run_dir) if self.run_dir is not None else None
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at step {step} (epoch {self.epoch}); "
            f"stopped without saving this state; last good checkpoint: {last or 'none'}"
        )

    # ------------------------------------------------------------------ the loop
    def _fetch(self, iterator) -> list:  # noqa: ANN001
        """The next ``accum_steps`` micro-batches; on CUDA their copies to the device have started."""
        micro = [next(iterator) for _ in range(self.accum_steps)]
        # bad images the dataset replaced (counted in the workers, reported here)
        self.skipped_images += sum(int(b["skipped"].sum()) for b in micro if "skipped" in b)
        return self._copies.start(micro, lambda b: move_to(b, self.device))

    def train(self) -> None:
        for hook in self.hooks:
            hook.before_train(self)
        micro_per_epoch = self.steps_per_epoch * self.accum_steps
        batch_size = self.loader.batch_size
        while self.step < self.stop_step and not self._stop_now():
            self.sampler.set_epoch(self.epoch, self.sampler.position)
            self.dataset.set_epoch(self.epoch)
            done_micro = self.sampler.position // batch_size
            if micro_per_epoch - done_micro >= self.accum_steps:
                iterator = iter(self.loader)
                pending = None  # the next step's micro-batches, already being copied to the device
                while (
                    done_micro + self.accum_steps <= micro_per_epoch
                    and self.step < self.stop_step
                    and not self._stop_now()
                ):
                    micro = pending if pending is not None else self._fetch(iterator)
                    micro = [self.prepare_batch(self._copies.arrived(b)) for b in micro]
                    for hook in self.hooks:
                        hook.before_step(self)
                    out = self.run_step(micro)
                    # The step is queued on the device: load and start copying the next one meanwhile.
                    more = done_micro + 2 * self.accum_steps <= micro_per_epoch and self.step < self.stop_step
                    pending = self._fetch(iterator) if more and self._copies.enabled else None
                    if self.step % self.check_every == 0 or self.step >= self.stop_step:
                        self.check_finite()
                    done_micro += self.accum_steps
                    self.sampler.position = done_micro * batch_size
                    self.epoch_ended = done_micro + self.accum_steps > micro_per_epoch
                    if self.epoch_ended:
                        self.epoch, self.sampler.position = self.epoch + 1, 0
                    for hook in self.hooks:
                        hook.after_step(self, out)
                del iterator
            else:
                self.epoch, self.sampler.position = self.epoch + 1, 0
        for hook in self.hooks:
            hook.after_train(self)

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


# ---------------------------------------------------------------------- hooks
class CheckpointHook(Hook):
    """Saves every ``every`` steps, at each epoch end and at the end (main process; atomic)."""

    def __init__(self, run_dir: Path, every: int, keep_last: int, config: dict) -> None:
        self.run_dir, self.every, self.keep_last, self.config = run_dir, every, keep_last, config
        self.saved_step: int | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.saved_step = trainer.step

    def _save(self, trainer: Trainer) -> None:
        if self.saved_step == trainer.step:
            return
        trainer.check_finite()  # never save a state that a non-finite loss produced
        if dist_utils.is_main():
            ckpt_io.save_checkpoint(self.run_dir, trainer.state_dict(self.config), self.keep_last)
        dist_utils.barrier()
        self.saved_step = trainer.step

    def after_step(self, trainer: Trainer, out: dict[str, Any]) -> None:
        if trainer.step % self.every == 0 or trainer.epoch_ended or trainer.step >= trainer.stop_step:
            self._save(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._save(trainer)


class MetricsHook(Hook):
    """Every ``every`` steps: JSONL + TensorBoard record, a log line, and the progress bar."""

    def __init__(self, writer: MetricsWriter, every: int, show_progress: bool, sources: Sequence[Any] = ()) -> None:
        self.writer, self.every, self.show_progress = writer, every, show_progress
        self.sources = list(sources)  # objects with .metrics(trainer) -> dict, merged into each record
        self.bar: Progress | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.bar = Progress(
            total=trainer.stop_step, initial=trainer.step, desc="pretrain", unit="step", disable=not self.show_progress
        )
        self._t0, self._step0 = time.perf_counter(), trainer.step
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)

    def after_step(self, trainer: Trainer, out: dict[str, Any]) -> None:
        assert self.bar is not None
        self.bar.update(1)
        if trainer.step % self.every and trainer.step < trainer.stop_step:
            return
        names = sorted(out["pair_losses"])
        # One all-reduce for the loss and every pair loss, so the record is the global mean.
        values = torch.stack([out["loss"]] + [torch.as_tensor(out["pair_losses"][n]) for n in names])
        values = dist_utils.all_reduce_mean(values.float()).tolist()
        elapsed = time.perf_counter() - self._t0
        record: dict[str, Any] = {
            "epoch": trainer.epoch,
            "loss": values[0],
            **{f"loss/{n}": v for n, v in zip(names, values[1:])},
            "lr": out["lr"],
            "momentum": out["momentum"],
            "img_per_s": (trainer.step - self._step0) * trainer.images_per_step / max(elapsed, 1e-9),
            "skipped_images": trainer.skipped_images,
        }
        for source in self.sources:
            record.update(source.metrics(trainer))
        if trainer.device.type == "cuda":
            record["gpu_mem_mib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self.writer.write(trainer.step, record)
        self.bar.set_postfix(f"loss {values[0]:.4f} lr {out['lr']:.4g}")
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
            values[0],
            out["lr"],
            out["momentum"],
            record["img_per_s"],
            dynamics,
        )
        self._t0, self._step0 = time.perf_counter(), trainer.step

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- assembling a run
def resolve_amp(choice: str, device_type: str) -> torch.dtype | None:
    """``auto``: bf16 on CUDA (when supported), full precision on CPU."""
    if choice == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[choice]


def init_model(model_cfg: Any, seed: int) -> nn.Module:
    """The model a run with ``model_cfg`` and ``seed`` starts from: torch's RNG seeded with ``seed``
    right before the model is built, so the untrained baseline of a probe or benchmark
    (:mod:`soco_det.probe`) is exactly the network step 1 of the run starts from."""
    from soco_det.models import build_model

    torch.manual_seed(seed)
    return build_model(model_cfg)


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
    """DDP without buffer broadcasts in forward (SOCO_SPEC 5: ``broadcast_buffers=False``): each
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


def _prepare_run_folder(run_dir: Path, resume: str | Path | None, overwrite: bool) -> None:
    """Main process, holding the run folder's lock: clean up after killed writes, and refuse to
    start a new run over an old one (``overwrite`` moves the old one aside instead)."""
    from soco_det.errors import UserError
    from soco_det.runlock import move_aside

    ckpt_io.clean_temporary_files(run_dir)
    existing = ckpt_io.checkpoint_candidates(run_dir)
    if resume is not None or not existing:
        return
    if overwrite:
        aside = move_aside(run_dir)
        log.warning("--overwrite: moved the previous run of %s to %s", run_dir, aside)
        return
    raise UserError(
        f"{run_dir}: already holds the checkpoints of a run ({existing[0].name}, ...); continue it with "
        "--resume auto, write to a new -o folder, or pass --overwrite to move the old run aside"
    )


def pretrain(
    cfg: Any, out_dir: str | Path, resume: str | Path | None = None, hooks: Sequence[Hook] = (), overwrite: bool = False
) -> Path:
    """Train SoCo with ``cfg`` (a :class:`~soco_det.engine.config.PretrainConfig`) into ``out_dir``.

    ``resume``: ``None`` (start fresh; refused if ``out_dir`` holds checkpoints, unless
    ``overwrite``, which moves the old run to ``OUT.old-<time>``), ``"auto"`` (continue from
    ``out_dir``'s newest intact checkpoint if there is one) or a checkpoint file / run folder.
    Works in one process or under ``torchrun`` (``env://``). The main process holds an exclusive
    lock on ``out_dir`` for the whole run. The checkpoint is checked against the config (names and
    shapes) before anything is written. Writes ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``
    and ``checkpoints/`` in ``out_dir`` and returns it. On SIGINT/SIGTERM the current step is
    finished, a checkpoint saved and :class:`~soco_det.engine.signals.Interrupted` raised.
    """
    import random

    import numpy as np

    from soco_det.config import save_config, to_dict
    from soco_det.data import build_pretrain_dataset, collate_views
    from soco_det.engine.dynamics import TrainingDynamics  # imports this module
    from soco_det.engine.lars import build_lars
    from soco_det.errors import UserError
    from soco_det.engine.signals import GracefulStop, Interrupted, ignore_stop_signals
    from soco_det.models import convert_sync_bn
    from soco_det.runlock import FolderLock

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
            lock = FolderLock(run_dir, "run folder").acquire()
            _prepare_run_folder(run_dir, resume, overwrite)
        # The checkpoint to resume from, read (and checked) before anything is written.
        ckpt = None
        if resume == "auto":
            if ckpt_io.checkpoint_candidates(run_dir):
                ckpt = ckpt_io.load_checkpoint(run_dir, map_location="cpu")  # newest intact one
            else:
                log.info("no checkpoint in %s; starting a new run", run_dir)
        elif resume is not None:
            ckpt = ckpt_io.load_checkpoint(resume, map_location="cpu")
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
            from soco_det.models.init_weights import apply_init

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
        sources: list[Any] = [dynamics]
        if train.probe_every and dist_utils.is_main():
            from soco_det.probe.online import OnlineProbe

            sources.append(OnlineProbe(cfg))
        trainer.hooks = [
            dynamics,
            MetricsHook(
                writer, train.log_every, show_progress=train.progress and dist_utils.is_main(), sources=sources
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
            with GracefulStop() as stop:
                trainer.should_stop = stop.requested
                trainer.train()
        finally:
            writer.close()
        if trainer.stopped:
            saved = ckpt_io.find_resume(run_dir)
            what = f"checkpoint {saved} saved; continue with --resume auto" if saved else "no step was done"
            raise Interrupted(
                f"{run_dir}: stopped by {stop.name or 'a signal'} after step {trainer.step}; {what}", stop.signum or 15
            )
        return run_dir
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            dist_utils.cleanup()
