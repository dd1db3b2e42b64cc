"""Transfer benchmark v2: does SoCo pretraining beat the same network untrained, and image-level BYOL?

On the sample scenes, at equal budget:

1. scenes and the faithful selective-search proposals (their recall of the val objects at IoU 0.5,
   raw and kept, is reported);
2. for every pretraining seed s: SoCo (``soco_fpn``) and image-level BYOL (``image_byol``) pretrained
   with the same engine, recipe, budget rule and seed; "random" is **the same architecture with the
   same init scheme and seed, untrained** (``init_model(cfg.model, s)``: exactly what both runs start
   from); BYOL brings a trained encoder, its FPN and head are those untrained ones; the gpu preset (or
   ``--detcon``) adds the DetCon baseline (``detcon``: NT-Xent over box masks pooled on C5), likewise;
3. the object probe (:mod:`soco_det.probe`) of each on the labeled train/val scenes, with paired
   differences over the same val objects, pooled over the pretraining seeds; ``probe_*`` reads the
   box head's output (what SoCo trains and the detector's box head inherits), ``probe_roi_*`` the
   FPN RoIAlign features;
4. Mask R-CNN fine-tuning from each (paired: fine-tuning seed f gives every init the same data order
   and head init), COCO box/mask AP, per-seed differences with a t-interval over the seeds;
   torchvision's own random init as an extra row (``--torchvision-random``).

The AP presets (``cpu_ap``, ``smoke_ap``; ``--dataset scenes|nuclei``) rank the same three inits in COCO box
AP instead: after pretraining, the frozen-backbone detection probe (:mod:`soco_det.transfer.frozen`) trains a
Faster R-CNN's RPN and box head on each init's frozen, cached backbone + FPN features, with a low-label subset
of the train images and with all of them, for every fine-tuning seed (paired: same head init, label subset
and data order for every init).

A pretrained model never counts as a gain when its features collapsed (its box-head output's
effective rank under 5 % of the untrained one's, or the run's collapse warning) or when its
localisation probe fell below the untrained model's: ``gains`` in the JSON says which did.

    python benchmarks/transfer.py --preset smoke --json /tmp/smoke.json   # a minute or two: tests the script
    python benchmarks/transfer.py --preset cpu --json out.json            # <= 30 min on 2 CPU cores
    python benchmarks/transfer.py --preset gpu --json out.json            # one H100/H200, ~8 min (unmeasured)
    python benchmarks/transfer.py --preset cpu_ap --json out.json         # box AP, <= 60 min on 2 CPU cores
    python benchmarks/transfer.py --preset smoke_ap --json /tmp/ap.json   # a couple of minutes: tests the script

``--json FILE`` writes ``{"preset", "seconds", "results", "paired": {"soco-random": {"probe_linear_top1":
{"mean", "ci95"}, ..., "box_ap": {...}}, "soco-byol": ..., "byol-random": ...}, "gains"}``; the AP presets write ``results[init]["box_ap"]``,
``["box_ap50"]`` (and ``_low_label``: means over the seeds, AP points), ``results["frozen_probe"]`` (every run),
``paired[pair]["box_ap"] = {"mean", "ci95", "values"}`` and ``paired_low_label[pair]`` likewise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

METHODS = {"soco": "soco_fpn", "byol": "image_byol", "soco_from_byol": "soco_fpn", "detcon": "detcon"}
PAIRS = (("soco", "random"), ("soco", "byol"), ("byol", "random"))
# --soco-from-byol: SoCo started from the BYOL run's weights (model.init), the same SoCo budget on top
FROM_BYOL_PAIRS = (("soco_from_byol", "byol"), ("soco_from_byol", "soco"), ("soco_from_byol", "random"))
# DetCon (object-level NT-Xent over box masks pooled on C5): the gpu preset, or any preset with --detcon
DETCON_PAIRS = (("detcon", "random"), ("soco", "detcon"))
PROBE_SCORES = ("linear_top1", "knn_top1", "loc_r2", "retrieval_top1")
AP_KEYS = (("bbox", "AP", "box_ap"), ("bbox", "AP50", "box_ap50"), ("segm", "AP", "mask_ap"))

# The budget rule of docs/budget.md: LARS eta from the batch (train.optim.budget=auto)
# and the head's variance-covariance term; same for SoCo and BYOL (BYOL has no box head: no term).
SMALL_BUDGET = ["train.optim.budget=auto", "model.head_decorrelation=1.0"]
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "scenes": {"n_unlabeled": 48, "n_train": 16, "n_val": 12, "short_side": 96},
        "recipe": "tiny_cpu",
        "pretrain": [
            *SMALL_BUDGET,
            "train.loop.epochs=2",
            "train.optim.warmup_epochs=0.5",
            "data.batch_size=8",
            "data.num_workers=0",
            "train.loop.ckpt_every=1000",
            "train.loop.tensorboard=false",
            "train.loop.log_every=2",
        ],
        "pretrain_seeds": [0, 1],
        "finetune_seeds": [0, 1, 2],
        "probe_size": 96,
        "resamples": 200,
        "finetune": [
            "solver.iterations=6",
            "solver.steps=[5]",
            "solver.warmup_iters=2",
            "solver.batch_size=2",
            "model.roi_batch_size=32",
            "model.detections_per_img=20",
            "model.precise_bn_images=4",
            "input.min_size_train=[96]",
            "input.max_size_train=160",
            "input.min_size_test=96",
            "input.max_size_test=160",
            "data.num_workers=0",
            "checkpoint_period=1000",
            "log_period=3",
        ],
    },
    "cpu": {
        "scenes": {"n_unlabeled": 600, "n_train": 300, "n_val": 200, "short_side": 128},
        "recipe": "tiny_cpu",
        "pretrain": [
            *SMALL_BUDGET,
            "train.loop.epochs=6",
            "train.optim.warmup_epochs=0.5",
            "data.batch_size=16",
            "data.num_workers=1",
            "train.loop.ckpt_every=1000",
            "train.loop.tensorboard=false",
            "train.loop.log_every=10",
        ],
        "pretrain_seeds": [0, 1],
        "finetune_seeds": [0, 1, 2],
        "probe_size": 128,
        "resamples": 1000,
        "finetune": [
            "solver.iterations=40",
            "solver.steps=[30]",
            "solver.warmup_iters=8",
            "solver.batch_size=4",
            "model.roi_batch_size=64",
            "model.detections_per_img=30",
            "model.precise_bn_images=32",
            "input.min_size_train=[112,128,144]",
            "input.max_size_train=240",
            "input.min_size_test=128",
            "input.max_size_test=240",
            "data.num_workers=1",
            "checkpoint_period=1000",
            "log_period=10",
        ],
    },
    # ---- AP presets: the frozen-backbone detection probe (soco_det.transfer.frozen), box AP on val
    "smoke_ap": {
        "scenes": {"n_unlabeled": 48, "n_train": 16, "n_val": 12, "short_side": 96},
        "recipe": "tiny_cpu",
        "pretrain": [
            *SMALL_BUDGET,
            "train.loop.epochs=2",
            "train.optim.warmup_epochs=0.5",
            "data.batch_size=8",
            "data.num_workers=0",
            "train.loop.ckpt_every=1000",
            "train.loop.tensorboard=false",
            "train.loop.log_every=2",
        ],
        "pretrain_seeds": [0],
        "datasets": {"nuclei": {"prepare": {"tile": 128, "stride": 128}, "object_size": "auto"}},
        "ap": {
            "seeds": [0, 1],
            "low_label": 0.5,
            "settings": {"size": 96, "iterations": 6, "batch_size": 2, "warmup_iters": 2, "roi_batch_size": 32},
        },
    },
    "cpu_ap": {
        "scenes": {"n_unlabeled": 600, "n_train": 300, "n_val": 150, "short_side": 128},
        "recipe": "tiny_cpu",
        "pretrain": [
            *SMALL_BUDGET,
            "train.loop.epochs=6",
            "train.optim.warmup_epochs=0.5",
            "data.batch_size=16",
            "data.num_workers=1",
            "train.loop.ckpt_every=1000",
            "train.loop.tensorboard=false",
            "train.loop.log_every=10",
        ],
        "pretrain_seeds": [0],
        # real photographs of small objects: proposals fitted to the objects (soco-det proposals
        # --object-size auto), overlapping 128-px tiles, more epochs over the 65 unlabeled tiles
        "datasets": {
            "nuclei": {
                "prepare": {"tile": 128, "stride": 32},
                "object_size": "auto",
                "pretrain": ["train.loop.epochs=40", "data.views.geometry.fit_objects=true"],
                # the untrained start is far off the floor there (AP50 86) at 500 iterations
                "ap_settings": {"iterations": 500},
            }
        },
        "ap": {
            "seeds": [0, 1, 2],
            "low_label": 0.2,
            # AdamW at lr 1e-3 for the fresh heads of so short a schedule; 800 iterations, where 500
            # left the untrained start at AP50 8 (docs/results.md "Detection AP on two CPU cores":
            # the schedule was chosen on the untrained init alone, lr 2e-3 and batch 2 were worse)
            "settings": {
                "size": 128,
                "iterations": 800,
                "batch_size": 4,
                "roi_batch_size": 32,
                "optimizer": "adamw",
                "lr": 0.001,
                "warmup_iters": 50,
            },
        },
    },
    "gpu": {
        # ResNet-50 at batch 64 with the paper's views (the regime in which SoCo is known to work).
        "scenes": {"n_unlabeled": 4000, "n_train": 600, "n_val": 300, "short_side": 256},
        "recipe": "soco_fpn_r50_100ep",
        "pretrain": [
            "train.optim.budget=auto",
            "model.head_decorrelation=1.0",
            "train.loop.epochs=12",
            "train.optim.warmup_epochs=1",
            "data.batch_size=64",
            "data.num_workers=12",
            "train.loop.ckpt_every=100000",
            "train.loop.tensorboard=false",
            "train.loop.log_every=25",
            "data.photometric=device",
            "model.channels_last=true",
        ],
        "pretrain_seeds": [0, 1],
        "finetune_seeds": [0, 1, 2],
        "extra_methods": ["detcon"],
        "probe_size": 224,
        "resamples": 1000,
        "finetune": [
            "solver.iterations=600",
            "solver.steps=[450,550]",
            "solver.warmup_iters=50",
            "solver.batch_size=16",
            "model.roi_batch_size=256",
            "model.precise_bn_images=200",
            "input.min_size_train=[224,256,288]",
            "input.max_size_train=480",
            "input.min_size_test=256",
            "input.max_size_test=480",
            "data.num_workers=8",
            "checkpoint_period=100000",
            "log_period=50",
            "amp=auto",
        ],
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="size of the experiment; cpu_ap / smoke_ap: detection AP from the frozen-backbone probe",
    )
    parser.add_argument(
        "--dataset",
        choices=["scenes", "nuclei"],
        default="scenes",
        help="scenes: the generated sample scenes; nuclei: tiles of stardist's fluorescence image of nuclei "
        "(soco-det prepare nuclei; pip install stardist)",
    )
    parser.add_argument(
        "--probe",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="AP presets: overrides of the frozen probe's settings (e.g. head=shared iterations=1000; "
        "soco_det/transfer/frozen_config.py)",
    )
    parser.add_argument(
        "--object-size",
        default=None,
        help="the pretraining proposals' --object-size (paper, auto, N, N%%, coco:FILE); default: the "
        "dataset's (scenes: paper, nuclei: auto)",
    )
    parser.add_argument("--out", default="transfer_out", help="working folder (data, runs, probes, fine-tunings)")
    parser.add_argument("--json", default=None, help="write the results here (default: OUT/transfer.json)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=2, help="processes for scenes and proposals")
    parser.add_argument("--no-finetune", action="store_true", help="probe only")
    parser.add_argument(
        "--torchvision-random",
        action="store_true",
        help="also fine-tune from torchvision's default init (the old 'random')",
    )
    parser.add_argument(
        "--soco-from-byol",
        action="store_true",
        help="also pretrain SoCo from the BYOL run's weights (model.init): does SoCo improve a "
        "backbone one already has?",
    )
    parser.add_argument(
        "--detcon",
        action="store_true",
        help="also pretrain the DetCon baseline (model.variant=detcon; always on in the gpu preset)",
    )
    parser.add_argument(
        "--pretrain",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra pretraining overrides for both methods (e.g. model.head_decorrelation=0)",
    )
    return parser.parse_args(argv)


def selected_methods(args: argparse.Namespace, preset: dict[str, Any]) -> tuple[list[str], tuple]:
    """The pretraining methods of this run and the ``(a, b)`` pairs compared."""
    extra = set(preset.get("extra_methods", [])) | ({"detcon"} if args.detcon else set())
    extra |= {"soco_from_byol"} if args.soco_from_byol else set()
    methods = [m for m in METHODS if m in ("soco", "byol") or m in extra]
    pairs = PAIRS + (FROM_BYOL_PAIRS if "soco_from_byol" in extra else ()) + (DETCON_PAIRS if "detcon" in extra else ())
    return methods, pairs


# ---------------------------------------------------------------------- stages
def proposal_recall(data: dict[str, Path], out: Path, workers: int, object_size: str = "paper") -> dict[str, float]:
    """Recall of the val objects at IoU >= 0.5 by the selective-search proposals of the val images (the
    settings of ``object_size``, as for pretraining), raw and kept."""
    from soco_det.probe.objects import read_objects
    from soco_det.proposals import compute_store
    from soco_det.proposals.store import ProposalStore

    store = ProposalStore.open(
        compute_store(
            data["images"] / "val", out / "proposals_val", workers=workers, keep_raw=True, object_size=object_size
        )
    )
    objects = read_objects(data["val"], data["images"])
    found = {"kept": 0, "raw": 0}
    for i, path in enumerate(objects.images):
        k = store.index(str(Path(path).relative_to(data["images"] / "val")))
        if k is None:
            continue
        w, h = store.size(k)
        gt = objects.boxes[objects.image_index == i] * np.array([w, h, w, h])
        for kind, rects in (("kept", store.boxes(k)), ("raw", store.raw_boxes(k))):
            if len(rects):
                r = np.asarray(rects, np.float64)  # official rects: [x, y, w, h] with w = max - min
                boxes = np.concatenate([r[:, :2], r[:, :2] + r[:, 2:] + 1], axis=1)
                found[kind] += int((_iou(gt, boxes) >= 0.5).any(axis=1).sum())
    return {k: v / len(objects) for k, v in found.items()}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def pretrain_run(
    method: str,
    seed: int,
    data: dict[str, Path],
    store: Path,
    preset: dict[str, Any],
    extra: list[str],
    device: str,
    out: Path,
    init: Path | None = None,
) -> Path:
    from soco_det.config import build_config
    from soco_det.engine import PretrainConfig, pretrain

    overrides = [
        f"data.images={data['images'] / 'unlabeled'}",
        f"data.proposals={store}",
        f"model.variant={METHODS[method]}",
        f"seed={seed}",
        f"train.loop.device={device}",
        "train.loop.progress=false",
        *preset["pretrain"],
        *extra,
    ]
    if method in ("byol", "detcon"):  # no box head
        overrides = [o for o in overrides if not o.startswith("model.head_decorrelation")]
    if init is not None:
        overrides.append(f"model.init={init}")
    cfg = build_config(PretrainConfig, preset["recipe"], overrides)
    run = out / "pretrain" / f"{method}_seed{seed}"
    done = run / "checkpoints" / "last.pt"
    if not done.exists():
        pretrain(cfg, run, resume="auto")
    return run


def untrained_export(cfg: Any, seed: int, out: Path) -> Path:
    """A torchvision export of the untrained network (``init_model``): the paired "random" init."""
    from soco_det.export import export_checkpoint
    from soco_det.export.untrained import save_untrained

    path = out / "exports" / f"random_seed{seed}.pth"
    if not path.exists():
        export_checkpoint(save_untrained(cfg, out / "untrained" / f"seed{seed}.pt", seed), "torchvision", path)
    return path


def final_dynamics(run: Path) -> dict[str, float]:
    from soco_det.engine.metrics import read_metrics

    records = [r for r in read_metrics(run) if "loss" in r]
    last = records[-1] if records else {}
    return {k: last[k] for k in last if k.startswith(("move/", "collapse/", "lars/"))}


def finetune_one(
    name: str,
    init: str,
    seed: int,
    widths: list[str],
    data: dict[str, Path],
    preset: dict[str, Any],
    device: str,
    out: Path,
) -> dict[str, Any]:
    from soco_det.config import build_config
    from soco_det.transfer import FinetuneConfig, finetune

    run = out / "finetune" / f"{name}_ft{seed}"
    if not (run / "metrics.json").exists():
        overrides = [
            f"data.train_json={data['train']}",
            f"data.train_images={data['images']}",
            f"data.val_json={data['val']}",
            f"data.val_images={data['images']}",
            f"model.init={init}",
            f"seed={seed}",
            f"device={device}",
            "model.depth={depth}",
            *widths,
            *preset["finetune"],
        ]
        overrides = [o.replace("{depth}", str(preset["depth"])) for o in overrides]
        finetune(build_config(FinetuneConfig, "finetune_tiny_cpu", overrides), run, resume="auto")
    return json.loads((run / "metrics.json").read_text())


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95 % t-interval of paired per-seed differences (:func:`soco_det.stats.t_interval`)."""
    from soco_det.stats import t_interval as interval

    return interval(values)


# ---------------------------------------------------------------------- the AP presets
def ap_inits(cfg: Any, runs: dict[tuple[str, int], Path], seed: int, out: Path) -> dict[str, dict]:
    """Torchvision-named weights of the three inits of pretraining seed ``seed``: "random" (the untrained
    network SoCo's run started from: same init scheme and seed), "soco", and "byol" (its encoder; FPN
    and box head those of the untrained network, as in the object probe)."""
    from soco_det.export.untrained import save_untrained
    from soco_det.transfer.frozen import complete_weights
    from soco_det.transfer.model import read_weights

    random = read_weights(save_untrained(cfg, out / "untrained" / f"seed{seed}.pt", seed))
    return {
        "random": random,
        "soco": complete_weights(read_weights(runs[("soco", seed)]), random),
        "byol": complete_weights(read_weights(runs[("byol", seed)]), random),
    }


def ap_values(reports: dict[int, dict], name: str, fraction: float, metric: str = "AP") -> list[float]:
    """AP points of init ``name`` at train fraction ``fraction``, one per (pretraining seed, fine-tuning seed)."""
    from soco_det.transfer.frozen import fraction_key

    return [
        100 * (run["bbox"][metric] or 0.0)
        for report in reports.values()
        for run in report["results"][name][fraction_key(fraction)].values()
    ]


def ap_summary(reports: dict[int, dict], names: list[str], fractions: dict[str, float]) -> dict[str, Any]:
    """``results[init]`` (means in AP points), ``paired`` / ``paired_low_label`` (t-intervals of the
    paired per-seed differences) of the frozen detection probe reports."""
    results: dict[str, Any] = {}
    for name in names:
        row = {}
        for setting, fraction in fractions.items():
            suffix = "" if setting == "full" else f"_{setting}"
            for metric, key in (("AP", "box_ap"), ("AP50", "box_ap50")):
                values = ap_values(reports, name, fraction, metric)
                row[key + suffix] = float(np.mean(values))
                row[f"{key}{suffix}_per_seed"] = values
        results[name] = row
    paired: dict[str, dict[str, Any]] = {"paired": {}, "paired_low_label": {}}
    for a, b in PAIRS:
        for setting, fraction in fractions.items():
            where = paired["paired" if setting == "full" else "paired_low_label"]
            where[f"{a}-{b}"] = {
                key: t_interval(
                    [x - y for x, y in zip(ap_values(reports, a, fraction, m), ap_values(reports, b, fraction, m))]
                )
                for m, key in (("AP", "box_ap"), ("AP50", "box_ap50"))
            }
    return {"results": results, **paired}


def print_ap_table(summary: dict[str, Any], fractions: dict[str, float], n_train: int, seeds: list[int]) -> None:
    labels = {s: f"{100 * f:g} % labels ({max(1, round(f * n_train))} images)" for s, f in fractions.items()}
    print(f"\nfrozen detection probe: box AP / AP50 on val (points), mean over fine-tuning seeds {seeds}")
    print(f"  {'init':<8}" + "".join(f"{labels[s]:>32}" for s in fractions))
    for name, row in summary["results"].items():
        cells = "".join(
            f"{row['box_ap' + ('' if s == 'full' else '_' + s)]:>20.2f} / "
            f"{row['box_ap50' + ('' if s == 'full' else '_' + s)]:<9.2f}"
            for s in fractions
        )
        print(f"  {name:<8}{cells}")
    print("paired differences, first minus second (AP points, mean [95 % t-interval over the seeds]):")
    for where, setting in (("paired", "full"), ("paired_low_label", "low_label")):
        for pair, v in summary[where].items():
            cells = ", ".join(
                f"{k} {v[k]['mean']:+.2f} [{v[k]['ci95'][0]:+.2f}, {v[k]['ci95'][1]:+.2f}]"
                for k in ("box_ap", "box_ap50")
            )
            print(f"  {labels[setting]:<28} {pair:<12} {cells}")


def run_ap(args: argparse.Namespace, preset: dict[str, Any], data: dict[str, Path], store: Path, device: str) -> dict:
    """The AP presets: pretrain SoCo and BYOL, then the frozen detection probe of random / BYOL / SoCo
    at the low-label setting and on every train image, paired over the fine-tuning seeds."""
    from soco_det.config import build_config
    from soco_det.engine import PretrainConfig
    from soco_det.transfer.frozen import FrozenSettings, frozen_detection_probe

    out, timings = Path(args.out), {}
    runs: dict[tuple[str, int], Path] = {}
    for seed in preset["pretrain_seeds"]:
        for method in ("soco", "byol"):
            t = time.perf_counter()
            runs[(method, seed)] = pretrain_run(method, seed, data, store, preset, args.pretrain, device, out)
            timings[f"pretrain {method} seed {seed}"] = time.perf_counter() - t
    cfg = build_config(PretrainConfig, preset["recipe"], [*preset["pretrain"], *args.pretrain])
    ap = preset["ap"]
    fractions = {"low_label": float(ap["low_label"]), "full": 1.0}
    reports = {}
    for seed in preset["pretrain_seeds"]:
        t = time.perf_counter()
        reports[seed] = frozen_detection_probe(
            ap_inits(cfg, runs, seed, out),
            data["train"],
            data["val"],
            data["images"],
            FrozenSettings(**ap["settings"]),
            seeds=ap["seeds"],
            fractions=list(fractions.values()),
            device=device,
        )
        timings[f"frozen probe pretraining seed {seed}"] = time.perf_counter() - t
    summary = ap_summary(reports, ["random", "byol", "soco"], fractions)
    return {"summary": summary, "reports": reports, "timings": timings, "fractions": fractions}


def print_ap_minutes(ap: dict[str, Any]) -> None:
    """Minutes of every run: pretraining, feature caching per init, heads per (init, setting, seed)."""
    print("minutes per run:")
    for k, v in ap["timings"].items():
        if k.startswith("pretrain"):
            print(f"  {k}: {v / 60:.1f}")
    for seed, report in ap["reports"].items():
        for name, by in report["results"].items():
            runs = [
                f"{100 * float(f):g}%/ft{s} {r['train']['minutes']:.1f}"
                for f, per in by.items()
                if f != "cache_seconds"
                for s, r in per.items()
            ]
            print(
                f"  probe {name} (pretraining seed {seed}): features {by['cache_seconds'] / 60:.1f}; " + ", ".join(runs)
            )


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["head=shared", "iterations=800"]`` -> ``{"head": "shared", "iterations": 800}`` (values read as
    JSON): overrides of the frozen probe's settings, each key one of :class:`FrozenSettings`' fields."""
    from dataclasses import fields

    from soco_det.transfer.frozen_config import FrozenSettings

    known = {f.name for f in fields(FrozenSettings)}
    out: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in items)):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected KEY=VALUE")
        if key.strip() not in known:
            raise SystemExit(f"{item!r}: not a frozen probe setting; one of {', '.join(sorted(known))}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def dataset_preset(preset: dict[str, Any], dataset: str, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """An AP preset with the ``datasets[dataset]`` entries applied: its extra pretraining overrides
    and its probe settings (``ap_settings``) over the preset's, then ``probe`` (``--probe``) over those."""
    entry = preset.get("datasets", {}).get(dataset, {})
    settings = {**preset["ap"]["settings"], **entry.get("ap_settings", {}), **(probe or {})}
    return {
        **preset,
        "pretrain": [*preset["pretrain"], *entry.get("pretrain", [])],
        "ap": {**preset["ap"], "settings": settings},
    }


def main_ap(args: argparse.Namespace, preset: dict[str, Any], device: str) -> int:
    from soco_det.atomic import atomic_write_json

    t_all = time.perf_counter()
    preset = dataset_preset(preset, args.dataset, parse_settings(args.probe))
    data, store, recall, t_data = prepare_data(args, preset)
    ap = run_ap(args, preset, data, store, device)
    timings = {"data+proposals": t_data, **ap["timings"]}
    timings["total"] = time.perf_counter() - t_all
    settings = ap["reports"][preset["pretrain_seeds"][0]]["settings"]
    n_train = len(json.loads(Path(data["train"]).read_text())["images"])
    print(
        f"\ntransfer benchmark (AP), preset {args.preset}, dataset {args.dataset}, device {device}; pretraining "
        f"seeds {preset['pretrain_seeds']}, fine-tuning seeds {preset['ap']['seeds']}; heads: {settings['head']}, "
        f"{settings['iterations']} iterations at batch {settings['batch_size']}, {settings['size']} px"
    )
    print(
        f"proposals (--object-size {object_size_of(args, preset)}): recall of the val objects at IoU 0.5: "
        f"kept {recall['kept']:.3f}, raw {recall['raw']:.3f}"
    )
    print_ap_table(ap["summary"], ap["fractions"], n_train, preset["ap"]["seeds"])
    print_ap_minutes(ap)
    print("time (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()))
    report = {
        "preset": args.preset,
        "dataset": args.dataset,
        "device": device,
        "seconds": timings["total"],
        "timings_s": timings,
        "settings": preset,
        "extra_pretrain": args.pretrain,
        "object_size": object_size_of(args, preset),
        "proposal_recall": recall,
        "results": {**ap["summary"]["results"], "frozen_probe": {str(k): v for k, v in ap["reports"].items()}},
        "paired": ap["summary"]["paired"],
        "paired_low_label": ap["summary"]["paired_low_label"],
    }
    path = Path(args.json) if args.json else Path(args.out) / "transfer.json"
    atomic_write_json(path, report, indent=2)
    print(f"wrote {path}")
    return 0


def object_size_of(args: argparse.Namespace, preset: dict[str, Any]) -> str:
    """The pretraining proposals' ``--object-size``: ``--object-size``, else the dataset's, else the paper's."""
    return args.object_size or preset.get("datasets", {}).get(args.dataset, {}).get("object_size", "paper")


def dataset_images(dataset: str, preset: dict[str, Any], folder: Path, workers: int) -> dict[str, Path]:
    """The images and COCO files of ``dataset`` in ``folder``: the preset's generated scenes, or the
    real set prepared with the preset's ``datasets[dataset]["prepare"]`` settings."""
    if dataset == "scenes":
        import soco_det.synth as synth

        paths = synth.generate(folder, seed=0, workers=workers, **preset["scenes"])
    else:
        from soco_det.datasets import prepare

        paths = prepare(dataset, folder, **preset.get("datasets", {}).get(dataset, {}).get("prepare", {}))
    return {k: Path(v) for k, v in paths.items()}


def prepare_data(args: argparse.Namespace, preset: dict[str, Any]) -> tuple[dict[str, Path], Path, dict, float]:
    """The labeled and unlabeled images of ``--dataset``, the pretraining proposals and their recall of
    the val objects; returns ``(paths, store, recall, seconds)``."""
    from soco_det.proposals import compute_store

    t = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset_images(args.dataset, preset, out / "data", args.workers)
    object_size = object_size_of(args, preset)
    store = compute_store(
        data["images"] / "unlabeled", out / "proposals", workers=args.workers, object_size=object_size
    )
    recall = proposal_recall(data, out, args.workers, object_size)
    return data, store, recall, time.perf_counter() - t


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from soco_det.atomic import atomic_write_json
    from soco_det.config import build_config
    from soco_det.engine import PretrainConfig
    from soco_det.logs import setup_logging
    from soco_det.probe.network import load_probe_network
    from soco_det.probe.objects import read_objects, spec_from_config
    from soco_det.probe.probe import combined_paired_difference, format_table, run_probe, summarise

    setup_logging()
    preset = PRESETS[args.preset]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if "ap" in preset:
        return main_ap(args, preset, device)
    out = Path(args.out)
    t_all, timings = time.perf_counter(), {}
    data, store, recall, timings["data+proposals"] = prepare_data(args, preset)

    # ---- pretraining (both methods, every seed) and the untrained baseline
    methods, pairs = selected_methods(args, preset)
    runs: dict[tuple[str, int], Path] = {}
    for seed in preset["pretrain_seeds"]:
        for method in methods:
            t = time.perf_counter()
            init = runs[("byol", seed)] if method == "soco_from_byol" else None
            runs[(method, seed)] = pretrain_run(method, seed, data, store, preset, args.pretrain, device, out, init)
            timings[f"pretrain {method} seed {seed}"] = time.perf_counter() - t
    cfg = build_config(PretrainConfig, preset["recipe"], [*preset["pretrain"], *args.pretrain])
    preset["depth"] = cfg.model.depth

    # ---- probes
    t = time.perf_counter()
    spec = spec_from_config(cfg, preset["probe_size"])
    train_objs = read_objects(data["train"], data["images"])
    val_objs = read_objects(data["val"], data["images"], categories=train_objs.categories)
    probes: dict[str, dict[int, Any]] = {name: {} for name in ("random", *methods)}
    for seed in preset["pretrain_seeds"]:
        sources = {"random": "untrained", **{m: runs[(m, seed)] for m in methods}}
        for name, src in sources.items():
            net = load_probe_network(src, cfg.model, seed)
            probes[name][seed] = run_probe(net, train_objs, val_objs, spec, device, seed=0, copy_network=False)
    timings["probes"] = time.perf_counter() - t
    seeds = preset["pretrain_seeds"]
    summaries = {
        f"{name} (seed {s})": summarise(r, preset["resamples"]) for name, by in probes.items() for s, r in by.items()
    }
    paired: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        diff = combined_paired_difference([(probes[a][s], probes[b][s]) for s in seeds], preset["resamples"])
        # The headline is the box head's output (what SoCo's loss trains and what becomes the detector's box
        # head); the FPN RoI features are reported beside it as probe_roi_*.
        paired[f"{a}-{b}"] = {f"probe_{name}": diff["head"][name] for name in PROBE_SCORES if name in diff["head"]}
        paired[f"{a}-{b}"].update(
            {f"probe_roi_{name}": diff["roi"][name] for name in PROBE_SCORES if name in diff["roi"]}
        )
        per_seed = [combined_paired_difference([(probes[a][s], probes[b][s])], preset["resamples"]) for s in seeds]
        paired[f"{a}-{b}"]["probe_linear_top1_per_seed"] = [d["head"]["linear_top1"]["mean"] for d in per_seed]
        paired[f"{a}-{b}"]["probe_roi_linear_top1_per_seed"] = [d["roi"]["linear_top1"]["mean"] for d in per_seed]

    # ---- collapse and localisation checks: when may a pretrained model count as a gain?
    gains: dict[str, dict[str, Any]] = {}
    for method in methods:
        checks = []
        for s in seeds:
            rank = probes[method][s].ranks["head"]
            base_rank = probes["random"][s].ranks["head"]
            loc = summarise(probes[method][s], 200)["head"]["loc_r2"]["mean"]
            base_loc = summarise(probes["random"][s], 200)["head"]["loc_r2"]["mean"]
            dyn = final_dynamics(runs[(method, s)])
            collapsed = rank < 0.05 * base_rank or dyn.get("collapse/head_rank", math.inf) < dyn.get(
                "collapse/head_rank_limit", 0
            )
            checks.append(
                {
                    "seed": s,
                    "head_rank": rank,
                    "untrained_head_rank": base_rank,
                    "collapsed": bool(collapsed),
                    "loc_r2": loc,
                    "untrained_loc_r2": base_loc,
                    "loc_below_untrained": bool(loc < base_loc),
                    "dynamics": dyn,
                }
            )
        lo = paired[f"{method}-random"]["probe_linear_top1"]["ci95"][0]
        ok = all(not c["collapsed"] and not c["loc_below_untrained"] for c in checks)
        gains[method] = {
            "probe_linear_ci_excludes_0": lo > 0,
            "valid": ok,
            "counts_as_gain": bool(lo > 0 and ok),
            "checks": checks,
        }

    # ---- fine-tuning (pretraining seed 0; paired fine-tuning seeds)
    finetuned: dict[str, dict[int, Any]] = {}
    if not args.no_finetune:
        from soco_det.export import export_checkpoint
        from soco_det.models.maskrcnn import widths_of
        from soco_det.transfer.model import read_weights

        t = time.perf_counter()
        s0 = seeds[0]
        inits = {
            "random": untrained_export(cfg, s0, out),
            "soco": export_checkpoint(runs[("soco", s0)], "torchvision", out / "exports" / f"soco_seed{s0}.pth"),
            "byol": export_checkpoint(runs[("byol", s0)], "torchvision", out / "exports" / f"byol_seed{s0}.pth"),
        }
        widths = widths_of(read_weights(inits["soco"]))
        width_args = [f"model.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "") for k, v in widths.items()]
        if args.soco_from_byol:
            inits["soco_from_byol"] = export_checkpoint(
                runs[("soco_from_byol", s0)], "torchvision", out / "exports" / f"soco_from_byol_seed{s0}.pth"
            )
        if "detcon" in methods:
            inits["detcon"] = export_checkpoint(
                runs[("detcon", s0)], "torchvision", out / "exports" / f"detcon_seed{s0}.pth"
            )
        if args.torchvision_random:
            inits["torchvision_random"] = "random"
        for name, init in inits.items():
            finetuned[name] = {
                f: finetune_one(name, str(init), f, width_args, data, preset, device, out)
                for f in preset["finetune_seeds"]
            }
        for a, b in pairs:
            for iou, key, label in AP_KEYS:
                diffs = [
                    100 * ((finetuned[a][f][iou][key] or 0.0) - (finetuned[b][f][iou][key] or 0.0))
                    for f in preset["finetune_seeds"]
                ]
                paired[f"{a}-{b}"][label] = t_interval(diffs)
        timings["finetune"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    # ---- report
    print(
        f"\ntransfer benchmark v2, preset {args.preset}, device {device}; pretraining seeds {seeds}, "
        f"fine-tuning seeds {preset['finetune_seeds']}"
    )
    print(f"proposal recall of the val objects at IoU 0.5: kept {recall['kept']:.3f}, raw {recall['raw']:.3f}\n")
    print(format_table(summaries, "roi"), "\n")
    print(format_table(summaries, "head"), "\n")
    print("paired differences (mean over pretraining seeds; bootstrap 95 % over the val objects):")
    for pair, values in paired.items():
        cells = ", ".join(
            f"{k} {v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
            for k, v in values.items()
            if isinstance(v, dict)
        )
        print(f"  {pair}: {cells}")
    for method, g in gains.items():
        print(
            f"  {method}: counts as a gain: {g['counts_as_gain']} (interval excludes 0: "
            f"{g['probe_linear_ci_excludes_0']}; no collapse and localisation not below untrained: {g['valid']})"
        )
    if finetuned:
        print("\nfine-tuning AP (%), per fine-tuning seed:")
        for name, by in finetuned.items():
            print(
                f"  {name:<18} box AP "
                + " ".join(f"{100 * (m['bbox']['AP'] or 0):.2f}" for m in by.values())
                + "   mask AP "
                + " ".join(f"{100 * (m['segm']['AP'] or 0):.2f}" for m in by.values())
            )
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    report = {
        "preset": args.preset,
        "device": device,
        "seconds": timings["total"],
        "timings_s": timings,
        "settings": {k: v for k, v in preset.items()},
        "extra_pretrain": args.pretrain,
        "proposal_recall": recall,
        "results": {
            "probe": summaries,
            "finetune": {
                n: {str(f): {"bbox": m["bbox"], "segm": m["segm"]} for f, m in by.items()}
                for n, by in finetuned.items()
            },
        },
        "paired": paired,
        "gains": gains,
    }
    path = Path(args.json) if args.json else out / "transfer.json"
    atomic_write_json(path, report, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
