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


STAGES: list[tuple[str, Callable[[DemoContext], list[str]]]] = [
    ("scenes", stage_scenes),
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
