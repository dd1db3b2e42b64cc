"""Throughput (img/s) and peak memory of one SoCo training step, per device, RoI mode and precision.

A training step is what ``Trainer.run_step`` does: target EMA, forward (online + target), backward
and the LARS step; data loading is excluded (one real batch, built once from the sample scenes and
their selective-search proposals, is reused). Each row is timed over ``--steps`` steps after
``--warmup`` steps; ratios are against the first row measured on the same device in this run
(``all_levels`` in full precision, the official mode). On a shared CPU machine pass ``--threads 1``:
extra intra-op threads spin-wait on busy cores and can make a step ten times slower.

``--compare-batched`` times ``all_levels`` three ways: ``batched`` (RoI calls and the backbone over
V1+V2 batched, the default), ``roi-only`` (``model.batched_backbone=false``) and ``separate``
(``model.batched_calls=false``: one head/projector/predictor call per (pair, view, level) and one
backbone call per view, as the official code), and prints the batched/separate ratio.

    python benchmarks/train_step.py --recipe tiny_cpu --batch-size 16 --threads 1 --compare-batched
    python benchmarks/train_step.py --recipe soco_fpn_r50_100ep --batch-size 128 --device cuda --amp bf16 fp16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from soco_det.config import build_config
from soco_det.engine.config import PretrainConfig
from soco_det.engine.lars import build_lars
from soco_det.engine.schedules import Schedule
from soco_det.engine.stream import EpochStream
from soco_det.engine.trainer import Trainer, move_to, resolve_amp, set_train_mode


def sample_batch(cfg: PretrainConfig, batch_size: int, workdir: Path) -> dict:
    """One collated batch of ``batch_size`` real samples (scenes + proposals made in ``workdir``)."""
    from soco_det.data import build_pretrain_dataset, collate_views
    from soco_det.proposals import compute_store
    from soco_det.synth import generate

    n = min(batch_size, 16)
    if not (workdir / "proposals").exists():
        generate(
            workdir, n_unlabeled=n, n_train=0, n_val=0, short_side=max(cfg.data.views.resolved().geometry.view_sizes)
        )
        compute_store(workdir / "images" / "unlabeled", workdir / "proposals")
    cfg.data.images, cfg.data.proposals = str(workdir / "images" / "unlabeled"), str(workdir / "proposals")
    dataset = build_pretrain_dataset(cfg.data, seed=cfg.seed)
    samples = []
    for i in range(batch_size):  # repeat images with other epochs, so the views differ
        dataset.set_epoch(i // len(dataset))
        samples.append(dataset[i % len(dataset)])
    return collate_views(samples)


def measure(cfg: PretrainConfig, batch: dict, device: str, amp: str, steps: int, warmup: int) -> dict:
    from soco_det.models import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg.model).to(dev)
    set_train_mode(model, False)
    schedule = Schedule(peak_lr=1.0, warmup_steps=0, total_steps=10_000)
    optimizer = build_lars(model, 1.0, cfg.train.optim.weight_decay)
    amp_dtype = resolve_amp(amp, device)
    # run_step only: the stream is never read (one prepared batch is reused)
    stream = EpochStream(
        loader=None,
        sampler=None,
        dataset=None,
        accum_steps=1,
        steps_per_epoch=10_000,
        images_per_step=batch["index"].numel(),
        device=dev,
        channels_last=cfg.model.channels_last,
    )
    trainer = Trainer(
        model=model,
        forward_model=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16),
        schedule=schedule,
        stream=stream,
        amp_dtype=amp_dtype,
        stop_step=10_000,
    )
    batch = move_to(batch, dev, cfg.model.channels_last)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer.run_step([batch])
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = trainer.run_step([batch])
    sync()
    elapsed = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # process peak RSS (Linux reports KiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "img_per_s": steps * batch["index"].numel() / elapsed,
        "s_per_step": elapsed / steps,
        "peak_mem_mib": peak,
        "loss": float(out["loss"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny_cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--device", choices=["cpu", "cuda", "all"], default="all", help="all: CPU, and CUDA when available"
    )
    parser.add_argument("--roi-modes", nargs="+", default=["all_levels", "assigned_level"])
    parser.add_argument(
        "--amp",
        nargs="+",
        default=None,
        choices=["none", "bf16", "fp16"],
        help="precisions to time (default: none on CPU; none and bf16 on CUDA)",
    )
    parser.add_argument(
        "--compare-batched",
        action="store_true",
        help="all_levels also with model.batched_calls=false (separate calls, as official)",
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if "cuda" in devices:
        torch.backends.cudnn.benchmark = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            precisions = args.amp or (["none", "bf16"] if device == "cuda" else ["none"])
            base = None
            for mode in args.roi_modes:
                variants = [None]
                if args.compare_batched and mode == "all_levels":
                    variants = [True, "head", False]
                for amp in precisions:
                    batched_res = None
                    for batched in variants:
                        extra = {
                            None: [],
                            True: ["model.batched_calls=true", "model.batched_backbone=true"],
                            "head": ["model.batched_calls=true", "model.batched_backbone=false"],
                            False: ["model.batched_calls=false"],
                        }[batched]
                        cfg = build_config(
                            PretrainConfig, args.recipe, [*args.overrides, f"model.roi_mode={mode}", *extra]
                        )
                        batch = sample_batch(cfg, args.batch_size, Path(tmp))
                        res = measure(cfg, batch, device, amp, args.steps, args.warmup)
                        base = base or res["img_per_s"]
                        row = {
                            "recipe": args.recipe,
                            "device": device,
                            "roi_mode": mode,
                            "amp": amp,
                            "batched_calls": cfg.model.batched_calls,
                            "batched_backbone": cfg.model.batched_calls and cfg.model.batched_backbone,
                            "batch": args.batch_size,
                            **res,
                            "ratio": res["img_per_s"] / base,
                        }
                        if batched is False and batched_res is not None:
                            row["batched_over_separate"] = batched_res["img_per_s"] / res["img_per_s"]
                        batched_res = res if batched is True else batched_res
                        if device == "cuda":
                            row["gpu"] = torch.cuda.get_device_name()
                        rows.append(row)
                        calls = (
                            "separate"
                            if not cfg.model.batched_calls
                            else "batched"
                            if cfg.model.batched_backbone
                            else "roi-only"
                        )
                        note = (
                            f"  batched/separate x{row['batched_over_separate']:.2f}"
                            if "batched_over_separate" in row
                            else ""
                        )
                        print(
                            f"{device:5s} {mode:15s} {calls:8s} {amp:5s} batch {args.batch_size:4d}  "
                            f"{res['img_per_s']:9.2f} img/s  {res['s_per_step']:8.3f} s/step  "
                            f"peak {res['peak_mem_mib']:9.1f} MiB  x{row['ratio']:.2f}{note}",
                            flush=True,
                        )
    if args.json:
        args.json.write_text(
            json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
