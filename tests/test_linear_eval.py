"""Linear evaluation: frozen backbone, linear classifier on pooled C5, ImageFolder of scene crops.

The ImageFolder is made from the sample scenes: each annotated object's box, cropped, filed under
its class. The backbone is a torchvision ResNet-18 with random weights saved by the test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from soco_det.errors import UserError
from soco_det.probe import linear_eval as le
from soco_det.probe.config import LinearEvalSettings

CLASSES = (1, 2, 4)  # the three most frequent shapes of these scenes


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    from soco_det.synth import generate

    base = tmp_path_factory.mktemp("linear")
    paths = generate(base / "scenes", n_unlabeled=0, n_train=30, n_val=10, short_side=96, seed=1)
    out = {}
    for split in ("train", "val"):
        data = json.loads(Path(paths[split]).read_text())
        names = {c["id"]: c["name"] for c in data["categories"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
        for ann in data["annotations"]:
            if ann["category_id"] not in CLASSES:
                continue
            x, y, w, h = ann["bbox"]
            img = Image.open(paths["images"] / files[ann["image_id"]]).convert("RGB")
            folder = base / split / names[ann["category_id"]]
            folder.mkdir(parents=True, exist_ok=True)
            img.crop((int(x), int(y), int(x + w), int(y + h))).save(folder / f"{ann['id']}.png")
        out[split] = base / split
    # A random ResNet-18 whose BatchNorm statistics are those of these crops (as a trained network's
    # are of its data): in eval mode its features are then normalised, not exploding.
    weights = base / "resnet18.pth"
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    for m in resnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    crops = [
        np.asarray(Image.open(p).convert("RGB").resize((48, 48)), np.float32) / 255
        for p in sorted(base.rglob("train/*/*.png"))
    ]
    x = (
        torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) - torch.tensor(le.IMAGENET_MEAN).view(3, 1, 1)
    ) / torch.tensor(le.IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        resnet.train()(x)
    torch.save(resnet.state_dict(), weights)
    out["weights"] = weights
    return out


def test_defaults_are_the_official_main_linear_recipe():
    s = LinearEvalSettings()
    assert (s.lr, s.momentum, s.weight_decay, s.batch_size, s.epochs) == (30.0, 0.9, 0.0, 256, 100)
    assert (s.warmup_epochs, s.warmup_multiplier, s.min_lr, s.crop_min_scale, s.image_size) == (
        5.0,
        100.0,
        1e-6,
        0.08,
        224,
    )


def test_bootstrap_interval_against_hand_values():
    assert le.bootstrap_ci(np.ones(50, bool)) == (1.0, 1.0)
    assert le.bootstrap_ci(np.zeros(50, bool)) == (0.0, 0.0)
    # 400 outcomes at 50 %: the normal approximation gives 0.5 +- 1.96 * sqrt(0.25 / 400) = +- 0.049.
    lo, hi = le.bootstrap_ci(np.arange(400) % 2 == 0, n_boot=20000)
    assert lo == pytest.approx(0.451, abs=0.008) and hi == pytest.approx(0.549, abs=0.008)
    # The same interval as resampling the outcomes themselves (the slow, obvious bootstrap).
    rng = np.random.default_rng(1)
    correct = rng.random(300) < 0.7
    slow = [correct[rng.integers(0, 300, 300)].mean() for _ in range(4000)]
    fast = le.bootstrap_ci(correct, n_boot=4000)
    assert np.quantile(slow, 0.025) == pytest.approx(fast[0], abs=0.015)
    assert np.quantile(slow, 0.975) == pytest.approx(fast[1], abs=0.015)


@pytest.mark.slow  # ~20 s on an idle core
def test_the_backbone_stays_frozen_and_the_classifier_learns(folders, tmp_path, monkeypatch):
    seen = {}
    real = le.load_backbone

    def spy(weights, depth=None):
        backbone, described = real(weights, depth)
        seen["backbone"], seen["before"] = backbone, {k: v.clone() for k, v in backbone.state_dict().items()}
        return backbone, described

    monkeypatch.setattr(le, "load_backbone", spy)
    # Train and score on the training crops (center crops at test time): even on random-ResNet
    # features the probe does better than the 1/3 of chance, beyond its own 95 % interval.
    result = le.linear_eval(
        folders["weights"],
        folders["train"],
        folders["train"],
        out_dir=tmp_path,
        device="cpu",
        epochs=30,
        batch_size=16,
        lr=0.1,
        warmup_epochs=1,
        image_size=48,
        crop_min_scale=0.6,
        num_workers=0,
        bootstrap=500,
    )
    after = seen["backbone"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())  # weights and BN statistics
    assert result["num_classes"] == 3 and result["num_train"] == result["num_val"] >= 30
    lo, hi = result["top1_ci95"]
    assert lo <= result["top1"] <= hi and hi - lo > 0
    assert lo > 1 / 3, result
    assert result["final_loss"] < 0.95 * np.log(3)  # below the loss of a uniform guess
    assert result["top5"] is None  # fewer than 5 classes
    assert "torchvision/timm ResNet, ResNet-18, 100 backbone tensors" in result["backbone"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["top1"] == result["top1"] and saved["settings"]["lr"] == 0.1
    assert torch.load(tmp_path / "linear.pt", weights_only=True)["classes"] == sorted(
        p.name for p in folders["train"].iterdir()
    )


def test_command_line_helpers_and_bad_input(folders, tmp_path, capsys):
    import argparse

    from soco_det.commands.probe import add_classification_arguments, run_classification

    parser = argparse.ArgumentParser()
    add_classification_arguments(parser)
    args = parser.parse_args(
        [
            "--weights",
            str(folders["weights"]),
            "--train",
            str(folders["train"]),
            "--val",
            str(folders["val"]),
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--lr",
            "0.1",
            "--warmup-epochs",
            "0",
            "--image-size",
            "32",
            "--num-workers",
            "0",
            "-o",
            str(tmp_path / "cli"),
        ]
    )
    assert run_classification(args) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "95% CI" in out and (tmp_path / "cli" / "metrics.json").is_file()
    # Through the real command: `soco-det probe SOURCE --task classification` (options shared with the probe).
    from soco_det.commands.main import main

    assert (
        main(
            [
                "probe",
                str(folders["weights"]),
                "--task",
                "classification",
                "--train",
                str(folders["train"]),
                "--val",
                str(folders["val"]),
                "--device",
                "cpu",
                "--epochs",
                "1",
                "--batch-size",
                "32",
                "--image-size",
                "32",
                "--num-workers",
                "0",
                "--lr",
                "0.1",
                "--warmup-epochs",
                "0",
                "-o",
                str(tmp_path / "cli2"),
            ]
        )
        == 0
    )
    assert (tmp_path / "cli2" / "metrics.json").is_file()
    assert main(["probe", "--task", "classification", "--device", "cpu"]) == 2
    assert "needs --weights" in capsys.readouterr().err
    # Depth mismatch, missing folder, different classes: clear errors.
    with pytest.raises(UserError, match="ResNet-18 backbone but model.depth=50"):
        le.load_backbone(folders["weights"], depth=50)
    with pytest.raises(UserError, match="not a folder"):
        le.linear_eval(folders["weights"], tmp_path / "nope", folders["val"], device="cpu")
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    shutil.copy(next(Path(folders["val"]).rglob("*.png")), other / "a" / "x.png")
    with pytest.raises(UserError, match="class folders differ"):
        le.linear_eval(folders["weights"], folders["train"], other, device="cpu", num_workers=0)
