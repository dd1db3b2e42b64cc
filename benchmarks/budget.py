"""Budget-aware pretraining: what a small run's optimiser settings do to its features.

The table behind docs/budget.md (docs/results.md, "Budget-aware pretraining"): on 1000 unlabeled sample
scenes (160 px), the tiny_cpu network (ResNet-18, 64/64/32 views, batch 16) is pretrained for 310
steps (5 epochs) with

* ``paper``: the paper's LARS eta 0.001 (a conv weight moves 6e-5 of its norm per step at batch 16);
* ``auto``: ``train.optim.budget=auto`` (eta 0.02: 1.25e-3 per step), nothing else;
* ``auto+decorrelation``: the same and ``model.head_decorrelation=1.0`` (the small-budget rule);
* ``byol auto``: image-level BYOL with ``train.optim.budget=auto``;

and each is probed (``soco-det probe``, 128-px images, 300 train / 200 val labeled scenes) against
the same network untrained (same init scheme and seed), with the relative movement of its weights.

    python benchmarks/budget.py --out /tmp/budget        # ~50 min on 2 idle CPU cores (4 runs of ~12 min)
    python benchmarks/budget.py --runs paper auto        # a subset
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

VARIANTS = {
    "paper": ["train.optim.budget=paper", "model.head_decorrelation=0"],
    "auto": ["train.optim.budget=auto", "model.head_decorrelation=0"],
    "auto+decorrelation": ["train.optim.budget=auto", "model.head_decorrelation=1.0"],
    "byol auto": ["train.optim.budget=auto", "model.variant=image_byol"],
}
COMMON = [
    "train.loop.epochs=5",
    "train.optim.warmup_epochs=1",
    "data.num_workers=1",
    "train.loop.ckpt_every=1000",
    "train.loop.tensorboard=false",
    "train.loop.progress=false",
    "train.loop.cpu_threads=1",
    "train.loop.log_every=10",
]


def movement(run: Path) -> dict[str, float]:
    """Relative movement (%) of each part's conv/linear weights from the run's start to its end."""
    import torch

    from soco_det.engine.dynamics import weight_groups
    from soco_det.models import init_model
    from soco_det.probe.network import read_run_config

    cfg = read_run_config(run)
    model = init_model(cfg.model, cfg.seed)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    model.load_state_dict(torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"])
    out = {}
    for group, params in weight_groups(model).items():
        moved = sum(float((p.detach() - start[n]).norm() ** 2) for n, p in params) ** 0.5
        base = sum(float(start[n].norm() ** 2) for n, _ in params) ** 0.5
        out[group] = 100 * moved / base
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="budget_out")
    parser.add_argument("--runs", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    import soco_det.synth as synth
    from soco_det.atomic import atomic_write_json
    from soco_det.config import build_config
    from soco_det.engine import PretrainConfig, pretrain
    from soco_det.logs import setup_logging
    from soco_det.probe.network import load_probe_network, read_run_config
    from soco_det.probe.objects import read_objects, spec_from_config
    from soco_det.probe.probe import format_table, paired_difference, run_probe, summarise
    from soco_det.proposals import compute_store

    setup_logging()
    out = Path(args.out)
    t0 = time.perf_counter()
    data = synth.generate(out / "data", n_unlabeled=1000, n_train=300, n_val=200, short_side=160, workers=args.workers)
    store = compute_store(Path(data["images"]) / "unlabeled", out / "proposals", workers=args.workers)
    runs = {}
    for name in args.runs:
        overrides = [
            f"data.images={Path(data['images']) / 'unlabeled'}",
            f"data.proposals={store}",
            *COMMON,
            *VARIANTS[name],
        ]
        run = out / "runs" / name.replace(" ", "_").replace("+", "_")
        if not (run / "checkpoints" / "last.pt").exists():
            pretrain(build_config(PretrainConfig, "tiny_cpu", overrides), run, resume="auto")
        runs[name] = run

    cfg = read_run_config(runs[args.runs[0]])
    spec = spec_from_config(cfg, 128)
    train = read_objects(data["train"], data["images"])
    val = read_objects(data["val"], data["images"], categories=train.categories)
    untrained = run_probe(load_probe_network("untrained", cfg.model, cfg.seed), train, val, spec)
    summaries, report = {"untrained": summarise(untrained, 500)}, {}
    for name, run in runs.items():
        result = run_probe(load_probe_network(run, cfg.model, cfg.seed), train, val, spec)
        summaries[name] = summarise(result, 500)
        report[name] = {
            "movement_percent": movement(run),
            "probe": summaries[name],
            "minus_untrained": paired_difference(result, untrained, 500),
        }
    print(format_table(summaries, "head"), "\n")
    print(format_table(summaries, "roi"), "\n")
    for name, r in report.items():
        mv = ", ".join(f"{k} {v:.2f} %" for k, v in r["movement_percent"].items())
        d = r["minus_untrained"]
        print(
            f"{name}: moved {mv}; head linear {d['head']['linear_top1']['mean']:+.3f} "
            f"[{d['head']['linear_top1']['ci95'][0]:+.3f}, {d['head']['linear_top1']['ci95'][1]:+.3f}], "
            f"roi linear {d['roi']['linear_top1']['mean']:+.3f} "
            f"[{d['roi']['linear_top1']['ci95'][0]:+.3f}, {d['roi']['linear_top1']['ci95'][1]:+.3f}]"
        )
    atomic_write_json(
        out / "budget.json",
        {"seconds": time.perf_counter() - t0, "untrained": summaries["untrained"], "runs": report},
        indent=2,
    )
    print(f"wrote {out / 'budget.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
