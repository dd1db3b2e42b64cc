"""Mask R-CNN fine-tuning: an iteration-based loop with warmup + step decay, DDP, AMP and resume.

``finetune(cfg, out_dir)`` trains the model of :mod:`soco_det.models.maskrcnn` on a COCO-format
train set and evaluates it on the val set (periodically and at the end). The run folder holds::

    config.yaml                resolved config (schedule presets expanded)
    metrics.jsonl              one line per log period ({"iter", "lr", "loss", "loss_*", "time"})
                               and per evaluation ({"iter", "bbox": {...}, "segm": {...}})
    loss.png                   loss curve
    checkpoints/step_*.pt      {"format": "soco-det/1", "kind": "maskrcnn", "model", "optimizer",
    checkpoints/last.pt         "scaler", "step", "cat_ids", "rng", "config"} (atomic, last N kept)
    eval/step_XXXXXXXX/        metrics.json + COCO results of each evaluation
    metrics.json               the final evaluation

Run it on one process, or on many with ``torchrun --nproc_per_node N -m soco_det.cli finetune ...``
(``solver.batch_size`` is the total over processes). The data order, the per-sample augmentation
and (on CPU) the whole run are reproducible from ``seed``; resuming (``resume=True``) continues from
the saved iteration with the same data stream, LR and RNG state.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from soco_det.atomic import atomic_save
from soco_det.config import save_config, to_dict
from soco_det.engine.metrics import MetricsWriter, read_metrics
from soco_det.errors import UserError
from soco_det.logs import Progress, get_logger
from soco_det.torch_io import resolve_device
from soco_det.transfer.config import FinetuneConfig, SolverConfig, resolve_schedule

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
    from soco_det.engine.checkpoint import capture_rng, restore_rng

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
            images = [im.to(device) for im in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            model(images, targets)
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


def train_step(
    model: nn.Module,
    images: list[torch.Tensor],
    targets: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    autocast: Any,
    clip_grad_norm: float,
) -> dict[str, float]:
    """One SGD step; returns the loss terms (floats). Raises ``FloatingPointError`` on a non-finite
    loss, before the weights are touched, so the last checkpoint stays usable."""
    # Forward: torchvision's Mask R-CNN returns its five loss terms in training mode.
    with autocast():
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    values = {k: float(v.detach()) for k, v in loss_dict.items()}
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"non-finite loss {values}; lower solver.base_lr or raise solver.warmup_iters")
    # Backward (scaled for float16) and update.
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    values["loss"] = sum(values.values())
    return values


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


def _resume_path(out: Path, resume: bool | str | Path | None, check_fresh: bool = True) -> Path | None:
    from soco_det.engine.checkpoint import find_resume, resolve_checkpoint

    if resume in (None, False):
        if check_fresh and find_resume(out) is not None:
            raise UserError(f"{out}: run folder already has checkpoints; resume it (--resume) or choose another folder")
        return None
    if resume is True or resume == "auto":
        if find_resume(out) is None:
            log.info("%s: no checkpoint to resume from; starting fresh", out)
            return None
        return out  # load_checkpoint of the folder: its newest intact checkpoint
    return resolve_checkpoint(resume)


def _device(cfg: FinetuneConfig) -> str:
    return torch.device(resolve_device(cfg.device, "device")).type


def finetune(cfg: FinetuneConfig, out_dir: str | Path, resume: bool | str | Path | None = None) -> Path:
    """Fine-tune a Mask R-CNN as ``cfg`` says; returns the run folder ``out_dir``.

    ``resume``: ``None``/``False`` starts fresh (refusing a folder that already has checkpoints);
    ``True``/``"auto"`` continues from ``out_dir/checkpoints/last.pt`` if there is one; a path
    continues from that checkpoint. Raises :class:`UserError` for bad data or init files.
    """
    from soco_det.engine import distributed as dist
    from soco_det.engine.checkpoint import clean_temporary_files
    from soco_det.runlock import FolderLock

    created_group = not dist.is_initialized()
    # One run per folder: the main process holds its lock (torchrun ranks share the main's folder).
    rank = dist.rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))  # torchrun sets RANK
    lock: FolderLock | None = None
    try:
        if rank == 0:
            lock = FolderLock(out_dir, "run folder").acquire()
            clean_temporary_files(out_dir)
        return _finetune(cfg, Path(out_dir), resume)
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            dist.cleanup()


def _finetune(cfg: FinetuneConfig, out: Path, resume: bool | str | Path | None) -> Path:
    from soco_det.engine import distributed as dist
    from soco_det.engine.checkpoint import capture_rng, load_checkpoint, load_model_strict, restore_rng, save_checkpoint
    from soco_det.engine.signals import GracefulStop, Interrupted
    from soco_det.transfer.coco_data import CocoInstances, TrainingSampler, collate
    from soco_det.transfer.evaluation import evaluate, format_metrics
    from soco_det.models.maskrcnn import build_from_config, load_init, resolve_widths

    try:
        cfg.check_data()
    except ValueError as exc:
        raise UserError(f"finetune: {exc} (give --train-json/--train-images/--val-json/--val-images)") from exc
    device = dist.init_distributed(_device(cfg))
    rank, world = dist.rank(), dist.world_size()
    if cfg.solver.batch_size % world:
        raise UserError(f"solver.batch_size={cfg.solver.batch_size} is not divisible by the {world} processes")

    # Data: the schedule preset depends on the number of usable training images.
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
    # Schedule presets and auto widths are resolved once and saved, so the run (and its checkpoints)
    # can be rebuilt from config.yaml alone.
    widths = resolve_widths(cfg.model)
    model_cfg = replace(cfg.model, **{k: list(v) if isinstance(v, tuple) else v for k, v in widths.items()})
    cfg = replace(cfg, model=model_cfg, solver=resolve_schedule(cfg.solver, len(train_set)))
    solver = cfg.solver
    num_classes = train_set.num_classes
    if cfg.model.num_classes not in (0, num_classes):
        raise UserError(
            f"model.num_classes={cfg.model.num_classes} but {cfg.data.train_json} has {num_classes - 1} categories (+1 background)"
        )

    # Model: same initial weights on every rank (seeded), then per-rank randomness for sampling.
    torch.manual_seed(cfg.seed)
    from soco_det.transfer.box_only import annotation_kind

    model = build_from_config(cfg.model, cfg.input, num_classes, masks=annotation_kind(train_set) == "masks")
    # Only rank 0 refuses a used folder: other ranks may look after rank 0 wrote checkpoints.
    ckpt_path = _resume_path(out, resume, check_fresh=rank == 0)
    if ckpt_path is None and cfg.model.init != "random":
        load_init(model, cfg.model.init)
    model.to(device)
    ddp = dist.is_initialized() and world > 1
    if ddp and device.type == "cuda" and cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.bn_mode == "frozen":
        freeze_batch_norm(model)
    optimizer = torch.optim.SGD(param_groups(model, solver), lr=peak_lr(solver), momentum=solver.momentum)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    start_iter = 0
    if ckpt_path is not None:
        # On the CPU: the RNG states must stay host tensors; model and optimizer copy to their device.
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        if ckpt.get("kind") != "maskrcnn":
            raise UserError(f"{ckpt_path}: not a fine-tuning checkpoint")
        if [int(c) for c in ckpt["cat_ids"]] != train_set.cat_ids:
            raise UserError(
                f"{ckpt_path}: trained on category ids {ckpt['cat_ids']}, but {cfg.data.train_json} has {train_set.cat_ids}"
            )
        load_model_strict(model, ckpt["model"], source=str(ckpt_path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_iter = int(ckpt["step"])
        log.info("resumed from %s at iteration %d", ckpt["path"], start_iter)
    train_model = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if ddp
        else model
    )

    if rank == 0:
        save_config(cfg, out)
    metrics = MetricsWriter(out, enabled=rank == 0, tensorboard=False, resume_step=start_iter, step_key="iter")
    per_rank = solver.batch_size // world
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=per_rank,
        sampler=TrainingSampler(len(train_set), per_rank, rank, world, seed=cfg.seed, start_iter=start_iter),
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )

    # PreciseBN reads its own pass over the training images (its own sampler seed: the training
    # sampler's position is not disturbed).
    precise_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=per_rank,
        collate_fn=collate,
        num_workers=0,
        sampler=TrainingSampler(len(train_set), per_rank, rank, world, seed=cfg.seed + 1, start_iter=0),
    )

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    def checkpoint(iteration: int) -> None:
        if rank == 0:
            state = {
                "kind": "maskrcnn",
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": iteration,
                "epoch": iteration * solver.batch_size // len(train_set),
                "cat_ids": train_set.cat_ids,
                "rng": capture_rng(),
                "config": to_dict(cfg),
            }
            save_checkpoint(out, state, keep_last=cfg.keep_checkpoints or 10**9)
            plot_losses(read_metrics(out), out / "loss.png")
        dist.barrier()

    def run_eval(iteration: int) -> dict[str, Any] | None:
        result = None
        if cfg.model.precise_bn_images:
            # every rank runs the same passes, so that SyncBN (if any) stays in step
            seen = precise_bn(train_model, iter(precise_loader), cfg.model.precise_bn_images, device)
            log.info("precise BN: statistics re-estimated over %d training images", seen)
            train_model.train()
            if cfg.model.bn_mode == "frozen":
                freeze_batch_norm(model)
        if rank == 0:
            result = evaluate(
                model,
                cfg.data.val_json,
                cfg.data.val_images,
                out / "eval" / f"step_{iteration:08d}",
                max_images=cfg.data.max_val_images,
                show_progress=False,
            )
            metrics.write(iteration, {t: result[t] for t in ("bbox", "segm") if t in result})
        dist.barrier()
        return result

    log.info(
        "fine-tuning %d iterations (batch %d, lr %.4g, %d train images, %d classes) on %s x%d; init %s; BN %s%s",
        solver.iterations,
        solver.batch_size,
        peak_lr(solver),
        len(train_set),
        num_classes - 1,
        device.type,
        world,
        cfg.model.init,
        cfg.model.bn_mode,
        f", precise BN over {cfg.model.precise_bn_images} images" if cfg.model.precise_bn_images else "",
    )
    train_model.train()
    if cfg.model.bn_mode == "frozen":
        freeze_batch_norm(model)
    window: list[dict[str, float]] = []
    t0 = time.perf_counter()
    data = iter(loader)  # draws a worker seed from the global RNG: before the RNG is set below
    # The RNG (RPN/RoI sampling) continues exactly where the checkpoint left it; fresh runs seed per rank.
    if ckpt_path is not None:
        restore_rng(ckpt["rng"])
    else:
        torch.manual_seed(cfg.seed + rank)
    with Progress(total=solver.iterations, desc="finetune", initial=start_iter) as bar, GracefulStop() as stop:
        for iteration in range(start_iter, solver.iterations):
            lr = peak_lr(solver) * lr_factor(iteration, solver)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets = next(data)
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [
                {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                for t in targets
            ]
            window.append(train_step(train_model, images, targets, optimizer, scaler, autocast, solver.clip_grad_norm))
            done = iteration + 1
            bar.update(1)
            if done % cfg.log_period == 0 or done == solver.iterations:
                # Window means, averaged over processes (every rank logs at the same iterations).
                keys = list(window[-1])
                means = torch.tensor([sum(w[k] for w in window) / len(window) for k in keys], device=device)
                means = dist.all_reduce_mean(means).tolist()
                record = {"lr": lr, **dict(zip(keys, means)), "time": round(time.perf_counter() - t0, 3)}
                bar.set_postfix(f"loss {record['loss']:.3f} lr {lr:.2e}")
                metrics.write(done, record)
                window = []
            if (cfg.checkpoint_period and done % cfg.checkpoint_period == 0) or done == solver.iterations:
                checkpoint(done)
            if cfg.eval_period and done % cfg.eval_period == 0 and done != solver.iterations:
                run_eval(done)
            if done != solver.iterations and stop.requested():  # SIGINT/SIGTERM: save, then stop
                if not (cfg.checkpoint_period and done % cfg.checkpoint_period == 0):
                    checkpoint(done)
                raise Interrupted(
                    f"{out}: stopped by {stop.name} after iteration {done}; checkpoint saved; continue with --resume",
                    stop.signum or 15,
                )
    final = run_eval(solver.iterations)
    if rank == 0 and final is not None:
        from soco_det.atomic import atomic_write_json

        atomic_write_json(out / "metrics.json", final, indent=2)
        plot_losses(read_metrics(out), out / "loss.png")
        log.info("final: %s", format_metrics(final))
    metrics.close()
    return out
