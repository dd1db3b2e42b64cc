"""A short pretraining run trains its features: the encoder moves, nothing collapses, and the box
head's features beat the untrained network's on a small probe (the fast check of the budget rule;
`benchmarks/transfer.py` measures the same with seeds and intervals)."""

from __future__ import annotations

import numpy as np
import pytest

from soco_det.config import build_config
from soco_det.engine.config import PretrainConfig
from soco_det.engine.metrics import read_metrics
from soco_det.engine.trainer import pretrain

SMALL = [
    "model.fpn_channels=32",
    "model.head_conv_dim=32",
    "model.head_fc_dim=64",
    "model.proj_hidden_dim=64",
    "model.proj_dim=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "train.loop.epochs=12",
    "train.optim.warmup_epochs=1",
    "train.loop.log_every=5",
    "train.loop.ckpt_every=1000",
    "train.loop.tensorboard=false",
    "train.loop.progress=false",
    "train.loop.device=cpu",
    "seed=0",
]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from soco_det.proposals import compute_store
    from soco_det.synth import generate

    root = tmp_path_factory.mktemp("trains")
    paths = generate(root / "scenes", n_unlabeled=48, n_train=40, n_val=40, short_side=96, seed=2)
    store = compute_store(paths["images"] / "unlabeled", root / "proposals")
    return {**paths, "proposals": store, "root": root}


def _run(scenes, name: str, *overrides: str):
    extra = {"data": {"images": str(scenes["images"] / "unlabeled"), "proposals": str(scenes["proposals"])}}
    cfg = build_config(PretrainConfig, "tiny_cpu", [*SMALL, *overrides], extra=extra)
    return cfg, pretrain(cfg, scenes["root"] / name)


def test_small_budget_rule_trains_without_collapse_and_beats_untrained(scenes):
    from soco_det.probe.network import load_probe_network
    from soco_det.probe.objects import read_objects, spec_from_config
    from soco_det.probe.probe import paired_difference, run_probe

    cfg, run = _run(scenes, "auto")  # tiny_cpu: train.optim.budget=auto, model.head_decorrelation=1.0
    last = read_metrics(run)[-1]
    assert last["move/encoder"] > 0.03, last  # the paper's eta at batch 8 moves it ~0.1 %
    assert last["collapse/head_rank"] > last["collapse/head_rank_limit"], last
    assert last["collapse/head_std"] > 0.2, last

    spec = spec_from_config(cfg, 96)
    train = read_objects(scenes["train"], scenes["images"])
    val = read_objects(scenes["val"], scenes["images"], categories=train.categories)
    tasks = ("retrieval", "rank")
    trained = run_probe(load_probe_network(run, cfg.model, cfg.seed), train, val, spec, task_names=tasks)
    untrained = run_probe(load_probe_network("untrained", cfg.model, cfg.seed), train, val, spec, task_names=tasks)
    diff = paired_difference(trained, untrained, resamples=500)["head"]["retrieval_top1"]
    assert diff["ci95"][0] > 0, diff
    assert trained.ranks["head"] > 0.5 * untrained.ranks["head"]
    assert np.isfinite(trained.ranks["roi"])
