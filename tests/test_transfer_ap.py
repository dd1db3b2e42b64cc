"""The frozen-backbone detection probe (soco_det.transfer.frozen) and the AP presets of benchmarks/transfer.py.

Fast tests: the features of an init are computed once whatever the number of seeds and label
settings; the AP comes from pycocotools on boxes mapped back to each image's own size (perfect
boxes score 1, shifted ones 0); fine-tuning seed f gives every init the same RPN, predictor, data
order and label subset, so two copies of one init score identically. The end-to-end run of
``--preset smoke_ap`` is slow (proposals and two pretraining runs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soco_det.errors import UserError
from soco_det.transfer import frozen
from soco_det.transfer.frozen import FrozenSettings

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.fpn_channels=32", "model.head_conv_dim=32", "model.head_fc_dim=64"]
FAST = {"size": 64, "iterations": 3, "batch_size": 2, "warmup_iters": 1, "roi_batch_size": 16, "cache_batch": 4}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    import soco_det.synth as synth

    root = tmp_path_factory.mktemp("ap_scenes")
    return synth.generate(root, n_unlabeled=0, n_train=6, n_val=4, short_side=80, seed=3)


def untrained(tmp: Path, seed: int) -> dict[str, torch.Tensor]:
    from soco_det.config import build_config
    from soco_det.engine import PretrainConfig
    from soco_det.export.untrained import save_untrained
    from soco_det.transfer.model import read_weights

    cfg = build_config(PretrainConfig, "tiny_cpu", SMALL)
    return read_weights(save_untrained(cfg, tmp / f"untrained{seed}.pt", seed))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ap_weights")
    return {0: untrained(tmp, 0), 1: untrained(tmp, 1)}


def test_paired_seed_gives_every_init_the_same_heads(weights):
    settings = FrozenSettings(**FAST)
    a = frozen.build_detector(weights[0], 4, settings, seed=7, where="a")
    b = frozen.build_detector(weights[1], 4, settings, seed=7, where="b")
    c = frozen.build_detector(weights[0], 4, settings, seed=8, where="c")
    for part in ("rpn", "roi_heads.box_predictor"):
        sa, sb, sc = (m.get_submodule(part).state_dict() for m in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), part
    # head "own": each init's box head and backbone; "shared": the same seeded box head for both
    key = "roi_heads.box_head.0.0.weight"
    assert torch.equal(a.state_dict()[key], weights[0][key])
    assert not torch.equal(a.state_dict()[key], b.state_dict()[key])
    shared = FrozenSettings(**FAST, head="shared")
    sa = frozen.build_detector(weights[0], 4, shared, seed=7, where="a").state_dict()
    sb = frozen.build_detector(weights[1], 4, shared, seed=7, where="b").state_dict()
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], weights[0][key])
    body = "backbone.body.conv1.weight"
    assert torch.equal(sa[body], weights[0][body]) and not torch.equal(sa[body], sb[body])
    assert not any(p.requires_grad for p in a.backbone.parameters())


def test_batch_order_and_label_subset_are_seeded():
    s = FrozenSettings(iterations=7, batch_size=3, flip=True)
    subset = frozen.label_subset(10, 0.3, seed=2)
    assert len(subset) == 3 and len(set(subset.tolist())) == 3
    assert np.array_equal(subset, frozen.label_subset(10, 0.3, seed=2))
    assert not np.array_equal(frozen.label_subset(10, 0.5, seed=2), frozen.label_subset(10, 0.5, seed=3))
    order = frozen.batch_order(10, subset, s, seed=4)
    again = frozen.batch_order(10, subset, s, seed=4)
    assert len(order) == 7 and all(np.array_equal(x, y) for x, y in zip(order, again))
    rows = np.concatenate(order)
    assert set(rows % 10) <= set(subset.tolist())  # only the labeled subset, mirrored rows at i + 10
    assert (rows >= 10).any() and (rows < 10).any()
    with pytest.raises(UserError, match="fraction"):
        frozen.label_subset(10, 0.0, seed=0)


class _Oracle(torch.nn.Module):
    """Stands in for the RPN and RoI heads: returns the given boxes of the image whose row index is
    stored in its cached "feature" (so the scoring path, not a network, is under test)."""

    def __init__(self, boxes: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.boxes = boxes

    def forward(self, *args):
        if len(args) == 2:  # rpn(images, features)
            return [None] * args[0].tensors.shape[0], {}
        feats = args[0]
        rows = feats["0"][:, 0, 0, 0].long().tolist()
        out = [{"boxes": self.boxes[r]["boxes"], "labels": self.boxes[r]["labels"]} for r in rows]
        return [{**o, "scores": torch.ones(len(o["labels"]))} for o in out], {}


def test_score_maps_boxes_back_and_uses_pycocotools(scenes):
    size = 64
    split = frozen.read_split(scenes["val"], scenes["images"], size)
    feats = {"0": torch.arange(len(split.image_ids)).float().view(-1, 1, 1, 1)}
    model = torch.nn.Module()
    model.rpn = model.roi_heads = _Oracle(split.targets)  # perfect boxes, in size x size pixels
    perfect = frozen.score_heads(model, feats, split, size)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    shifted = [
        {"boxes": t["boxes"] + (t["boxes"][:, 2:3] - t["boxes"][:, 0:1]), "labels": t["labels"]} for t in split.targets
    ]
    model.rpn = model.roi_heads = _Oracle(shifted)  # moved right by a box width: IoU 0
    assert frozen.score_heads(model, feats, split, size)["AP50"] == 0.0
    # the images are not square, so a missing map back to (W, H) would not score 1
    assert any(w != h for w, h in split.sizes)


def test_probe_caches_features_once_and_pairs_copies_exactly(scenes, weights, monkeypatch):
    calls = []
    real = frozen.cache_features
    monkeypatch.setattr(frozen, "cache_features", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    report = frozen.frozen_detection_probe(
        {"a": weights[0], "copy": weights[0], "b": weights[1]},
        scenes["train"],
        scenes["val"],
        scenes["images"],
        FrozenSettings(**FAST),
        seeds=[0, 1],
        fractions=[0.5, 1.0],
    )
    assert calls == [12, 4] * 3  # per init: train (+ mirrored) and val, once for 2 seeds x 2 fractions
    res = report["results"]
    for f in ("0.5", "1"):
        for s in ("0", "1"):
            assert res["a"][f][s]["bbox"] == res["copy"][f][s]["bbox"]
            assert 0.0 <= res["a"][f][s]["bbox"]["AP"] <= 1.0
    assert res["a"]["0.5"]["0"]["train"]["images"] == 3 and res["a"]["1"]["0"]["train"]["images"] == 6
    diff = report["paired"]["copy-a"]["1"]["box_ap"]
    assert diff["values"] == [0.0, 0.0] and diff["mean"] == 0.0


def test_complete_weights_fills_only_missing_parts(weights):
    body_only = {k: v + 1 for k, v in weights[1].items() if k.startswith("backbone.body.")}
    done = frozen.complete_weights(body_only, weights[0])
    assert set(done) == {k for k in weights[0] if k.startswith(("backbone.", "roi_heads.box_head."))}
    assert torch.equal(done["backbone.body.conv1.weight"], weights[1]["backbone.body.conv1.weight"] + 1)
    assert torch.equal(done["backbone.fpn.inner_blocks.0.0.weight"], weights[0]["backbone.fpn.inner_blocks.0.0.weight"])


def test_settings_are_checked():
    with pytest.raises(UserError, match="head"):
        FrozenSettings(head="mine").validate()
    with pytest.raises(UserError, match="size"):
        FrozenSettings(size=16).validate()


def test_cli_detection_probe_writes_ap_and_paired_difference(scenes, tmp_path, capsys):
    from soco_det.commands.main import main

    out = tmp_path / "det.json"
    argv = ["probe", "untrained", "--config", "tiny_cpu", "--task", "detection"]
    argv += ["--train-json", str(scenes["train"]), "--val-json", str(scenes["val"]), "--images", str(scenes["images"])]
    assert (
        main([*argv, "--size", "64", "--iterations", "2", "--ft-seeds", "0", "--fractions", "1", "-o", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert report["settings"]["iterations"] == 2 and report["settings"]["size"] == 64
    assert "AP50" in report["results"]["untrained"]["1"]["0"]["bbox"]
    assert "box AP" in capsys.readouterr().out
    assert main(["probe", "untrained", "--config", "tiny_cpu", "--task", "detection", "--train-json", "x.json"]) == 2
    assert "--val-json" in capsys.readouterr().err


def _benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("transfer_benchmark", ROOT / "benchmarks" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_summary_means_and_paired_intervals():
    bench = _benchmark()
    ap = {"random": [0.10, 0.12, 0.14], "byol": [0.11, 0.12, 0.16], "soco": [0.13, 0.15, 0.17]}

    def runs(values, shift):
        return {str(s): {"bbox": {"AP": v + shift, "AP50": 2 * v + shift}} for s, v in enumerate(values)}

    reports = {0: {"results": {n: {"0.2": runs(v, -0.05), "1": runs(v, 0.0)} for n, v in ap.items()}}}
    summary = bench.ap_summary(reports, list(ap), {"low_label": 0.2, "full": 1.0})
    assert summary["results"]["soco"]["box_ap"] == pytest.approx(15.0)
    assert summary["results"]["soco"]["box_ap50"] == pytest.approx(30.0)
    assert summary["results"]["random"]["box_ap_low_label"] == pytest.approx(7.0)
    diff = summary["paired"]["soco-random"]["box_ap"]
    assert diff["values"] == pytest.approx([3.0, 3.0, 3.0]) and diff["ci95"] == pytest.approx([3.0, 3.0])
    low = summary["paired_low_label"]["byol-random"]["box_ap50"]
    assert low["values"] == pytest.approx([2.0, 0.0, 4.0]) and low["ci95"][0] < 0 < low["ci95"][1]
    assert set(summary["paired"]) == {"soco-random", "soco-byol", "byol-random"}


@pytest.mark.slow
def test_smoke_ap_preset_end_to_end(tmp_path):
    out = tmp_path / "ap.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "transfer.py"), "--preset", "smoke_ap", "--out", str(tmp_path)]
    run = subprocess.run([*cmd, "--json", str(out), "--workers", "1"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("random", "byol", "soco"):
        for key in ("box_ap", "box_ap50", "box_ap_low_label", "box_ap50_low_label"):
            assert 0.0 <= report["results"][name][key] <= 100.0
    for where in ("paired", "paired_low_label"):
        for pair in ("soco-random", "soco-byol", "byol-random"):
            ci = report[where][pair]["box_ap"]["ci95"]
            assert (
                len(report[where][pair]["box_ap"]["values"]) == 2
                and ci[0] <= report[where][pair]["box_ap"]["mean"] <= ci[1]
            )
    assert "frozen detection probe" in run.stdout and "minutes per run" in run.stdout


def test_schedule_sweep_trains_the_untrained_start_with_each_runs_settings(tmp_path):
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "frozen_schedule.py"), "--preset", "smoke_ap"]
    args = ["--runs", "iterations=2", "iterations=3,lr=0.002", "--seeds", "0", "1", "--out", str(tmp_path / "w")]
    run = subprocess.run([*cmd, *args, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["runs"]
    assert [r["settings"]["iterations"] for r in rows] == [2, 3]
    assert rows[0]["settings"]["lr"] == bench_preset_lr() and rows[1]["settings"]["lr"] == 0.002
    for row in rows:
        assert len(row["box_ap"]) == len(row["box_ap50"]) == 2
        assert all(0.0 <= x <= 100.0 for x in row["box_ap"] + row["box_ap50"])
    assert run.stdout.count("min per run") == 2


def bench_preset_lr() -> float:
    return _benchmark().PRESETS["smoke_ap"]["ap"]["settings"].get("lr", FrozenSettings().lr)


def test_dataset_entries_and_object_size_flag_override_the_preset():
    bench = _benchmark()
    preset = bench.PRESETS["cpu_ap"]
    nuclei = bench.dataset_preset(preset, "nuclei")
    entry = preset["datasets"]["nuclei"]
    assert nuclei["ap"]["settings"]["iterations"] == entry["ap_settings"]["iterations"]
    assert nuclei["ap"]["settings"]["lr"] == preset["ap"]["settings"]["lr"]  # the rest from the preset
    assert nuclei["pretrain"][-len(entry["pretrain"]) :] == entry["pretrain"]
    assert bench.dataset_preset(preset, "scenes") == {**preset, "pretrain": list(preset["pretrain"])}
    shared = bench.dataset_preset(preset, "nuclei", bench.parse_settings(["head=shared", "iterations=7"]))
    assert shared["ap"]["settings"]["head"] == "shared" and shared["ap"]["settings"]["iterations"] == 7
    with pytest.raises(SystemExit, match="not a frozen probe setting"):
        bench.parse_settings(["iteration=7"])
    assert bench.object_size_of(bench.parse_args(["--dataset", "nuclei"]), preset) == "auto"
    assert bench.object_size_of(bench.parse_args([]), preset) == "paper"
    assert bench.object_size_of(bench.parse_args(["--object-size", "auto"]), preset) == "auto"
