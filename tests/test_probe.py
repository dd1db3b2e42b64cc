"""The object probe: read-outs on features whose answer is known, geometry, the untrained baseline,
bootstrap intervals, and the command end to end on generated scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine_fixtures import sample_data, tiny_config  # noqa: F401 - fixture
from soco_det.probe import tasks
from soco_det.probe.objects import ObjectSet, augmented_views, box_iou, jittered_boxes, with_background_boxes
from soco_det.probe.probe import ProbeResult, combined_paired_difference, paired_difference, summarise


def _blobs(n: int, d: int, classes: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, d)) * sep
    y = rng.integers(0, classes, size=n)
    return centres[y] + rng.normal(size=(n, d)), y


def test_linear_and_knn_read_separable_classes_and_not_noise():
    xt, yt = _blobs(300, 16, 4, sep=3.0, seed=0)
    xv, yv = _blobs(200, 16, 4, sep=3.0, seed=1)
    assert tasks.linear_probe(xt, yt, xv, yv).mean() > 0.95
    assert tasks.knn_probe(xt, yt, xv, yv).mean() > 0.95
    rng = np.random.default_rng(2)
    noise_t, noise_v = rng.normal(size=(300, 16)), rng.normal(size=(200, 16))
    assert tasks.linear_probe(noise_t, yt, noise_v, yv).mean() < 0.45  # chance is 0.25
    assert tasks.knn_probe(noise_t, yt, noise_v, yv).mean() < 0.45


def test_localisation_probe_recovers_a_linear_target():
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)
    xt, xv = rng.normal(size=(400, 8)), rng.normal(size=(200, 8))
    yt, yv = xt @ w * 0.05 + 0.5, xv @ w * 0.05 + 0.5
    owner_t, owner_v = np.repeat(np.arange(100), 4), np.repeat(np.arange(50), 4)
    err, dev = tasks.localisation_probe(xt, yt, owner_t, xv, yv, owner_v, 50)
    assert err.shape == dev.shape == (50,)
    assert 1 - err.sum() / dev.sum() > 0.95
    err, dev = tasks.localisation_probe(
        rng.normal(size=(400, 8)), yt, owner_t, rng.normal(size=(200, 8)), yv, owner_v, 50
    )
    assert 1 - err.sum() / dev.sum() < 0.2


def test_retrieval_finds_the_same_object_and_marks_invalid_ones():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 32))
    b = a + 0.1 * rng.normal(size=a.shape)
    valid = np.ones(50, bool)
    valid[:5] = False
    hits = tasks.retrieval_probe(a, b, valid, rng.normal(size=(100, 32)))
    assert np.isnan(hits[:5]).all() and np.nanmean(hits) == 1.0
    shuffled = tasks.retrieval_probe(a, rng.normal(size=a.shape), valid, rng.normal(size=(100, 32)))
    assert np.nanmean(shuffled) < 0.2


def test_effective_rank_of_collapsed_and_spread_features():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=(1, 64))
    collapsed = rng.normal(size=(200, 1)) * direction + 1e-4 * rng.normal(size=(200, 64))
    assert tasks.effective_rank(collapsed) < 1.5
    assert tasks.effective_rank(rng.normal(size=(200, 64))) > 40


def test_bootstrap_interval_covers_the_value_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(50) < 0.7, rng.random(2000) < 0.7
    e_small = tasks.bootstrap(tasks.mean_stat(small.astype(float)), len(small), 500)
    e_large = tasks.bootstrap(tasks.mean_stat(large.astype(float)), len(large), 500)
    for e in (e_small, e_large):
        assert e.lo <= e.value <= e.hi
    assert (e_large.hi - e_large.lo) < (e_small.hi - e_small.lo) / 3


def _result(name: str, hits: np.ndarray) -> ProbeResult:
    return ProbeResult(name, 10, len(hits), scores={"roi": {"linear_top1": hits.astype(float)}})


def test_paired_difference_is_tighter_than_the_unpaired_spread():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.5
    better = base | (rng.random(400) < 0.1)  # the same objects, a few more right
    diff = paired_difference(_result("b", better), _result("a", base), 500)["roi"]["linear_top1"]
    assert diff["ci95"][0] > 0
    assert diff["mean"] == pytest.approx(better.mean() - base.mean())
    combined = combined_paired_difference([(_result("b", better), _result("a", base))] * 2, 300)
    assert combined["roi"]["linear_top1"]["mean"] == pytest.approx(diff["mean"])
    assert summarise(_result("a", base), 200)["roi"]["linear_top1"]["mean"] == pytest.approx(base.mean())


def _objects(n_images: int = 4) -> ObjectSet:
    boxes = np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9]] * n_images, np.float32)
    return ObjectSet(
        [f"img{i}.jpg" for i in range(n_images)],
        np.repeat(np.arange(n_images), 2),
        boxes,
        np.zeros(2 * n_images, np.int64),
        [1],
    )


def test_jittered_boxes_report_their_iou():
    objects = _objects()
    boxes, owner, iou = jittered_boxes(objects, 5, seed=0)
    assert boxes.shape == (40, 4) and (owner == np.repeat(np.arange(8), 5)).all()
    np.testing.assert_allclose(iou, box_iou(boxes, objects.boxes[owner]), rtol=1e-6)
    assert iou.min() >= 0 and iou.max() <= 1 and iou.std() > 0.05
    assert ((boxes >= 0) & (boxes <= 1)).all()


def test_augmented_views_map_boxes_into_the_crop_and_flip():
    objects = _objects()
    views, boxes, valid = augmented_views(objects, seed=3)
    for k, (flip, (x0, y0, x1, y1)) in enumerate(np.asarray(views, dtype=object)[objects.image_index]):
        b = objects.boxes[k]
        expect = np.clip(
            [(b[0] - x0) / (x1 - x0), (b[1] - y0) / (y1 - y0), (b[2] - x0) / (x1 - x0), (b[3] - y0) / (y1 - y0)], 0, 1
        )
        if flip:
            expect = [1 - expect[2], expect[1], 1 - expect[0], expect[3]]
        np.testing.assert_allclose(boxes[k], expect, atol=1e-6)
    assert valid.dtype == bool


def _crowded_objects(n_images: int = 6, per_image: int = 12, seed: int = 0) -> ObjectSet:
    """A one-class set whose images hold many small and a few large objects (aerial-like)."""
    rng = np.random.default_rng(seed)
    boxes, index = [], []
    for i in range(n_images):
        side = rng.uniform(0.04, 0.12, size=(per_image, 1)) * np.array([[1.0, 1.0]])
        side[0] = 0.35  # one large object per image
        x0y0 = rng.uniform(0, 1, size=(per_image, 2)) * (1 - side)
        boxes.append(np.concatenate([x0y0, x0y0 + side], axis=1))
        index.append(np.full(per_image, i))
    return ObjectSet(
        [f"img{i}.jpg" for i in range(n_images)],
        np.concatenate(index).astype(np.int64),
        np.concatenate(boxes).astype(np.float32),
        np.zeros(n_images * per_image, np.int64),
        [1],
    )


@pytest.mark.parametrize("objects", [_objects(), _crowded_objects()], ids=["two_per_image", "crowded"])
def test_background_boxes_one_per_object_away_from_every_object(objects):
    from soco_det.probe.objects import pairwise_inside, pairwise_iou

    both = with_background_boxes(objects, seed=0, max_iou=0.3)
    bg = both.labels == 1
    assert both.categories[-1] == -1 and (both.labels[: len(objects)] == 0).all()
    # as many background boxes as objects in every image
    np.testing.assert_array_equal(
        np.bincount(both.image_index[bg], minlength=len(objects.images)),
        np.bincount(objects.image_index, minlength=len(objects.images)),
    )
    for image in range(len(objects.images)):
        own = objects.boxes[objects.image_index == image]
        drawn = both.boxes[bg & (both.image_index == image)]
        assert pairwise_iou(drawn, own).max() < 0.3 and pairwise_inside(drawn, own).max() <= 0.5
        assert ((drawn >= 0) & (drawn <= 1)).all() and (drawn[:, 2:] > drawn[:, :2]).all()
    # drawn at the objects' sizes (sides x0.8-1.25), not one size for all
    area = lambda b: np.prod(b[:, 2:] - b[:, :2], axis=1)  # noqa: E731
    assert np.median(area(both.boxes[bg])) == pytest.approx(np.median(area(objects.boxes)), rel=0.6)
    np.testing.assert_allclose(pairwise_iou(objects.boxes[:3], objects.boxes[:3]).diagonal(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        pairwise_iou(objects.boxes[:5], both.boxes[bg][:7]),
        [[box_iou(a[None], b[None])[0] for b in both.boxes[bg][:7]] for a in objects.boxes[:5]],
        rtol=1e-5,
    )


def test_a_full_image_gets_fewer_background_boxes_and_says_so(caplog):
    full = ObjectSet(["a.jpg"], np.zeros(2, np.int64), np.array([[0, 0, 1, 1], [0, 0, 0.9, 0.9]], np.float32),
                     np.zeros(2, np.int64), [1])  # fmt: skip
    with caplog.at_level("WARNING"):
        both = with_background_boxes(full, seed=0)
    assert (both.labels == 1).sum() == 0 and "2 of 2 objects got no background box" in caplog.text


def test_balanced_accuracy_of_the_constant_object_answer_is_one_half():
    objects = with_background_boxes(_crowded_objects(), seed=1)
    labels = objects.labels
    assert (labels == 0).sum() == (labels == 1).sum()
    always_object = (labels == 0).astype(float)
    result = ProbeResult("const", 10, len(labels), scores={"head": {"linear_top1": always_object}}, labels=labels)
    summary = summarise(result, 200)["head"]
    assert summary["linear_balanced"]["mean"] == pytest.approx(0.5)
    # where the classes are unbalanced, plain accuracy rewards the majority; balanced accuracy does not
    unbalanced = np.concatenate([labels, np.zeros(3 * len(labels), np.int64)])
    hits = (unbalanced == 0).astype(float)
    stat = tasks.balanced_stat(hits, unbalanced)
    assert hits.mean() > 0.85 and stat(np.arange(len(hits))) == pytest.approx(0.5)
    # features that carry nothing: the fitted classifier answers one class, balanced accuracy 0.5
    flat_t, flat_v = np.ones((len(labels), 8)), np.ones((len(labels), 8))
    hits = tasks.linear_probe(flat_t, labels, flat_v, labels)
    assert tasks.balanced_stat(hits, labels)(np.arange(len(labels))) == pytest.approx(0.5)
    xt, yt = _blobs(200, 8, 2, sep=3.0, seed=0)
    xv, yv = _blobs(200, 8, 2, sep=3.0, seed=1)
    assert tasks.balanced_stat(tasks.linear_probe(xt, yt, xv, yv), yv)(np.arange(200)) > 0.95


def test_auc_orders_objects_above_background():
    rng = np.random.default_rng(0)
    positive = rng.random(400) < 0.3
    assert tasks.auc(positive + 0.1 * rng.random(400), positive) == 1.0
    assert tasks.auc(-positive.astype(float), positive) == 0.0
    assert tasks.auc(np.zeros(400), positive) == 0.5  # ties count half
    assert abs(tasks.auc(rng.random(400), positive) - 0.5) < 0.08
    assert np.isnan(tasks.auc(np.arange(5.0), np.ones(5, bool)))
    # the probe's AUC is that of the linear margin, for two classes
    xt, yt = _blobs(200, 8, 2, sep=1.0, seed=0)
    xv, yv = _blobs(200, 8, 2, sep=1.0, seed=1)
    from soco_det.probe.probe import _linear_scores

    scores = _linear_scores(xt, yt, xv, yv, seed=0)
    result = ProbeResult("blobs", 200, 200, scores={"roi": scores}, labels=yv)
    summary = summarise(result, 200)["roi"]
    assert 0.6 < summary["linear_auc"]["mean"] <= 1.0
    assert summary["linear_auc"]["mean"] >= summary["linear_balanced"]["mean"] - 0.05
    assert "linear_auc" not in summarise(ProbeResult("x", 1, 200, scores={"roi": {"linear_top1": scores["linear_top1"]}},
                                                     labels=yv), 50)["roi"]  # fmt: skip


def test_untrained_network_is_the_one_pretraining_starts_from(sample_data, tmp_path):
    from soco_det.engine.trainer import Hook, pretrain
    from soco_det.probe.network import load_probe_network

    class StartingWeights(Hook):
        def before_train(self, trainer) -> None:
            self.online = {part: trainer.model.online[part].state_dict() for part in ("encoder", "neck", "head")}
            self.online = {p: {k: v.clone() for k, v in sd.items()} for p, sd in self.online.items()}

    cfg = tiny_config(sample_data, "train.loop.max_steps=1", "seed=5")
    start = StartingWeights()
    torch.manual_seed(123)  # whatever the global RNG holds before
    pretrain(cfg, tmp_path / "run", hooks=[start])
    torch.manual_seed(321)
    net = load_probe_network("untrained", cfg.model, cfg.seed)
    for part in ("encoder", "neck", "head"):
        a, b = getattr(net, part).state_dict(), start.online[part]
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part
    other = load_probe_network("untrained", cfg.model, cfg.seed + 1)
    assert not torch.equal(other.encoder.conv1.weight, net.encoder.conv1.weight)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from soco_det.synth import generate

    return generate(tmp_path_factory.mktemp("probe_scenes"), n_unlabeled=0, n_train=12, n_val=8, short_side=96)


def test_probe_command_end_to_end(scenes, tmp_path):
    from soco_det.commands.main import main

    out = tmp_path / "probe.json"
    rc = main(
        [
            "probe",
            "untrained",
            "untrained",
            "--config",
            "tiny_cpu",
            "--train-json",
            str(scenes["train"]),
            "--val-json",
            str(scenes["val"]),
            "--images",
            str(scenes["images"]),
            "--resamples",
            "50",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    roi = report["results"]["untrained"]["roi"]
    for name in ("linear_top1", "knn_top1", "loc_r2", "retrieval_top1", "effective_rank"):
        lo, hi = roi[name]["ci95"]
        assert lo <= hi and np.isfinite(roi[name]["mean"])
    # the same network twice: every paired difference is exactly 0
    diff = report["paired"]["untrained - untrained"]["roi"]
    assert all(d["mean"] == 0 and d["ci95"] == [0, 0] for d in diff.values())


def _one_class(coco_json, out):
    """The scenes' COCO file with every object in one category (as a tree-crown or cell set)."""
    coco = json.loads(coco_json.read_text())
    coco["categories"] = [{"id": 1, "name": "object"}]
    for ann in coco["annotations"]:
        ann["category_id"] = 1
    out.write_text(json.dumps(coco))
    return out


def test_probe_command_on_one_class_scores_object_vs_background(scenes, tmp_path, capsys):
    from soco_det.commands.main import main

    train, val = _one_class(scenes["train"], tmp_path / "train.json"), _one_class(scenes["val"], tmp_path / "val.json")
    out = tmp_path / "probe.json"
    argv = ["probe", "untrained", "untrained", "--config", "tiny_cpu", "--tasks", "linear", "knn"]
    argv += ["--train-json", str(train), "--val-json", str(val), "--images", str(scenes["images"])]
    assert main([*argv, "--resamples", "50", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    n_objects = len([a for a in json.loads(val.read_text())["annotations"] if not a.get("iscrowd")])
    assert report["background_boxes"]["val"] == report["n_val_objects"] - report["background_boxes"]["val"]
    assert report["background_boxes"]["val"] <= n_objects
    for kind in ("head", "roi"):
        scores = report["results"]["untrained"][kind]
        assert {"linear_top1", "knn_top1", "linear_balanced", "knn_balanced", "linear_auc"} <= set(scores)
        assert 0 <= scores["linear_auc"]["mean"] <= 1
        # balanced classes: plain and balanced accuracy agree to within the few boxes that did not fit
        assert abs(scores["linear_balanced"]["mean"] - scores["linear_top1"]["mean"]) < 0.05
    printed = capsys.readouterr().out
    assert "one category: object vs background" in printed
    assert "| head features, difference = second minus first |" in printed
    assert "| roi features, difference = second minus first |" in printed
    assert printed.index("| head features |") < printed.index("| roi features |")


def test_probe_command_refuses_untrained_alone(scenes, capsys):
    from soco_det.commands.main import main

    rc = main(
        [
            "probe",
            "untrained",
            "--train-json",
            str(scenes["train"]),
            "--val-json",
            str(scenes["val"]),
            "--images",
            str(scenes["images"]),
        ]
    )
    assert rc == 2 and "--config" in capsys.readouterr().err


def test_online_probe_is_logged_with_the_loss(scenes, tmp_path):
    from soco_det.config import ConfigError, build_config
    from soco_det.engine.config import PretrainConfig
    from soco_det.engine.metrics import read_metrics
    from soco_det.engine.trainer import pretrain
    from soco_det.proposals import compute_store
    from soco_det.synth import generate

    unl = generate(tmp_path / "unl", n_unlabeled=8, n_train=0, n_val=0, short_side=96, seed=4)
    store = compute_store(unl["images"] / "unlabeled", tmp_path / "props")
    probe = [
        f"train.probe.train_json={scenes['train']}",
        f"train.probe.val_json={scenes['val']}",
        f"train.probe.images={scenes['images']}",
    ]
    small = [
        "model.fpn_channels=16",
        "model.head_conv_dim=16",
        "model.head_fc_dim=32",
        "model.proj_hidden_dim=32",
        "model.proj_dim=16",
        "data.batch_size=4",
        "data.num_workers=0",
        "train.loop.epochs=2",
        "train.optim.warmup_epochs=0",
        "train.loop.log_every=2",
        "train.loop.tensorboard=false",
        "train.loop.progress=false",
        "train.loop.device=cpu",
    ]
    extra = {"data": {"images": str(unl["images"] / "unlabeled"), "proposals": str(store)}}
    with pytest.raises(ConfigError, match="multiple of loop.log_every"):
        build_config(PretrainConfig, "tiny_cpu", [*small, *probe, "train.probe.every=3"], extra=extra)
    with pytest.raises(ConfigError, match="train.probe: every=2 needs val_json"):
        build_config(PretrainConfig, "tiny_cpu", [*small, probe[0], probe[2], "train.probe.every=2"], extra=extra)
    cfg = build_config(PretrainConfig, "tiny_cpu", [*small, *probe, "train.probe.every=2"], extra=extra)
    from soco_det.probe.online import OnlineProbe

    records = read_metrics(pretrain(cfg, tmp_path / "run", metric_sources=[OnlineProbe(cfg)]))
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert 0 <= r["probe/head_linear_top1"] <= 1 and 0 <= r["probe/roi_knn_top1"] <= 1
        assert r["probe/head_effective_rank"] > 1 and "loss" in r
