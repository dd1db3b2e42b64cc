"""The Python API (``soco_det.api``): the README's example runs as written, and the tiny pipeline goes
through it end to end (proposals, pretraining, export, fine-tuning, evaluation, probe) on generated
scenes, each verb returning its result object; importing the API loads no torch."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from soco_det import api

REPO = Path(__file__).resolve().parents[1]

# pycocotools 2.0 with NumPy 2 warns on every mask decode; it is harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The example of README.md, "Python API", exactly as printed there.
README_EXAMPLE = """
from soco_det import api

store = api.proposals("imgs/", "runs/props")
run = api.pretrain("imgs/", store.path, "runs/soco", recipe="tiny_cpu", overrides={"train.loop.epochs": 3})
api.export(run.path, to="torchvision", out="soco_tv.pth")
"""

# A few iterations of a small Mask R-CNN on the 96 px scenes (the widths come from the export).
FINETUNE = {
    "solver.iterations": 4,
    "solver.steps": [3],
    "solver.warmup_iters": 1,
    "solver.batch_size": 2,
    "model.roi_batch_size": 16,
    "model.rpn_batch_size": 32,
    "model.detections_per_img": 10,
    # off: PreciseBN re-estimates BN statistics after the last checkpoint is written, so evaluating that
    # checkpoint would not give the run's metrics.json
    "model.precise_bn_images": 0,
    "input.min_size_train": [96],
    "input.max_size_train": 128,
    "input.min_size_test": 96,
    "input.max_size_test": 128,
    "data.num_workers": 0,
    "log_period": 2,
    "checkpoint_period": 4,
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The README example run in a fresh working folder holding ``imgs/`` (16 generated scenes)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("api")
    scenes = api.synth(root / "scenes", unlabeled=16, train=6, val=3, size=96, seed=1)
    shutil.copytree(scenes.images / "unlabeled", root / "work" / "imgs")
    cwd = os.getcwd()
    os.chdir(root / "work")
    try:
        namespace: dict = {}
        exec(compile(README_EXAMPLE, "README.md", "exec"), namespace)  # noqa: S102 - the documented example
    finally:
        os.chdir(cwd)
    return root / "work", scenes, namespace


def test_the_readme_example_runs_and_returns_paths(pipeline):
    work, _, ns = pipeline
    store, run = ns["store"], ns["run"]
    assert isinstance(store, api.ProposalsResult) and isinstance(run, api.PretrainResult)
    assert store.path == Path("runs/props") and store.summary["images"] == 16
    assert run.path == Path("runs/soco") and (work / run.checkpoint).is_file()
    assert run.metrics["step"] == 3 and math.isfinite(run.metrics["loss"])
    cfg = yaml.safe_load((work / run.config).read_text())
    # the resolved config holds absolute paths, whatever the working folder was
    assert cfg["data"]["images"] == str(work / "imgs") and cfg["data"]["proposals"] == str(work / "runs" / "props")
    assert cfg["train"]["loop"]["epochs"] == 3 and cfg["model"]["depth"] == 18
    exported = torch.load(work / "soco_tv.pth", weights_only=True)
    assert exported["backbone.fpn.inner_blocks.0.0.weight"].shape[0] == 64  # the tiny_cpu FPN


def test_finetune_evaluate_and_probe_through_the_api(pipeline, tmp_path):
    work, scenes, ns = pipeline
    tv = api.export(work / ns["run"].path, to="torchvision", out=tmp_path / "tv.pth")
    assert isinstance(tv, api.ExportResult) and tv.config is None and tv.settings["fpn_channels"] == 64
    data = dict(train_json=scenes.train, train_images=scenes.images, val_json=scenes.val, val_images=scenes.images)
    ft = api.finetune(
        tmp_path / "ft", init=tv.path, recipe="finetune_tiny_cpu", overrides=FINETUNE, device="cpu", **data
    )
    assert isinstance(ft, api.FinetuneResult) and ft.checkpoint.is_file()
    assert ft.metrics["num_images"] == 3 and set(ft.metrics) == {"bbox", "segm", "num_images"}
    saved = yaml.safe_load((ft.path / "config.yaml").read_text())
    assert saved["model"]["init"] == str(tv.path) and saved["model"]["fpn_channels"] == 64

    ev = api.evaluate(ft.path, json=scenes.val, images=scenes.images, out=tmp_path / "eval", device="cpu")
    assert isinstance(ev, api.EvaluateResult) and ev.metrics["bbox"] == ft.metrics["bbox"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 3

    pr = api.probe(
        [work / ns["run"].path, "untrained"],
        train_json=scenes.train,
        val_json=scenes.val,
        images=scenes.images,
        out=tmp_path / "probe.json",
        tasks=["linear", "rank"],
        resamples=20,
        device="cpu",
    )
    assert isinstance(pr, api.ProbeResult) and pr.path.is_file()
    assert list(pr.report["results"]) == [str(work / ns["run"].path), "untrained"]
    assert json.loads(pr.path.read_text())["paired"] == json.loads(json.dumps(pr.report["paired"]))


def test_a_resumed_finetune_reads_the_runs_config(pipeline, tmp_path):
    """``resume=True`` without a recipe continues from the run folder's config.yaml, as the CLI's --resume."""
    work, scenes, ns = pipeline
    data = dict(train_json=scenes.train, train_images=scenes.images, val_json=scenes.val, val_images=scenes.images)
    overrides = {**FINETUNE, "solver.iterations": 2, "solver.steps": [1], "checkpoint_period": 2}
    first = api.finetune(tmp_path / "ft", init="random", recipe="finetune_tiny_cpu", overrides=overrides, **data)
    again = api.finetune(tmp_path / "ft", resume=True, overrides={"solver.iterations": 3, "solver.steps": [1]})
    assert torch.load(again.checkpoint, weights_only=True)["step"] == 3
    assert yaml.safe_load((first.path / "config.yaml").read_text())["solver"]["iterations"] == 3


def test_overrides_as_a_mapping_or_as_cli_strings():
    assert api.override_strings(
        {"train.loop.epochs": 1, "data.views.geometry.view_sizes": [64, 64, 32], "model.init": "a b"}
    ) == [
        "train.loop.epochs=1",
        "data.views.geometry.view_sizes=[64, 64, 32]",
        'model.init="a b"',
    ]
    assert api.override_strings(["train.loop.epochs=1"]) == ["train.loop.epochs=1"] and api.override_strings(None) == []
    cfg = api.pretrain_config(None, None, overrides={"train.loop.amp": "none", "model.init": "w.pth", "seed": 7})
    assert cfg.train.loop.amp == "none" and cfg.seed == 7
    assert cfg.model.init == os.path.abspath("w.pth")  # stored absolute, like the data paths


def test_importing_the_api_loads_no_torch():
    code = "import sys, soco_det.api; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_the_negative_pretraining_loss_is_explained(capsys):
    from soco_det.commands.main import main

    tiny = api.describe_loss(api.pretrain_config(None, None, recipe="tiny_cpu"))
    assert tiny.startswith("loss = 4 terms -2 cos") and "(V1<->V2, V1<->V3, each way)" in tiny
    assert "in [-2, 2]" in tiny and "-8 = all matched boxes agree" in tiny and "decorrelation" in tiny
    c4 = api.describe_loss(api.pretrain_config(None, None, recipe="soco_c4_r50_100ep"))
    assert "2 terms" in c4 and "-4 = all matched boxes agree" in c4 and "decorrelation" not in c4
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "negative by design" in capsys.readouterr().out
