"""The tiny_cpu recipe learns on the sample scenes: the loss falls clearly over a few hundred steps."""

import pytest

from soco_det.config import build_config
from soco_det.engine.config import PretrainConfig
from soco_det.engine.metrics import read_metrics
from soco_det.engine.trainer import pretrain


@pytest.mark.slow
def test_tiny_cpu_loss_falls(tmp_path):

    from soco_det.proposals import compute_store
    from soco_det.synth import generate

    # one intra-op thread (autouse fixture): on a shared 2-core machine two threads spin-wait.
    generate(tmp_path / "scenes", n_unlabeled=64, n_train=0, n_val=0, short_side=64, seed=1)
    store = compute_store(tmp_path / "scenes" / "images" / "unlabeled", tmp_path / "proposals")
    extra = {"data": {"images": str(tmp_path / "scenes" / "images" / "unlabeled"), "proposals": str(store)}}
    # 64 images / batch 16 = 4 steps per epoch; 50 epochs = 200 steps.
    cfg = build_config(
        PretrainConfig,
        "tiny_cpu",
        ["train.loop.epochs=50", "train.loop.log_every=5", "train.loop.device=cpu", "train.loop.tensorboard=false"],
        extra=extra,
    )
    run = pretrain(cfg, tmp_path / "run")
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 40
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    # the loss lies in [-8, 0]: SoCo_FPN sums four -2*cos terms
    assert last < first - 1.0, (first, last, losses)
