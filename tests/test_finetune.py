"""Mask R-CNN fine-tuning on the sample scenes: a 20-iteration CPU run through the CLI, exact resume,
init from a SoCo export and from ResNet weights, schedule, sampler, transforms and bad input."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from soco_det.commands.main import main
from soco_det.config import build_config
from soco_det.errors import UserError
from soco_det.models.maskrcnn import build_maskrcnn
from soco_det.transfer import FinetuneConfig, finetune
from soco_det.transfer.coco_data import CocoInstances, TrainingSampler, hflip, resize
from soco_det.transfer.config import SolverConfig, resolve_schedule
from soco_det.transfer.finetuning import lr_factor
from soco_det.transfer.model import load_init

# pycocotools 2.0 with NumPy 2 warns on every mask decode; it is harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ITERS = 20

# A small Mask R-CNN v2 on ~128 px scenes: narrow FPN/box head (the widths of the tiny_cpu SoCo
# recipe) and few sampled RoIs keep it cheap on CPU.
TINY = [
    "model.fpn_channels=64",
    "model.box_conv_dims=[64,64,64,64]",
    "model.box_fc_dims=[256]",
    "solver.iterations=20",
    "solver.steps=[15]",
    "solver.warmup_iters=5",
    "solver.batch_size=2",
    "model.roi_batch_size=16",
    "model.rpn_batch_size=64",
    "model.detections_per_img=10",
    "input.min_size_train=[112,128]",
    "input.max_size_train=200",
    "input.min_size_test=128",
    "input.max_size_test=200",
    "data.num_workers=0",
    "checkpoint_period=5",
    "log_period=5",
]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    import soco_det.synth as synth

    return synth.generate(tmp_path_factory.mktemp("scenes"), n_unlabeled=0, n_train=6, n_val=2, short_side=112, seed=3)


def _data_args(scenes, train=None, val=None):
    """The four data flags of `soco-det finetune` for the scenes (``train``/``val``: other COCO files)."""
    return [
        "--train-json",
        str(train or scenes["train"]),
        "--train-images",
        str(scenes["images"]),
        "--val-json",
        str(val or scenes["val"]),
        "--val-images",
        str(scenes["images"]),
    ]


def tiny_finetune_argv(scenes, out, *overrides, train=None, val=None):
    """`soco-det finetune` of a small Mask R-CNN (``finetune_tiny_cpu`` + :data:`TINY` + ``overrides``,
    the later ones winning) from random init on the CPU."""
    return [
        "finetune",
        *_data_args(scenes, train, val),
        "--init",
        "random",
        "-o",
        str(out),
        "--recipe",
        "finetune_tiny_cpu",
        "--device",
        "cpu",
        *TINY,
        *overrides,
    ]


@pytest.fixture(scope="module")
def run_dir(scenes, tmp_path_factory):
    """20 iterations of a ResNet-18 Mask R-CNN v2 from random init, through `soco-det finetune`."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ft") / "run"
    assert main(tiny_finetune_argv(scenes, out)) == 0
    return out


def test_finetune_writes_checkpoints_metrics_and_finite_losses(run_dir):
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["last.pt", "step_00000010.pt", "step_00000015.pt", "step_00000020.pt"]  # 3 kept
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == [5, 10, 15, 20]
    for r in train:
        for key in ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
    # Warmup then step decay, as logged: full LR after warmup (0.02 at batch 16, scaled linearly to
    # the batch of 2: 0.0025), x0.1 after the step at 15.
    assert train[1]["lr"] == pytest.approx(0.0025) and train[3]["lr"] == pytest.approx(0.00025)
    final = json.loads((run_dir / "metrics.json").read_text())
    assert final["num_images"] == 2 and set(final["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert any(r.get("iter") == ITERS and "segm" in r for r in records)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model"]["depth"] == 18 and cfg["solver"]["weight_decay"] == 2.5e-5
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["kind"] == "maskrcnn" and ckpt["step"] == ITERS and ckpt["cat_ids"] == list(range(1, 11))
    assert (run_dir / "loss.png").stat().st_size > 0


def test_a_finetuning_run_has_tensorboard_with_loss_ap_config_and_a_picture(run_dir):
    from engine_fixtures import read_tensorboard

    events = read_tensorboard(run_dir / "tensorboard")
    scalars = events["scalars"]
    assert [step for step, _ in scalars["loss"]] == [5, 10, 15, 20]
    assert {"loss_mask", "lr", "img_per_s", "time/data_wait", "time/step", "bbox/AP", "segm/AP50"} <= set(scalars)
    final = json.loads((run_dir / "metrics.json").read_text())
    assert scalars["bbox/AP"] == [(ITERS, pytest.approx(final["bbox"]["AP"]))]
    assert events["text"]["eval/AP"].startswith("| type | AP | AP50 |") and "| segm |" in events["text"]["eval/AP"]
    assert "precise_bn_images: 64" in events["text"]["config"]
    assert events["images"] == ["data/train_samples"] and (run_dir / "train_samples.png").stat().st_size > 0
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["time/data_wait"] < r["time/step"] for r in train if "loss" in r)


def test_finetune_command_logs_to_wandb_offline_and_mlflow(scenes, tmp_path, monkeypatch):
    """`soco-det finetune ... logging.backends=[wandb,mlflow]`: W&B's offline run files and an MLflow
    file store in the run folder, with the loss and the AP; no TensorBoard (not listed)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "ft"
    argv = tiny_finetune_argv(
        scenes,
        out,
        "solver.iterations=2",
        "solver.steps=[]",
        "solver.warmup_iters=1",
        "log_period=1",
        "model.precise_bn_images=0",
        "logging.backends=[wandb,mlflow]",
        "logging.wandb_mode=offline",
    )
    assert main(argv) == 0
    ids = json.loads((out / "tracking.json").read_text())
    assert (out / "wandb" / "latest-run" / f"run-{ids['wandb']}.wandb").is_file()
    assert not (out / "tensorboard").exists()
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "ft" and run.data.params["solver.iterations"] == "2"
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")] == [1, 2]
    final = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["bbox/AP"] == pytest.approx(final["bbox"]["AP"])


def test_precise_bn_uses_at_most_the_training_set_and_says_so(scenes, tmp_path, monkeypatch, caplog):
    """6 training images and model.precise_bn_images=64 (finetune_tiny_cpu): 6 images, one log line."""
    from soco_det.transfer import finetuning

    real, asked = finetuning.precise_bn, []

    def record(model, batches, n_images, device):
        asked.append(n_images)
        return real(model, batches, n_images, device)

    monkeypatch.setattr(finetuning, "precise_bn", record)
    cfg = tiny_finetune_config(
        scenes, "solver.iterations=2", "solver.steps=[]", "solver.warmup_iters=1", "checkpoint_period=0", "log_period=1"
    )
    assert cfg.model.precise_bn_images == 64
    with caplog.at_level(logging.INFO, logger="soco_det"):
        finetune(cfg, tmp_path / "ft")
    assert asked == [6]
    lines = [r.getMessage() for r in caplog.records if "precise_bn_images" in r.getMessage()]
    assert lines == ["precise BN: model.precise_bn_images=64 is more than the 6 training images; using 6"]


def test_resume_continues_from_saved_iteration_and_matches(run_dir, tmp_path):
    """Drop the last checkpoint: resuming from step 15 must redo iterations 16-20 exactly."""
    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    (resumed / "checkpoints" / "step_00000020.pt").unlink()
    (resumed / "checkpoints" / "last.pt").unlink()
    cfg = build_config(FinetuneConfig, resumed / "config.yaml")
    finetune(cfg, resumed, resume=True)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [5, 10, 15, 20]  # no duplicates
    original = torch.load(run_dir / "checkpoints" / "step_00000020.pt", weights_only=True)
    again = torch.load(resumed / "checkpoints" / "step_00000020.pt", weights_only=True)
    assert again["step"] == ITERS
    for key, value in original["model"].items():
        torch.testing.assert_close(again["model"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_fresh_run_refuses_used_folder(run_dir):
    cfg = build_config(FinetuneConfig, run_dir / "config.yaml")
    with pytest.raises(UserError, match="already holds the checkpoints of a run.*--overwrite"):
        finetune(cfg, run_dir)


def test_evaluate_cli_reproduces_final_metrics(run_dir, scenes, tmp_path):
    assert (
        main(
            [
                "evaluate",
                str(run_dir),
                "--json",
                str(scenes["val"]),
                "--images",
                str(scenes["images"]),
                "-o",
                str(tmp_path),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ours = json.loads((tmp_path / "metrics.json").read_text())
    assert ours == json.loads((run_dir / "metrics.json").read_text())


def test_missing_image_gives_clear_cli_error(scenes, tmp_path, capsys):
    data = json.loads(scenes["train"].read_text())
    data["images"][1]["file_name"] = "train/not_there.jpg"
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps(data))
    argv = [
        "finetune",
        *_data_args(scenes, train=bad),
        "-o",
        str(tmp_path / "run"),
        "--recipe",
        "finetune_tiny_cpu",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not_there.jpg: image file not found" in err and str(bad) in err


def _soco_checkpoint(tmp_path, variant="soco_fpn"):
    from soco_det.engine.checkpoint import save_checkpoint
    from soco_det.models import ModelConfig, build_model

    model_cfg = ModelConfig(variant=variant, depth=18)
    model = build_model(model_cfg)
    save_checkpoint(
        tmp_path / "pre",
        {"model": model.state_dict(), "step": 1, "config": {"model": {"variant": variant, "depth": 18}}},
    )
    return model


def test_init_from_export_leaves_exactly_rpn_predictor_and_mask_branch(tmp_path):
    from soco_det.export import export_checkpoint

    soco = _soco_checkpoint(tmp_path)
    exported = export_checkpoint(tmp_path / "pre", "torchvision", tmp_path / "tv.pth")
    model = build_maskrcnn(18, num_classes=4)
    missing = load_init(model, exported)
    new_parts = ("rpn.", "roi_heads.box_predictor.", "roi_heads.mask_head.", "roi_heads.mask_predictor.")
    assert set(missing) == {
        k for k in model.state_dict() if k.startswith(new_parts) and not k.endswith("num_batches_tracked")
    }
    state = model.state_dict()
    torch.testing.assert_close(state["backbone.body.layer3.1.conv2.weight"], soco.online.encoder.layer3[1].conv2.weight)
    torch.testing.assert_close(state["roi_heads.box_head.5.weight"], soco.online.head.fc1.weight)


def test_init_from_a_run_folder_or_checkpoint_equals_init_from_its_export(tmp_path):
    """``--init RUN`` (or its checkpoint file) exports in memory: the same tensors land in the same
    places as with ``soco-det export --to torchvision`` first, and the same parts stay random."""
    from soco_det.export import export_checkpoint

    _soco_checkpoint(tmp_path)
    exported = export_checkpoint(tmp_path / "pre", "torchvision", tmp_path / "tv.pth")
    via_export = build_maskrcnn(18, num_classes=4)
    missing = load_init(via_export, exported)
    for source in (tmp_path / "pre", tmp_path / "pre" / "checkpoints" / "last.pt"):
        model = build_maskrcnn(18, num_classes=4)
        assert load_init(model, source) == missing
        loaded = {k: v for k, v in model.state_dict().items() if k not in missing}
        assert len(loaded) > 150  # ResNet-18 trunk, FPN and box head
        for key, value in loaded.items():
            torch.testing.assert_close(value, via_export.state_dict()[key], rtol=0, atol=0, msg=key)


def test_init_from_resnet_weights_loads_backbone_only(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_maskrcnn(18, num_classes=3)
    missing = load_init(model, tmp_path / "resnet18.pth")
    assert not any(k.startswith("backbone.body.") for k in missing)
    assert any(k.startswith("backbone.fpn.") for k in missing) and any(
        k.startswith("roi_heads.box_head.") for k in missing
    )
    torch.testing.assert_close(model.state_dict()["backbone.body.conv1.weight"], resnet.conv1.weight)
    with pytest.raises(UserError, match=r"missing but expected to load backbone\.body\.layer1\.2\."):
        load_init(build_maskrcnn(34, num_classes=3), tmp_path / "resnet18.pth")  # wrong depth is caught


def test_lr_schedule_warmup_and_steps():
    solver = SolverConfig(iterations=100, steps=[60, 80], warmup_iters=10, warmup_factor=0.001, gamma=0.1)
    assert lr_factor(0, solver) == pytest.approx(0.001)
    assert lr_factor(5, solver) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [lr_factor(i, solver) for i in (10, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_schedule_preset_scales_with_dataset_size():
    solver = resolve_schedule(SolverConfig(schedule="1x", batch_size=16), 117266)
    assert (solver.iterations, solver.steps, solver.warmup_iters) == (90000, [60000, 80000], 1000)
    small = resolve_schedule(SolverConfig(schedule="1x", batch_size=4), 100)
    assert small.iterations == round(90000 * 16 / 117266 * 100 / 4) and small.steps == [
        round(small.iterations * 2 / 3),
        round(small.iterations * 8 / 9),
    ]


def test_sampler_resumes_exactly_and_shards_disjointly():
    full = TrainingSampler(7, batch_size=2, world_size=1, seed=5)
    stream = [k for _, k in zip(range(40), iter(full))]
    resumed = TrainingSampler(7, batch_size=2, world_size=1, seed=5, start_iter=6)
    assert [k for _, k in zip(range(28), iter(resumed))] == stream[12:]
    ranks = [TrainingSampler(7, batch_size=2, rank=r, world_size=2, seed=5) for r in (0, 1)]
    a, b = ([k for _, k in zip(range(6), iter(s))] for s in ranks)
    assert a[:2] + b[:2] + a[2:4] + b[2:4] == stream[:8]
    assert sorted(i for i, e in stream[:7]) == list(range(7))  # one epoch = a permutation


def test_train_transforms_keep_boxes_on_masks(scenes):
    dataset = CocoInstances(scenes["train"], scenes["images"], train=True, min_sizes=[80, 150], max_size=300)
    for index in range(3):
        image = dataset.load_image(index)
        target = dataset.target(index)
        for op in (lambda i, t: resize(i, t, (150, 97)), hflip):
            out_image, out = op(image, target)
            assert out["masks"].shape[-2:] == (out_image.size[1], out_image.size[0])
            for box, mask in zip(out["boxes"], out["masks"]):
                ys, xs = np.nonzero(mask.numpy())
                extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
                torch.testing.assert_close(box, extent, atol=2.0, rtol=0)  # nearest-neighbour masks: ~1 px
    image, target = dataset[(0, 3)]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and min(image.shape[1:]) in (80, 150)
    assert target["labels"].min() >= 1 and target["labels"].max() <= 10


def test_precise_bn_averages_statistics_over_images_and_keeps_the_rng():
    from soco_det.transfer.config import SolverConfig
    from soco_det.transfer.finetuning import freeze_batch_norm, peak_lr, precise_bn

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, images, targets):
            return self.bn(torch.stack(images))

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(3, 4, 4, generator=g) * (i + 1) + i for i in range(8)]
    batches = iter([(data[i : i + 2], [{}, {}]) for i in range(0, 8, 2)])
    model = Toy().train()
    model.bn.running_mean.fill_(5.0)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    assert precise_bn(model, batches, 8, torch.device("cpu")) == 8
    torch.testing.assert_close(torch.rand(3), expected_next)  # the RNG is restored
    stacked = torch.stack(data)
    torch.testing.assert_close(model.bn.running_mean, stacked.mean(dim=(0, 2, 3)))
    assert model.bn.momentum == 0.1  # restored
    freeze_batch_norm(model)
    assert not model.bn.training and not model.bn.weight.requires_grad
    assert peak_lr(SolverConfig(base_lr=0.02, batch_size=4)) == pytest.approx(0.005)
    assert peak_lr(SolverConfig(base_lr=0.02, batch_size=4, lr_scaling="none")) == pytest.approx(0.02)


# ------------------------------------------------------------------ on the engine's loop


def tiny_finetune_config(scenes, *overrides):
    """``finetune_tiny_cpu`` with :data:`TINY` and ``overrides`` on the scenes of ``synth.generate``, from random init on CPU."""
    extra = {
        "data": {
            "train_json": str(scenes["train"]),
            "train_images": str(scenes["images"]),
            "val_json": str(scenes["val"]),
            "val_images": str(scenes["images"]),
        },
        "model": {"init": "random"},
        "device": "cpu",
    }
    return build_config(FinetuneConfig, "finetune_tiny_cpu", [*TINY, *overrides], extra=extra)


def test_a_non_finite_loss_stops_the_run_before_it_is_saved_and_overwrite_starts_over(scenes, tmp_path, monkeypatch):
    """The engine's check: the NaN of step 3 is noticed at the next checkpoint (step 4), which is not
    written; the last good checkpoint (step 2) is named. A fresh run refuses that folder, and with
    ``overwrite`` moves the old run aside, as pretraining does."""
    from soco_det.engine.loop import NonFiniteLossError
    from soco_det.transfer.finetuning import FinetuneTrainer

    real_step = FinetuneTrainer.run_step

    def nan_at_step_3(self, batch):
        if self.step != 2:
            return real_step(self, batch)
        model = self.forward_model
        self.forward_model = lambda images, targets: {k: v * math.nan for k, v in model(images, targets).items()}
        try:
            return real_step(self, batch)
        finally:
            self.forward_model = model

    monkeypatch.setattr(FinetuneTrainer, "run_step", nan_at_step_3)
    run = tmp_path / "ft"
    cfg = tiny_finetune_config(
        scenes,
        "solver.iterations=6",
        "solver.steps=[5]",
        "solver.warmup_iters=1",
        "checkpoint_period=2",
        "log_period=5",
    )
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3 .*last good checkpoint: .*last\.pt"
    ):
        finetune(cfg, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_00000002.pt"]
    monkeypatch.undo()

    again = tiny_finetune_config(
        scenes, "solver.iterations=2", "solver.steps=[]", "solver.warmup_iters=1", "checkpoint_period=0", "log_period=1"
    )
    with pytest.raises(UserError, match="already holds the checkpoints"):
        finetune(again, run)
    finetune(again, run, overwrite=True)
    (aside,) = tmp_path.glob("ft.old-*")
    assert (aside / "checkpoints" / "step_00000002.pt").is_file()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
    assert [r["iter"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [
        1,
        2,
    ]


def test_frozen_batch_norm_stays_frozen_across_evaluations(scenes, tmp_path, monkeypatch):
    """An evaluation hook in the middle of the run (with PreciseBN) hands training back with the
    BN layers as bn_mode says: frozen ones in eval mode, their statistics unchanged."""
    from soco_det.transfer.finetuning import FinetuneTrainer, batch_norms

    real_step, seen = FinetuneTrainer.run_step, []

    def record_bn_modes(self, batch):
        seen.append((self.step, {bn.training for bn in batch_norms(self.model)}))
        return real_step(self, batch)

    monkeypatch.setattr(FinetuneTrainer, "run_step", record_bn_modes)
    cfg = tiny_finetune_config(
        scenes,
        "solver.iterations=3",
        "solver.steps=[]",
        "solver.warmup_iters=1",
        "eval_period=1",
        "model.bn_mode=frozen",
        "checkpoint_period=0",
        "log_period=1",
    )
    run = finetune(cfg, tmp_path / "ft")
    assert seen == [(0, {False}), (1, {False}), (2, {False})]
    evaluated = [r["iter"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "bbox" in r]
    assert evaluated == [1, 2, 3]


NAN_ON_RANK_1 = """
import os, sys
from soco_det.transfer import finetuning

real_step = finetuning.FinetuneTrainer.run_step


def run_step(self, batch):
    if self.step != 1 or os.environ["RANK"] != "1":
        return real_step(self, batch)
    model = self.forward_model
    self.forward_model = lambda images, targets: {k: v * float("nan") for k, v in model(images, targets).items()}
    try:
        return real_step(self, batch)
    finally:
        self.forward_model = model


finetuning.FinetuneTrainer.run_step = run_step
from soco_det.commands.main import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_of_a_ddp_run(scenes, tmp_path):
    """Two processes under torchrun (gloo): the NaN of process 1 at step 2 stops both, with the
    same error, where a per-process check would leave process 0 waiting in the next all-reduce."""
    from engine_fixtures import REPO
    from test_ddp import free_port, worker_errors

    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    run = tmp_path / "ft"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *tiny_finetune_argv(scenes, run, "checkpoint_period=1", "log_period=1"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "non-finite loss (nan) at step 2" in line]
    assert len(errors) == 2, worker_errors(proc.stderr)  # one line per process
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_00000001.pt"]


def test_no_loader_worker_outlives_the_run(scenes, tmp_path):
    """The loader workers ignore SIGTERM (a stop signal is the main process's to handle), so one
    left to garbage collection can block the interpreter's exit: the loop ends them itself. With
    the collector off, nothing else would."""
    import gc
    import multiprocessing

    cfg = tiny_finetune_config(
        scenes, "solver.iterations=2", "solver.steps=[]", "solver.warmup_iters=1", "data.num_workers=1", "log_period=1"
    )
    gc.disable()
    try:
        finetune(cfg, tmp_path / "ft")
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("old", "amp"),
    [
        ({"amp": True, "amp_dtype": "float16"}, "fp16"),
        ({"amp": True, "amp_dtype": "bfloat16"}, "bf16"),
        ({"amp": False, "amp_dtype": "float16"}, "none"),
        ({"amp": True}, "fp16"),
    ],
)
def test_a_config_of_the_older_amp_keys_still_loads(tmp_path, old, amp):
    """A run folder's config.yaml from before ``amp`` became ``auto|bf16|fp16|none`` (resume reads it)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    assert build_config(FinetuneConfig, path).amp == amp
    assert build_config(FinetuneConfig, path, ["amp=none"]).amp == "none"  # a new override wins
