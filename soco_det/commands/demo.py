"""Run the whole pipeline on generated sample scenes, on CPU, and write a report.

Stages (each one's outputs land in a sub-folder of ``-o``): sample scenes, proposals, views,
pretraining, the object probe against the untrained network, exports, and fine-tuning; each stage
is a function ``stage_*(ctx) -> list[str]`` returning the Markdown lines it adds to the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from soco_det.atomic import atomic_write_json, atomic_write_text
from soco_det.logs import get_logger
from soco_det.runlock import LOCK_NAME, move_aside

log = get_logger(__name__)


@dataclasses.dataclass
class DemoContext:
    """What the stages share: the output folder, sizes, and the paths earlier stages produced."""

    out: Path
    seed: int = 0
    n_unlabeled: int = 600
    n_train: int = 300
    n_val: int = 200
    short_side: int = 128
    pretrain_epochs: int = 6
    finetune_iters: int = 20
    finetune_val_images: int = 40
    probe_size: int = 128
    probe: dict = dataclasses.field(default_factory=dict)
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


FINGERPRINT = "demo.json"
# A ranking detection AP does not fit the demo's minutes on two cores: the report says where it is.
AP_BENCHMARK = (
    "Detection AP: see docs/results.md, section 'Detection AP on two CPU cores' "
    "(python benchmarks/transfer.py --preset cpu_ap)"
)
AP_WHY = (
    "A detection AP that ranks the two starts needs a longer fine-tuning schedule and paired fine-tuning "
    "seeds than the minutes this demo has; this probe is the demo's comparison."
)
SCENE_FILES = ("scenes", "scenes.png")


def fingerprint(ctx: DemoContext) -> dict[str, Any]:
    """What the demo's results depend on: its settings and the scenes (their COCO files)."""
    settings = {
        f.name: getattr(ctx, f.name)
        for f in dataclasses.fields(ctx)
        if f.name not in ("out", "probe", "paths", "timings")
    }
    digest = hashlib.sha1()
    for key in ("unlabeled", "train", "val"):
        digest.update(Path(ctx.paths[f"scenes_{key}"]).read_bytes())
    return {"settings": settings, "scenes_sha1": digest.hexdigest()}


def claim_demo_folder(ctx: DemoContext) -> None:
    """Continue the results of an earlier demo in ``ctx.out`` (pretraining and fine-tuning resume)
    only when they came from the same settings and the same scenes; otherwise (another version of
    the scene generator, other sizes) move them to ``OUT.old-<time>``, keeping the scenes just made."""
    record = fingerprint(ctx)
    path = ctx.out / FINGERPRINT
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        earlier = None
    results = [e for e in ctx.out.iterdir() if e.name not in (*SCENE_FILES, FINGERPRINT, LOCK_NAME)]
    if results and earlier != record:
        aside = move_aside(ctx.out, keep=(*SCENE_FILES, LOCK_NAME))
        log.warning("%s held a demo made from other settings or scenes: moved it to %s", ctx.out, aside)
    atomic_write_json(path, record, indent=1)


def stage_scenes(ctx: DemoContext) -> list[str]:
    from soco_det import api
    from soco_det.synth import render_scenes

    data = ctx.out / "scenes"
    scenes = api.synth(
        data, unlabeled=ctx.n_unlabeled, train=ctx.n_train, val=ctx.n_val, size=ctx.short_side, seed=ctx.seed
    )
    ctx.paths.update({f"scenes_{k}": getattr(scenes, k) for k in ("images", "unlabeled", "train", "val")})
    claim_demo_folder(ctx)
    picture = ctx.out / "scenes.png"
    render_scenes(scenes.train, scenes.images, picture, n=6)
    return [
        "## 1. Sample scenes",
        "",
        f"`soco-det synth -o {data} --unlabeled {ctx.n_unlabeled} --train {ctx.n_train} "
        f"--val {ctx.n_val} --size {ctx.short_side} --seed {ctx.seed}`",
        "",
        f"{ctx.n_unlabeled} unlabeled scenes for pretraining, {ctx.n_train} labeled for fine-tuning, "
        f"{ctx.n_val} for validation (COCO JSON with instance masks).",
        "",
        f"![scenes]({picture.name})",
        "",
    ]


def stage_proposals(ctx: DemoContext) -> list[str]:
    from soco_det import api
    from soco_det.proposals.store import format_summary

    images = ctx.paths["scenes_images"] / "unlabeled"
    result = api.proposals(images, ctx.out / "proposals", workers=2)
    store, summary = result.path, result.summary
    ctx.paths["proposals"] = store
    return [
        "## 2. Selective-search proposals",
        "",
        f"`soco-det proposals {images} -o {store} --object-size paper` (the faithful selective search, "
        "scale 300, sigma 0.9, min_size 100, filter `ratio3size0308post`)",
        "",
        "```",
        format_summary(summary),
        "```",
        "",
    ]


def stage_views(ctx: DemoContext) -> list[str]:
    from soco_det.data.config import DataConfig, ViewsConfig
    from soco_det.data.dataset import build_pretrain_dataset
    from soco_det.data.viz import render_views

    images = ctx.paths["scenes_images"] / "unlabeled"
    cfg = DataConfig(images=str(images), proposals=str(ctx.paths["proposals"]), views=ViewsConfig(recipe="soco_fpn"))
    picture = ctx.out / "views.png"
    render_views(build_pretrain_dataset(cfg, seed=ctx.seed), str(picture), samples=3)
    return [
        "## 3. SoCo views",
        "",
        f"`soco-det viz views --images {images} --proposals {ctx.paths['proposals']} --recipe soco_fpn -o views.png`",
        "",
        "Each row is one sample: V1 (whole image, 224) beside V2 (crop, 224) and V1 beside V3 (crop, 112), "
        "boxes coloured by proposal id and labelled with their FPN level.",
        "",
        f"![views]({picture.name})",
        "",
    ]


def stage_pretrain(ctx: DemoContext) -> list[str]:
    from soco_det import api
    from soco_det.engine.metrics import read_metrics
    from soco_det.plots import metric_curve, plot_curves
    from soco_det.probe.network import read_run_config

    images = ctx.paths["scenes_images"] / "unlabeled"
    # A whole schedule (warmup, cosine to the end, target momentum to 1) in a few epochs: a run cut
    # short at the peak learning rate leaves its features half-trained.
    overrides = {
        "train.loop.epochs": ctx.pretrain_epochs,
        "train.optim.warmup_epochs": 0.5,
        "seed": ctx.seed,
        "train.loop.log_every": 5,
    }
    run = api.pretrain(
        images, ctx.paths["proposals"], ctx.out / "pretrain", recipe="tiny_cpu", overrides=overrides, resume="auto"
    ).path
    cfg = read_run_config(run)
    ctx.paths["pretrain"] = run
    records = read_metrics(run)
    pairs = [k for k in records[0] if k.startswith("loss/")] if records else []
    picture = plot_curves(
        {"total": metric_curve(records, "loss"), **{k[5:]: metric_curve(records, k) for k in pairs}},
        ctx.out / "pretrain_loss.png",
        title="SoCo pretraining loss (tiny_cpu; -2 cos per term, minimum -8)",
    )
    first, last = records[0]["loss"], records[-1]["loss"]
    return [
        "## 4. SoCo pretraining",
        "",
        f"`soco-det pretrain --recipe tiny_cpu --images {images} --proposals {ctx.paths['proposals']} "
        f"-o {run} train.loop.epochs={ctx.pretrain_epochs} train.optim.warmup_epochs=0.5`",
        "",
        f"ResNet-18 + FPN + 4conv1fc head, views 64/64/32, batch {cfg.data.batch_size}, "
        f"{records[-1]['step']} steps ({ctx.pretrain_epochs} epochs) on the CPU with the small-budget rule (`train.optim.budget={cfg.train.optim.budget}`, "
        f"`model.head_decorrelation={cfg.model.head_decorrelation}`): loss {first:.3f} at step "
        f"{records[0]['step']} -> {last:.3f} at step {records[-1]['step']}; the encoder's weights moved "
        f"{100 * records[-1].get('move/encoder', float('nan')):.1f} %.",
        "",
        f"![pretraining loss]({picture.name})",
        "",
    ]


def stage_probe(ctx: DemoContext) -> list[str]:
    """The object probe of the SoCo run against the same network untrained (same init, same seed)."""
    from soco_det.engine.metrics import read_metrics
    from soco_det.probe.network import load_probe_network, read_run_config
    from soco_det.probe.objects import read_objects, spec_from_config
    from soco_det.probe.probe import paired_difference, run_probe, summarise

    run = ctx.paths["pretrain"]
    cfg = read_run_config(run)
    spec = spec_from_config(cfg, ctx.probe_size)
    images = ctx.paths["scenes_images"]
    train = read_objects(ctx.paths["scenes_train"], images)
    val = read_objects(ctx.paths["scenes_val"], images, categories=train.categories)
    results = {
        name: run_probe(
            load_probe_network(src, cfg.model, cfg.seed), train, val, spec, seed=ctx.seed, copy_network=False
        )
        for name, src in (("untrained", "untrained"), ("SoCo", run))
    }
    summary = {name: summarise(r) for name, r in results.items()}
    diff = paired_difference(results["SoCo"], results["untrained"])
    last = [r for r in read_metrics(run) if "move/encoder" in r][-1]
    ctx.probe = {"summary": summary, "diff": diff, "dynamics": last}

    def cell(e: dict) -> str:
        return f"{e['mean']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"

    names = ("linear_top1", "knn_top1", "loc_r2", "retrieval_top1", "effective_rank")
    lines = [
        "## 5. Object probe: what the pretrained features know",
        "",
        f"`soco-det probe {run} untrained --train-json ... --val-json ... --images {images} --size {spec.size}`",
        "",
        f"The {len(train)} train / {len(val)} val ground-truth objects pooled by the frozen network, BN "
        f"statistics re-estimated on the probe images: the box head's output (what SoCo trains, and what "
        f"becomes the detector's box head) and the FPN RoIAlign features (2x2-pooled, on each box's level). "
        f"`untrained` is the very network the SoCo run started from (same init, seed {cfg.seed}). Bootstrap 95 % "
        "intervals over the val objects; the paired row compares the two on the same objects and resamples.",
        "",
    ]
    for kind, title in (("head", "box-head output"), ("roi", "FPN RoI features")):
        lines += ["| " + title + " | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for name, s in summary.items():
            lines.append(f"| {name} | " + " | ".join(cell(s[kind][n]) for n in names) + " |")
        lines += [
            "| SoCo - untrained (paired) | "
            + " | ".join(cell(diff[kind][n]) if n in diff[kind] else "" for n in names)
            + " |",
            "",
        ]
    head, roi = diff["head"]["linear_top1"], diff["roi"]["linear_top1"]
    lines += [
        f"Relative movement of the encoder's conv weights during pretraining: {100 * last['move/encoder']:.1f} % "
        f"(box-head effective rank {last['collapse/head_rank']:.0f} at the last step; collapse below "
        f"{last['collapse/head_rank_limit']:.0f}).",
        "",
        (
            f"SoCo's box head is ahead of the untrained one on the linear probe by {100 * head['mean']:.1f} points, "
            "with an interval that excludes 0."
            if head["ci95"][0] > 0
            else "SoCo's box head is **not** ahead of the untrained one on the linear probe in this run (the interval "
            "includes 0)."
        ),
        (
            " Its FPN RoI features are ahead too."
            if roi["ci95"][0] > 0
            else " Its FPN RoI features are not ahead of the untrained network's: at this budget SoCo teaches the head "
            "what to keep rather than giving the backbone better features (docs/results.md)."
        ),
        "",
        "What this can and cannot show: a few minutes of CPU on a few hundred synthetic scenes show that pretraining moves "
        "the weights without collapsing the features, and what a frozen probe reads from them compared with the "
        "same network untrained; they say nothing about ImageNet-scale SoCo or about detection AP after a real "
        "fine-tuning schedule. `benchmarks/transfer.py` repeats the comparison with paired pretraining seeds, "
        "image-level BYOL and fine-tuning.",
        "",
        f"**{AP_BENCHMARK}.** {AP_WHY}",
        "",
    ]
    return lines


def stage_export(ctx: DemoContext) -> list[str]:
    from soco_det import api

    lines = ["## 6. Export", "", "| format | file | fine-tuning config |", "|---|---|---|"]
    for target, name in (
        ("torchvision", "soco_torchvision.pth"),
        ("detectron2", "soco_detectron2.pkl"),
        ("mmdet", "soco_mmdet.pth"),
        ("timm", "soco_timm_backbone.pth"),
    ):
        result = api.export(ctx.paths["pretrain"], to=target, out=ctx.out / "export" / name)
        ctx.paths[f"export_{target}"] = result.path
        config = f"`{result.config}`" if result.config is not None else "-"
        lines.append(f"| {target} | `{result.path}` | {config} |")
    return lines + [
        "",
        f"`soco-det export {ctx.paths['pretrain']} --to torchvision -o ...` (each export checks the names and "
        "shapes its framework's model will find, and prints every config key the target needs; for detectron2 "
        "and mmdetection it writes that config next to the file).",
        "",
    ]


def stage_transfer(ctx: DemoContext) -> list[str]:
    """Fine-tune the same Mask R-CNN from the untrained network and from the SoCo export; evaluate both."""
    import os

    import torch

    from soco_det import api
    from soco_det.engine.metrics import read_metrics
    from soco_det.export.untrained import save_untrained
    from soco_det.models.maskrcnn import widths_of
    from soco_det.plots import metric_curve, plot_curves
    from soco_det.probe.network import read_run_config
    from soco_det.transfer.model import read_weights

    torch.set_num_threads(os.cpu_count() or 1)
    export = ctx.paths["export_torchvision"]
    # "random" is the network SoCo started from (same architecture, init scheme and seed), untrained.
    untrained = api.export(
        save_untrained(read_run_config(ctx.paths["pretrain"]), ctx.out / "untrained.pt"),
        to="torchvision",
        out=ctx.out / "export" / "untrained_torchvision.pth",
    ).path
    # One architecture for both inits: the FPN / box-head widths of the (tiny) SoCo export.
    widths = {k: list(v) if isinstance(v, tuple) else v for k, v in widths_of(read_weights(export)).items()}
    data = {
        "train_json": str(ctx.paths["scenes_train"]),
        "train_images": str(ctx.paths["scenes_images"]),
        "val_json": str(ctx.paths["scenes_val"]),
        "val_images": str(ctx.paths["scenes_images"]),
    }
    iters = ctx.finetune_iters
    overrides = {
        "solver.iterations": iters,
        "solver.steps": [int(iters * 0.75)],
        "solver.warmup_iters": max(1, iters // 10),
        "seed": ctx.seed,
        "log_period": 5,
        "data.max_val_images": ctx.finetune_val_images,
        "model.score_thresh": 0.001,  # keep the low-score detections of a short run for COCO AP
        "model.depth": 18,
        **{f"model.{k}": v for k, v in widths.items()},
    }
    rows, curves = [], {}
    for name, init in (("untrained", untrained), ("SoCo", export)):
        result = api.finetune(
            ctx.out / f"finetune_{name.lower()}",
            init=init,
            recipe="finetune_tiny_cpu",
            overrides=overrides,
            resume=True,
            device="cpu",
            **data,
        )
        rows.append((name, result.metrics))
        curves[name] = metric_curve(read_metrics(result.path), "loss", x_key="iter")
    picture = plot_curves(
        curves, ctx.out / "finetune_loss.png", title="Mask R-CNN fine-tuning loss", xlabel="iteration"
    )
    return _transfer_report(ctx, rows, picture.name)


def _transfer_report(ctx: DemoContext, rows: list[tuple[str, dict]], picture: str) -> list[str]:
    """The report's fine-tuning section: the COCO APs of each init, the loss curves."""

    def pct(v: float | None) -> str:
        return "-" if v is None or v < 0 else f"{100 * v:.2f}"

    iters = ctx.finetune_iters
    lines = [
        "## 7. Fine-tuning and COCO evaluation",
        "",
        f"Mask R-CNN v2 (ResNet-18 FPN, the SoCo export's widths), {iters} iterations on the {ctx.n_train} "
        f"labeled scenes from the untrained network (the one SoCo started from) and from SoCo, evaluated on "
        f"{ctx.finetune_val_images} val scenes with pycocotools (`soco-det finetune ... --init export.pth`).",
        "",
        "| init | box AP | AP50 | AP75 | mask AP | AP50 | AP75 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        b, sg = m["bbox"], m["segm"]
        lines.append(
            f"| {name} | {pct(b['AP'])} | {pct(b['AP50'])} | {pct(b['AP75'])} | "
            f"{pct(sg['AP'])} | {pct(sg['AP50'])} | {pct(sg['AP75'])} |"
        )
    return lines + [
        "",
        f"{iters} iterations cannot train a detector: these APs (near 0) show that the pipeline works end to "
        "end, not what SoCo is worth to a detector, and they rank nothing. "
        f"{AP_BENCHMARK}: paired fine-tuning seeds, long enough that AP is off the floor.",
        "",
        "The untrained start is reachable from the command line: `soco-det finetune ... --init "
        f"untrained:{ctx.paths.get('pretrain', 'RUN')}` fine-tunes from the network that pretraining run started "
        "from (same init scheme and seed).",
        "",
        f"![fine-tuning loss]({picture})",
        "",
    ]


STAGES: list[tuple[str, Callable[[DemoContext], list[str]]]] = [
    ("scenes", stage_scenes),
    ("proposals", stage_proposals),
    ("views", stage_views),
    ("pretrain", stage_pretrain),
    ("probe", stage_probe),
    ("export", stage_export),
    ("transfer", stage_transfer),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", default="demo_out", help="output folder (report.md and every stage's files)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample scenes and of every stage")
    parser.add_argument("--unlabeled", type=int, default=600, help="unlabeled scenes (pretraining)")
    parser.add_argument("--train", type=int, default=300, help="labeled scenes (probe and fine-tuning)")
    parser.add_argument("--val", type=int, default=200, help="validation scenes (probe)")
    parser.add_argument("--size", type=int, default=128, help="short side of the scenes in pixels")
    parser.add_argument("--pretrain-epochs", type=int, default=6, help="SoCo pretraining epochs (tiny_cpu recipe)")
    parser.add_argument("--finetune-iters", type=int, default=20, help="Mask R-CNN fine-tuning iterations per init")


def run(args: argparse.Namespace) -> int:
    ctx = DemoContext(
        out=Path(args.out),
        seed=args.seed,
        n_unlabeled=args.unlabeled,
        n_train=args.train,
        n_val=args.val,
        short_side=args.size,
        pretrain_epochs=args.pretrain_epochs,
        finetune_iters=args.finetune_iters,
    )
    ctx.out.mkdir(parents=True, exist_ok=True)
    report = ["# soco-det demo report", "", "Every stage of the pipeline on generated sample scenes, on CPU.", ""]
    for name, stage in STAGES:
        log.info("demo stage: %s", name)
        t0 = time.perf_counter()
        report += stage(ctx)
        ctx.timings[name] = time.perf_counter() - t0
        log.info("demo stage %s done in %.1f s", name, ctx.timings[name])
    report += ["## Timings", "", "| stage | seconds |", "|---|---|"]
    report += [f"| {name} | {secs:.1f} |" for name, secs in ctx.timings.items()]
    atomic_write_text(ctx.out / "report.md", "\n".join(report) + "\n")
    log.info("report written to %s", ctx.out / "report.md")
    print(ctx.out / "report.md")
    return 0
