"""Transfer benchmark: does SoCo pretraining help a Mask R-CNN more than image-level BYOL or random init?

On the sample scenes:

1. generate the scenes (or reuse ``--data``) and compute selective-search proposals for the
   unlabeled split;
2. pretrain SoCo (``model.variant=soco_fpn``) and the image-level BYOL baseline
   (``model.variant=image_byol``) with the same engine, recipe and budget on the unlabeled split,
   and export both to torchvision (``soco_det.export.export_checkpoint``);
3. fine-tune a Mask R-CNN v2 from each export and from random init on the small labeled split, with
   the same schedule and the same architecture (FPN / box-head widths of the SoCo export);
4. evaluate on the val split and print bbox / segm AP, AP50, AP75 per init (mean and std over
   seeds), and write ``transfer.json`` and ``transfer.png`` into ``--out``.

The paper's claim (SOCO_SPEC 8.1) is SoCo > image-level > random; this script reports what it
measures either way. Presets::

    python benchmarks/transfer.py --preset smoke --out /tmp/transfer_smoke   # ~3 min on CPU, tests the script
    python benchmarks/transfer.py --preset cpu --out /tmp/transfer_cpu       # ~19 min on 2 CPU cores (measured)
    python benchmarks/transfer.py --preset cpu_long --out /tmp/transfer_long # 2.5x pretraining, 3.3x fine-tuning
    python benchmarks/transfer.py --preset gpu --out /tmp/transfer_gpu       # ~5 min on one H100 (measured)

The fine-tuning runs are far shorter than a real 1x schedule, so absolute APs are low (a few
percent at most on the gpu preset).

``--seeds 0 1 2`` sets the seeds (fine-tuning seeds; with ``pretrain_per_seed`` in the preset, the
pretraining seeds too), ``--data DIR`` reuses a folder written by ``soco-det synth``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

INITS = ("random", "image_byol", "soco")
VARIANT = {"image_byol": "image_byol", "soco": "soco_fpn"}
METRICS = (("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"))

# Each preset: scenes, pretraining (recipe tiny_cpu + overrides, same for both methods) and
# fine-tuning (recipe finetune_tiny_cpu + overrides, same for every init).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "scenes": {"n_unlabeled": 32, "n_train": 8, "n_val": 4, "short_side": 96},
        "pretrain_per_seed": False,
        "pretrain": ["train.epochs=1", "train.warmup_epochs=0", "data.batch_size=8", "data.num_workers=0",
                     "train.ckpt_every=1000", "train.tensorboard=false"],
        "finetune": ["solver.iterations=8", "solver.steps=[6]", "solver.warmup_iters=2", "solver.batch_size=2",
                     "model.roi_batch_size=32", "model.detections_per_img=20", "input.min_size_train=[96]",
                     "input.max_size_train=160", "input.min_size_test=96", "input.max_size_test=160",
                     "data.num_workers=0", "checkpoint_period=1000", "log_period=4"],
        "seeds": [0, 1],
    },
    "cpu": {
        # Measured: 1113 s on 2 shared CPU cores (pretraining 258 s, fine-tuning 6 x ~140 s).
        "scenes": {"n_unlabeled": 160, "n_train": 40, "n_val": 20, "short_side": 128},
        "pretrain_per_seed": False,
        "pretrain": ["train.epochs=10", "train.warmup_epochs=1", "data.batch_size=16", "data.num_workers=1",
                     "train.ckpt_every=100", "train.tensorboard=false"],
        "finetune": ["solver.iterations=150", "solver.steps=[110,135]", "solver.warmup_iters=20", "solver.batch_size=2",
                     "model.roi_batch_size=64", "model.detections_per_img=30", "input.min_size_train=[112,128,144]",
                     "input.max_size_train=240", "input.min_size_test=128", "input.max_size_test=240",
                     "data.num_workers=1", "checkpoint_period=50", "log_period=10"],
        "seeds": [0, 1],
    },
    "cpu_long": {
        # The cpu preset's data with 2.5x the pretraining and 3.3x the fine-tuning (about 30 min on 2 idle cores).
        "scenes": {"n_unlabeled": 160, "n_train": 40, "n_val": 20, "short_side": 128},
        "pretrain_per_seed": False,
        "pretrain": ["train.epochs=25", "train.warmup_epochs=2", "data.batch_size=16", "data.num_workers=1",
                     "train.ckpt_every=100", "train.tensorboard=false"],
        "finetune": ["solver.iterations=500", "solver.steps=[380,450]", "solver.warmup_iters=50", "solver.batch_size=2",
                     "model.roi_batch_size=64", "model.detections_per_img=30", "input.min_size_train=[112,128,144]",
                     "input.max_size_train=240", "input.min_size_test=128", "input.max_size_test=240",
                     "data.num_workers=1", "checkpoint_period=250", "log_period=25"],
        "seeds": [0, 1],
    },
    "gpu": {
        # Measured: 310 s on one H100 (torch 2.11), data+proposals 23 s, pretraining 48 s, fine-tuning 239 s.
        "scenes": {"n_unlabeled": 1000, "n_train": 200, "n_val": 100, "short_side": 256},
        "pretrain_per_seed": False,
        "pretrain": ["train.epochs=8", "train.warmup_epochs=1", "data.batch_size=64", "data.num_workers=10",
                     "train.ckpt_every=500", "train.tensorboard=false"],
        "finetune": ["solver.iterations=400", "solver.steps=[280,360]", "solver.warmup_iters=50", "solver.batch_size=8",
                     "model.roi_batch_size=256", "input.min_size_train=[224,256,288]", "input.max_size_train=480",
                     "input.min_size_test=256", "input.max_size_test=480", "data.num_workers=6",
                     "checkpoint_period=1000", "log_period=50", "amp=true"],
        "seeds": [0, 1],
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="size of the experiment (see the module doc)")
    parser.add_argument("--out", default="transfer_out", help="output folder (data, proposals, runs, transfer.json/png)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's, >= 2 for a std)")
    parser.add_argument("--data", default=None, help="reuse a `soco-det synth` folder instead of generating scenes")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    parser.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS), help="which inits to compare")
    parser.add_argument("--workers", type=int, default=2, help="processes for scenes and proposals")
    return parser.parse_args(argv)


def prepare_data(args: argparse.Namespace, preset: dict[str, Any], out: Path) -> dict[str, Path]:
    import soco_det.synth as synth

    if args.data:
        root = Path(args.data)
        paths = {"images": root / "images", **{s: root / f"{s}.json" for s in ("unlabeled", "train", "val")}}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            sys.exit(f"--data {root}: missing {', '.join(missing)} (write it with `soco-det synth`)")
        return paths
    return synth.generate(out / "data", seed=0, workers=args.workers, **preset["scenes"])


def pretrain_and_export(method: str, seed: int, proposals: Path, preset: dict[str, Any], device: str, out: Path) -> Path:
    """Pretrain ``method`` (``soco`` or ``image_byol``) with the tiny_cpu recipe + the preset's budget;
    returns its torchvision export. Reuses a finished export (the benchmark can be re-run)."""
    from soco_det.config import build_config
    from soco_det.engine import PretrainConfig, pretrain
    from soco_det.export import export_checkpoint

    export = out / "exports" / f"{method}_seed{seed}.pth"
    if export.exists():
        return export
    overrides = [f"data.proposals={proposals}", f"model.variant={VARIANT[method]}", f"seed={seed}",
                 f"train.device={device}", "train.progress=false", *preset["pretrain"]]
    cfg = build_config(PretrainConfig, "tiny_cpu", overrides)
    run = pretrain(cfg, out / "pretrain" / f"{method}_seed{seed}", resume="auto")
    return export_checkpoint(run, "torchvision", export)


def finetune_one(init: str, init_path: Path | None, seed: int, widths: list[str], data: dict[str, Path],
                 preset: dict[str, Any], device: str, out: Path) -> dict[str, Any]:
    """Fine-tune + evaluate one (init, seed); returns the final metrics (reused if already there)."""
    from soco_det.config import build_config
    from soco_det.transfer import FinetuneConfig, finetune

    run = out / "finetune" / f"{init}_seed{seed}"
    if (run / "metrics.json").exists():
        return json.loads((run / "metrics.json").read_text())
    overrides = [
        f"data.train_json={data['train']}", f"data.train_images={data['images']}",
        f"data.val_json={data['val']}", f"data.val_images={data['images']}",
        f"model.init={init_path or 'random'}", f"seed={seed}", f"device={device}", *widths, *preset["finetune"],
    ]
    cfg = build_config(FinetuneConfig, "finetune_tiny_cpu", overrides)
    finetune(cfg, run, resume="auto")
    return json.loads((run / "metrics.json").read_text())


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{init: {"bbox/AP": {"mean", "std", "values"}, ...}}`` in percent (std 0 for one seed)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for init, by_seed in results.items():
        row = {}
        for iou, name in METRICS:
            values = [100 * (m[iou][name] or 0.0) for m in by_seed.values()]
            row[f"{iou}/{name}"] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values,
            }
        table[init] = row
    return table


def format_table(table: dict[str, dict[str, dict[str, float]]], seeds: list[int]) -> str:
    head = f"{'init':<12}" + "".join(f"{k:>14}" for k in (f"{i}/{n}" for i, n in METRICS))
    lines = [f"AP in percent, mean +- std over seeds {seeds}", head, "-" * len(head)]
    for init, row in table.items():
        cells = "".join(f"{row[k]['mean']:>8.2f} +-{row[k]['std']:>4.1f}" for k in (f"{i}/{n}" for i, n in METRICS))
        lines.append(f"{init:<12}{cells}")
    return "\n".join(lines)


def plot(table: dict[str, dict[str, dict[str, float]]], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [f"{i}/{n}" for i, n in METRICS]
    x = np.arange(len(keys))
    width = 0.8 / max(len(table), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, (init, row) in enumerate(table.items()):
        ax.bar(x + k * width, [row[m]["mean"] for m in keys], width, yerr=[row[m]["std"] for m in keys], capsize=3, label=init)
        for j, m in enumerate(keys):  # individual seeds as dots
            ax.scatter([x[j] + k * width] * len(row[m]["values"]), row[m]["values"], s=8, color="black", zorder=3)
    ax.set_xticks(x + width * (len(table) - 1) / 2, keys)
    ax.set_ylabel("AP (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from soco_det.atomic import atomic_write_json
    from soco_det.logs import setup_logging
    from soco_det.proposals import compute_store

    setup_logging()
    preset = PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    data = prepare_data(args, preset, out)
    store = compute_store(data["images"] / "unlabeled", out / "proposals", workers=args.workers)
    timings["data+proposals"] = time.perf_counter() - t

    exports: dict[tuple[str, int], Path] = {}
    pre_seeds = seeds if preset["pretrain_per_seed"] else seeds[:1]
    for method in (m for m in ("soco", "image_byol") if m in args.inits):
        t = time.perf_counter()
        for s in pre_seeds:
            exports[(method, s)] = pretrain_and_export(method, s, store, preset, device, out)
        timings[f"pretrain {method}"] = time.perf_counter() - t

    # One architecture for every init: the widths of the SoCo export (FPN, box head).
    from soco_det.transfer.maskrcnn import read_weights, widths_of

    reference = exports.get(("soco", pre_seeds[0]))
    widths = widths_of(read_weights(reference)) if reference else {}
    width_args = [f"model.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "") for k, v in widths.items()]

    results: dict[str, dict[int, dict[str, Any]]] = {}
    for init in args.inits:
        t = time.perf_counter()
        results[init] = {}
        for s in seeds:
            path = None if init == "random" else exports[(init, s if preset["pretrain_per_seed"] else pre_seeds[0])]
            results[init][s] = finetune_one(init, path, s, width_args, data, preset, device, out)
        timings[f"finetune {init}"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    table = summarise(results)
    text = format_table(table, seeds)
    print(f"\ntransfer benchmark, preset {args.preset}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, "
          f"pretraining {'per seed' if preset['pretrain_per_seed'] else 'once (seed ' + str(pre_seeds[0]) + ')'}")
    print(text)
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    atomic_write_json(out / "transfer.json", {
        "preset": args.preset, "device": device, "seeds": seeds, "pretrain_seeds": pre_seeds,
        "settings": {k: v for k, v in preset.items() if k != "seeds"}, "widths": {k: list(v) if isinstance(v, tuple) else v for k, v in widths.items()},
        "table_percent": table, "per_seed": results, "timings_s": timings,
    }, indent=2)
    plot(table, out / "transfer.png", f"sample scenes, preset {args.preset}, seeds {seeds}")
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
