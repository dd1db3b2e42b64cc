"""Mask R-CNN fine-tuning on the engine's loop: warmup + step decay, DDP, AMP, evaluation and resume.

``finetune(cfg, out_dir)`` trains the model of :mod:`soco_det.models.maskrcnn` on a COCO-format
train set and evaluates it on the val set (periodically and at the end). The step is
:meth:`FinetuneTrainer.run_step`; the loop, the non-finite-loss check, checkpoints, metrics and the
run-folder policy are pretraining's (:mod:`soco_det.engine`), with an evaluation hook. The run
folder holds::

    config.yaml                resolved config (schedule presets expanded)
    metrics.jsonl              one line per log period ({"iter", "lr", "loss", "loss_*", "img_per_s",
                               "time/data_wait", "time/step", "time"}: the means over the period) and per
                               evaluation ({"iter", "bbox": {...}, "segm": {...}})
    tensorboard/               the same records (bbox/AP, ...), the config, the AP table of each
                               evaluation and a picture of training images (``logging.backends``;
                               also wandb/ and mlruns/ when asked for)
    train_samples.png          the first training images with their annotations
    loss.png                   loss curve
    checkpoints/step_*.pt      {"format": "soco-det/1", "kind": "maskrcnn", "model", "optimizer",
    checkpoints/last.pt         "scaler", "step", "cat_ids", "rng", "config"} (atomic, last N kept)
    eval/step_XXXXXXXX/        metrics.json + COCO results of each evaluation
    metrics.json               the final evaluation

Run it on one process, or on many with ``torchrun --nproc_per_node N -m soco_det.commands.main finetune ...``
(``solver.batch_size`` is the total over processes). The data order, the per-sample augmentation
and (on CPU) the whole run are reproducible from ``seed``; resuming (``resume="auto"``) continues
from the saved iteration with the same data stream, LR and RNG state.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from soco_det.atomic import atomic_save, atomic_write_json
from soco_det.config import save_config, to_dict
from soco_det.engine import distributed as dist
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
from soco_det.engine.checkpoint import capture_rng, restore_rng
from soco_det.engine.hooks import EvalHook, MetricsHook
from soco_det.engine.loop import Hook, TrainerBase, move_to, set_train_mode
from soco_det.engine.metrics import MetricsWriter, read_metrics
from soco_det.engine.tracking import check_backends
from soco_det.errors import UserError
from soco_det.logs import get_logger
from soco_det.torch_io import resolve_device
from soco_det.transfer.box_only import annotation_kind
from soco_det.transfer.coco_data import CocoInstances, TrainingSampler, collate
from soco_det.transfer.config import FinetuneConfig, SolverConfig, resolve_schedule
from soco_det.transfer.evaluation import evaluate, format_metrics
from soco_det.transfer.model import build_from_config, load_init, resolve_widths

log = get_logger(__name__)

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def lr_factor(iteration: int, solver: SolverConfig) -> float:
    """LR multiplier at 0-based ``iteration``: linear warmup from ``warmup_factor`` to 1 over
    ``warmup_iters``, times ``gamma`` per step in ``steps`` already reached (detectron2's
    WarmupMultiStepLR, as a pure function of the iteration)."""
    decay = solver.gamma ** sum(1 for s in solver.steps if iteration >= s)
    if iteration >= solver.warmup_iters:
        return decay
    alpha = iteration / solver.warmup_iters
    return decay * (solver.warmup_factor * (1 - alpha) + alpha)


def peak_lr(solver: SolverConfig) -> float:
    """The LR after warmup: ``base_lr * batch_size / lr_reference_batch`` (``lr_scaling=linear``)."""
    if solver.lr_scaling == "linear":
        return solver.base_lr * solver.batch_size / solver.lr_reference_batch
    return solver.base_lr


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batch_norm(model: nn.Module) -> None:
    """``bn_mode=frozen``: every BN in eval mode (running statistics) with fixed affine parameters."""
    for bn in batch_norms(model):
        bn.eval()
        for p in bn.parameters():
            p.requires_grad_(False)


@torch.no_grad()
def precise_bn(model: nn.Module, loader_iter: Any, n_images: int, device: torch.device) -> int:
    """PreciseBN: reset every BN's running statistics and set them to the average over ``n_images``
    training images (train-mode forward passes, no update of any weight). The RNG states are
    restored afterwards, so a run's sampling does not depend on whether this ran. Returns the
    number of images used."""
    bns = [bn for bn in batch_norms(model) if bn.training]
    if not bns or n_images <= 0:
        return 0
    rng = capture_rng()
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    seen = 0
    try:
        while seen < n_images:
            images, targets = next(loader_iter)
            model(move_to(images, device), move_to(targets, device))
            seen += len(images)
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        restore_rng(rng)
    return seen


def param_groups(model: nn.Module, solver: SolverConfig) -> list[dict[str, Any]]:
    """Two SGD groups by rule: parameters of normalisation layers get ``weight_decay_norm``,
    everything else ``weight_decay`` (detectron2's default split)."""
    norm, other = [], []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                (norm if isinstance(module, _NORM_TYPES) else other).append(param)
    return [
        {"params": other, "weight_decay": solver.weight_decay},
        {"params": norm, "weight_decay": solver.weight_decay_norm},
    ]


def plot_losses(records: list[dict[str, Any]], out_png: Path) -> None:
    """Loss terms against the iteration, from ``metrics.jsonl`` records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted(k for k in train[-1] if k.startswith("loss")):
        ax.plot(
            [r["iter"] for r in train],
            [r.get(key, float("nan")) for r in train],
            label=key,
            lw=2 if key == "loss" else 1,
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_save(out_png, lambda handle: fig.savefig(handle, format="png", dpi=100))
    finally:
        plt.close(fig)


class FinetuneTrainer(TrainerBase):
    """Fine-tuning's step on the engine's loop (:mod:`soco_det.engine.loop`): SGD with warmup +
    step decay at ``lr_factor(step)``, the Mask R-CNN's five losses under autocast, gradient
    clipping, a GradScaler for fp16. The data is an endless stream (``TrainingSampler``) that starts
    at the resumed iteration."""

    nonfinite_hint = "lower solver.base_lr or raise solver.warmup_iters"

    def __init__(
        self,
        *,
        model: nn.Module,
        forward_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        amp_dtype: torch.dtype | None,
        solver: SolverConfig,
        loader: torch.utils.data.DataLoader,
        cat_ids: list[int],
        num_images: int,
        device: torch.device,
        run_dir: Path,
        check_every: int,
    ) -> None:
        super().__init__(
            model=model,
            forward_model=forward_model,
            optimizer=optimizer,
            scaler=scaler,
            device=device,
            stop_step=solver.iterations,
            amp_dtype=amp_dtype,
            run_dir=run_dir,
            check_every=check_every,
        )
        self.solver, self.loader, self.cat_ids, self.num_images = solver, loader, cat_ids, num_images
        self._data: Any = None

    @property  # type: ignore[override]
    def epoch(self) -> int:
        """Epochs of the training set completed (the stream is endless: a count, not a boundary)."""
        return self.step * self.solver.batch_size // self.num_images

    def start(self, rng: dict[str, Any] | None, seed: int) -> None:
        """Open the data stream, then set the RNG of the RPN/RoI sampling: the checkpoint's state
        (``rng``) on resume, ``seed`` on a fresh run. In this order, as opening the loader draws its
        workers' base seed from the global RNG."""
        self._data = iter(self.loader)
        if rng is not None:
            restore_rng(rng)
        else:
            torch.manual_seed(seed)

    def close_data(self) -> None:
        self._data = None

    def next_batch(self) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        images, targets = next(self._data)
        return move_to(images, self.device), move_to(targets, self.device)

    def run_step(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]]) -> dict[str, Any]:
        images, targets = batch
        # 1. LR of this iteration (a pure function of it: exact on resume).
        lr = peak_lr(self.solver) * lr_factor(self.step, self.solver)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # 2. Forward under autocast: torchvision's Mask R-CNN returns its loss terms in training mode.
        with self.autocast():
            terms = self.forward_model(images, targets)
        loss = sum(v.float() for v in terms.values())
        # 3. A non-finite loss is noted on the device and checked by the loop (all processes agree).
        self.note_finite(loss.detach())
        # 4. Backward (scaled for fp16), clipping of the unscaled gradients, SGD step.
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.solver.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.solver.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return {"loss": loss.detach(), "terms": {k: v.detach().float() for k, v in terms.items()}, "lr": lr}

    def state_dict(self, config: dict) -> dict[str, Any]:
        return {"kind": "maskrcnn", **super().state_dict(config), "cat_ids": self.cat_ids}

    # load_state_dict: TrainerBase's (weights, optimizer, scaler, step); the RNG is set by start().


class FinetuneMetricsHook(MetricsHook):
    """Fine-tuning's records: the loss terms averaged over the log period, the LR, images/s."""

    def extra(self, trainer: TrainerBase, out: dict[str, Any], steps_per_s: float) -> dict[str, Any]:
        assert isinstance(trainer, FinetuneTrainer)
        return {"img_per_s": steps_per_s * trainer.solver.batch_size}

    def log(self, trainer: TrainerBase, record: dict[str, Any]) -> None:
        log.info(
            "iter %d/%d loss %.4f lr %.4g %.1f img/s",
            trainer.step,
            trainer.stop_step,
            record["loss"],
            record["lr"],
            record["img_per_s"],
        )


def _device(cfg: FinetuneConfig) -> str:
    return torch.device(resolve_device(cfg.device, "device")).type


def check_resume(ckpt: dict[str, Any] | None, train_set: CocoInstances, cfg: FinetuneConfig) -> None:
    """A checkpoint to continue from must be a fine-tuning one, of the same categories."""
    if ckpt is None:
        return
    if ckpt.get("kind") != "maskrcnn":
        raise UserError(f"{ckpt['path']}: not a fine-tuning checkpoint")
    if [int(c) for c in ckpt["cat_ids"]] != train_set.cat_ids:
        raise UserError(
            f"{ckpt['path']}: trained on category ids {ckpt['cat_ids']}, but {cfg.data.train_json} has {train_set.cat_ids}"
        )


def build_train_set(cfg: FinetuneConfig, run: RunContext) -> tuple[CocoInstances, FinetuneConfig]:
    """The training images and the config resolved for them: the schedule preset (which depends on
    the number of usable training images) and the auto widths, resolved once and saved, so that the
    run (and its checkpoints) can be rebuilt from ``config.yaml`` alone."""
    if cfg.solver.batch_size % run.world:
        raise UserError(f"solver.batch_size={cfg.solver.batch_size} is not divisible by the {run.world} processes")
    train_set = CocoInstances(
        cfg.data.train_json,
        cfg.data.train_images,
        train=True,
        min_sizes=cfg.input.min_size_train,
        max_size=cfg.input.max_size_train,
        hflip_prob=cfg.input.hflip_prob,
        seed=cfg.seed,
        filter_empty=cfg.data.filter_empty,
    )
    widths = resolve_widths(cfg.model)
    model_cfg = replace(cfg.model, **{k: list(v) if isinstance(v, tuple) else v for k, v in widths.items()})
    cfg = replace(cfg, model=model_cfg, solver=resolve_schedule(cfg.solver, len(train_set)))
    if cfg.model.num_classes not in (0, train_set.num_classes):
        raise UserError(
            f"model.num_classes={cfg.model.num_classes} but {cfg.data.train_json} has "
            f"{train_set.num_classes - 1} categories (+1 background)"
        )
    check_resume(run.ckpt, train_set, cfg)
    return train_set, cfg


def build_detector(cfg: FinetuneConfig, run: RunContext, train_set: CocoInstances) -> tuple[nn.Module, nn.Module]:
    """``(model, forward_model)``: the Mask R-CNN (box-only for box annotations) with the same
    initial weights on every process (seeded), then ``model.init`` on a fresh run; SyncBN under
    several CUDA processes, frozen BN for ``bn_mode=frozen``; DDP around it when there are several."""
    torch.manual_seed(cfg.seed)
    model = build_from_config(cfg.model, cfg.input, train_set.num_classes, masks=annotation_kind(train_set) == "masks")
    if run.ckpt is None and cfg.model.init != "random":
        load_init(model, cfg.model.init)
    model.to(run.device)
    if run.world > 1 and run.device.type == "cuda" and cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.bn_mode == "frozen":
        freeze_batch_norm(model)
    forward_model = wrap_model(model, run.device, run.world)
    set_train_mode(forward_model, cfg.model.bn_mode == "frozen")
    return model, forward_model


def build_train_loader(cfg: FinetuneConfig, run: RunContext, train_set: CocoInstances) -> torch.utils.data.DataLoader:
    """The endless training stream of this process, from the resumed iteration on."""
    per_rank = cfg.solver.batch_size // run.world
    start_iter = int(run.ckpt["step"]) if run.ckpt is not None else 0
    return build_loader(
        train_set,
        batch_size=per_rank,
        sampler=TrainingSampler(len(train_set), per_rank, run.rank, run.world, seed=cfg.seed, start_iter=start_iter),
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        device=run.device,
    )


def finetune_hooks(cfg: FinetuneConfig, run: RunContext, writer: MetricsWriter, train_set: Any) -> list[Hook]:
    """The metrics records (means over each log period), the checkpoints (each followed by the loss
    plot) and the periodic and final evaluation (:func:`_evaluation`)."""
    metrics = FinetuneMetricsHook(writer, cfg.log_period, show_progress=run.is_main, desc="finetune", window=True)
    out = run.run_dir
    return [
        *standard_hooks(
            run,
            metrics,
            cfg.checkpoint_period,
            cfg.keep_checkpoints or 10**9,
            to_dict(cfg),
            after_save=lambda _: plot_losses(read_metrics(out), out / "loss.png"),
        ),
        EvalHook(cfg.eval_period, _evaluation(cfg, out, train_set, cfg.solver.batch_size // run.world, writer)),
    ]


def _log_start(cfg: FinetuneConfig, run: RunContext, trainer: FinetuneTrainer) -> None:
    log.info(
        "fine-tuning %d iterations (batch %d, lr %.4g, %d train images, %d classes) on %s x%d; init %s; BN %s%s; amp %s",
        cfg.solver.iterations,
        cfg.solver.batch_size,
        peak_lr(cfg.solver),
        trainer.num_images,
        len(trainer.cat_ids),
        run.device.type,
        run.world,
        cfg.model.init,
        cfg.model.bn_mode,
        f", precise BN over {precise_bn_count(cfg, trainer.num_images)} images" if cfg.model.precise_bn_images else "",
        trainer.amp_dtype,
    )


def precise_bn_count(cfg: FinetuneConfig, num_images: int) -> int:
    """Images PreciseBN averages over: ``model.precise_bn_images``, at most the training set (more
    would only pass over the same images again)."""
    return min(cfg.model.precise_bn_images, num_images)


def log_train_picture(run: RunContext, writer: MetricsWriter, train_set: CocoInstances) -> None:
    """At the start of a fresh run, on the main process: the first training images with their
    annotations in ``RUN/train_samples.png`` (:func:`soco_det.transfer.viz.render_ground_truth`),
    given to the logging back-ends; a picture that fails is a warning, never the end of the run."""
    from soco_det.transfer.viz import render_ground_truth

    if not (run.is_main and writer.backends):
        return
    try:
        writer.image("data/train_samples", render_ground_truth(train_set, run.run_dir / "train_samples.png"), 0)
    except Exception as exc:  # a picture is a convenience
        log.warning("training-images picture skipped (%s: %s)", type(exc).__name__, exc)


def ap_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """An evaluation as table rows, one per IoU type, in percent: ``[{"type": "bbox", "AP": 41.2, ...}]``."""
    return [
        {"type": t, **{k: None if v is None else round(100 * v, 2) for k, v in result[t].items()}}
        for t in ("bbox", "segm")
        if t in result
    ]


def _finish(run: RunContext, trainer: FinetuneTrainer) -> None:
    """After the run, on the main process: the final evaluation as ``metrics.json``, the loss plot."""
    result = next(h for h in trainer.hooks if isinstance(h, EvalHook)).result
    if run.is_main and result is not None:
        atomic_write_json(run.run_dir / "metrics.json", result, indent=2)
        plot_losses(read_metrics(run.run_dir), run.run_dir / "loss.png")
        log.info("final: %s", format_metrics(result))


def finetune(
    cfg: FinetuneConfig, out_dir: str | Path, resume: bool | str | Path | None = None, overwrite: bool = False
) -> Path:
    """Fine-tune a Mask R-CNN as ``cfg`` says; returns the run folder ``out_dir``.

    ``resume``: ``None``/``False`` starts fresh (a folder that holds checkpoints is refused, or with
    ``overwrite`` moved aside to ``OUT.old-<time>``, as in pretraining); ``True``/``"auto"``
    continues from the folder's newest intact checkpoint if there is one; a path continues from
    that checkpoint. Raises :class:`UserError` for bad data or init files,
    :class:`~soco_det.engine.loop.NonFiniteLossError` when the loss diverges and
    :class:`~soco_det.errors.Interrupted` after a stop signal (a checkpoint saved).
    """
    resume = "auto" if resume is True else (None if resume is False else resume)
    try:
        cfg.check_data()
    except ValueError as exc:
        raise UserError(f"finetune: {exc} (give --train-json/--train-images/--val-json/--val-images)") from exc
    check_backends(cfg.logging.backends)  # a missing package is said before anything runs
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    with open_run(out_dir, resume, overwrite, _device(cfg)) as run:
        train_set, cfg = build_train_set(cfg, run)
        model, forward_model = build_detector(cfg, run, train_set)
        optimizer = torch.optim.SGD(
            param_groups(model, cfg.solver), lr=peak_lr(cfg.solver), momentum=cfg.solver.momentum
        )
        amp_dtype, scaler = build_precision(cfg.amp, run.device.type)
        trainer = FinetuneTrainer(
            model=model,
            forward_model=forward_model,
            optimizer=optimizer,
            scaler=scaler,
            amp_dtype=amp_dtype,
            solver=cfg.solver,
            loader=build_train_loader(cfg, run, train_set),
            cat_ids=train_set.cat_ids,
            num_images=len(train_set),
            device=run.device,
            run_dir=run.run_dir,
            check_every=cfg.log_period,
        )
        resume_into(trainer, run.ckpt, to_dict(cfg), ignored=("cpu_threads",), schema=FinetuneConfig)
        # The RNG (RPN/RoI sampling) continues where the checkpoint left it; fresh runs seed per process.
        trainer.start(run.ckpt["rng"] if run.ckpt is not None else None, cfg.seed + run.rank)
        if run.is_main:
            save_config(cfg, run.run_dir)  # only now: a rejected resume leaves the folder as it was
        writer = build_writer(run, cfg.logging, cfg.logging.backends, trainer.step, to_dict(cfg), step_key="iter")
        if trainer.step == 0:
            log_train_picture(run, writer, train_set)
        trainer.hooks = finetune_hooks(cfg, run, writer, train_set)
        _log_start(cfg, run, trainer)
        run_training(trainer, writer, resume_hint="--resume")
        _finish(run, trainer)
    return run.run_dir


def _evaluation(
    cfg: FinetuneConfig, out: Path, train_set: Any, per_rank: int, writer: MetricsWriter
) -> Callable[[TrainerBase], dict[str, Any] | None]:
    """The evaluation of :class:`EvalHook`: PreciseBN on every process (so that SyncBN, if any,
    stays in step), then COCO evaluation of the val set on the main process, recorded in
    ``metrics.jsonl`` (and the logging back-ends, with the AP table) and ``eval/step_XXXXXXXX/``;
    training mode is restored afterwards. PreciseBN uses at most the whole training set
    (:func:`precise_bn_count`)."""
    rank, world = dist.rank(), dist.world_size()
    bn_images = precise_bn_count(cfg, len(train_set))
    if bn_images < cfg.model.precise_bn_images:
        log.info(
            "precise BN: model.precise_bn_images=%d is more than the %d training images; using %d",
            cfg.model.precise_bn_images,
            len(train_set),
            bn_images,
        )
    # PreciseBN reads its own pass over the training images: its own sampler seed and loader
    # generator, so the training stream and the global RNG are not disturbed.
    precise_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=per_rank,
        collate_fn=collate,
        num_workers=0,
        sampler=TrainingSampler(len(train_set), per_rank, rank, world, seed=cfg.seed + 1, start_iter=0),
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )

    def run(trainer: TrainerBase) -> dict[str, Any] | None:
        assert isinstance(trainer, FinetuneTrainer)
        if bn_images:
            seen = precise_bn(trainer.forward_model, iter(precise_loader), bn_images, trainer.device)
            log.info("precise BN: statistics re-estimated over %d training images", seen)
        result = None
        if dist.is_main():
            result = evaluate(
                trainer.model,
                cfg.data.val_json,
                cfg.data.val_images,
                out / "eval" / f"step_{trainer.step:08d}",
                max_images=cfg.data.max_val_images,
                show_progress=False,
            )
            writer.write(trainer.step, {t: result[t] for t in ("bbox", "segm") if t in result})
            writer.table("eval/AP", ap_rows(result), trainer.step)
        set_train_mode(trainer.forward_model, cfg.model.bn_mode == "frozen")
        dist.barrier()
        return result

    return run
