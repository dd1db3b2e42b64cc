"""Run the whole pipeline on generated sample scenes, on CPU, and write a report.

Stages (each one's outputs land in a sub-folder of ``-o``): sample scenes -> report.md with a
picture of scenes and their boxes. Later stages are added here as the pipeline grows; each stage
is a function ``stage_*(ctx) -> list[str]`` returning the Markdown lines it adds to the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Callable

from soco_det.atomic import atomic_write_text
from soco_det.logs import get_logger

log = get_logger(__name__)


@dataclasses.dataclass
class DemoContext:
    """What the stages share: the output folder, sizes, and the paths earlier stages produced."""

    out: Path
    seed: int = 0
    n_unlabeled: int = 200
    n_train: int = 60
    n_val: int = 30
    short_side: int = 256
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def stage_scenes(ctx: DemoContext) -> list[str]:
    from soco_det.synth import generate, render_scenes

    data = ctx.out / "scenes"
    paths = generate(
        data,
        n_unlabeled=ctx.n_unlabeled,
        n_train=ctx.n_train,
        n_val=ctx.n_val,
        short_side=ctx.short_side,
        seed=ctx.seed,
    )
    ctx.paths.update({f"scenes_{k}": Path(v) for k, v in paths.items()})
    picture = ctx.out / "scenes.png"
    render_scenes(paths["train"], paths["images"], picture, n=6)
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
    import json

    from soco_det.proposals import compute_store
    from soco_det.proposals.store import format_summary

    images = ctx.paths["scenes_images"] / "unlabeled"
    store = compute_store(images, ctx.out / "proposals", workers=1)
    ctx.paths["proposals"] = store
    summary = json.loads((store / "summary.json").read_text())
    return [
        "## 2. Selective-search proposals",
        "",
        f"`soco-det proposals {images} -o {store}` (the faithful selective search, scale 300, sigma 0.9, "
        "min_size 100, filter `ratio3size0308post`)",
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


STAGES: list[tuple[str, Callable[[DemoContext], list[str]]]] = [
    ("scenes", stage_scenes),
    ("proposals", stage_proposals),
    ("views", stage_views),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", default="demo_out", help="output folder (report.md and every stage's files)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample scenes and of every stage")
    parser.add_argument("--unlabeled", type=int, default=200, help="unlabeled scenes (pretraining)")
    parser.add_argument("--train", type=int, default=60, help="labeled scenes (fine-tuning)")
    parser.add_argument("--val", type=int, default=30, help="validation scenes")


def run(args: argparse.Namespace) -> int:
    ctx = DemoContext(
        out=Path(args.out), seed=args.seed, n_unlabeled=args.unlabeled, n_train=args.train, n_val=args.val
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
