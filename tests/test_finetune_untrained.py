"""``finetune --init untrained:RUN``: the very network a pretraining run started from, as the paired
baseline, and ``finetune --threads N``."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from engine_fixtures import sample_data, tiny_config  # noqa: F401 - fixture
from soco_det.errors import UserError
from soco_det.models import init_model
from soco_det.models.maskrcnn import build_maskrcnn
from soco_det.transfer.model import load_init, read_weights

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def run(sample_data, tmp_path_factory):  # noqa: F811 - fixture
    """A tiny SoCo pretraining run of 3 steps (ResNet-18, init seed 5)."""
    from soco_det.engine.trainer import pretrain

    torch.set_num_threads(1)
    cfg = tiny_config(sample_data, "train.loop.max_steps=3", "seed=5")
    return pretrain(cfg, tmp_path_factory.mktemp("untrained") / "run"), cfg


def test_untrained_init_is_the_network_the_run_started_from(run):
    folder, cfg = run
    start = init_model(cfg.model, cfg.seed).online["encoder"].state_dict()
    trained = read_weights(folder)
    checkpoint = folder / "checkpoints" / "last.pt"
    for source in (f"untrained:{folder}", f"untrained:{folder / 'config.yaml'}", f"untrained:{checkpoint}"):
        weights = read_weights(source)
        body = {k[len("backbone.body.") :]: v for k, v in weights.items() if k.startswith("backbone.body.")}
        assert set(body) == {k for k in start if not k.startswith("fc.")} and len(body) > 100
        for key, value in body.items():
            torch.testing.assert_close(value, start[key], rtol=0, atol=0, msg=key)
        # the same tensors the trained run exports, other values: the encoder moved during pretraining
        assert set(weights) == set(trained)
        moved = [
            k for k in body if k.endswith("conv1.weight") and not torch.equal(body[k], trained[f"backbone.body.{k}"])
        ]
        assert len(moved) >= 5
    # another seed is another network
    other = init_model(cfg.model, cfg.seed + 1).online["encoder"].state_dict()
    assert not torch.equal(other["conv1.weight"], read_weights(f"untrained:{folder}")["backbone.body.conv1.weight"])


def test_untrained_init_loads_like_the_runs_export(run):
    folder, _ = run
    from_run = build_maskrcnn(18, num_classes=3, fpn_channels=16, box_conv_dims=(16,) * 4, box_fc_dims=(32,))
    from_untrained = build_maskrcnn(18, num_classes=3, fpn_channels=16, box_conv_dims=(16,) * 4, box_fc_dims=(32,))
    assert load_init(from_untrained, f"untrained:{folder}") == load_init(from_run, folder)
    state = from_untrained.state_dict()
    assert not torch.equal(state["roi_heads.box_head.5.weight"], from_run.state_dict()["roi_heads.box_head.5.weight"])


def test_untrained_init_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match=r"untrained:RUN"):
        read_weights("untrained")
    with pytest.raises(UserError, match=r"untrained:RUN"):
        read_weights("untrained:")
    with pytest.raises(UserError, match=r"nowhere.*not found"):
        read_weights(f"untrained:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no config.yaml"):
        read_weights(f"untrained:{tmp_path / 'empty'}")
    bad = tmp_path / "config.yaml"
    bad.write_text("model: {depth: 7}\n")
    with pytest.raises(UserError, match=r"config.yaml"):
        read_weights(f"untrained:{bad}")


def test_finetune_cli_from_untrained_with_one_thread(run, tmp_path):
    from soco_det.commands.main import main
    from soco_det.synth import generate

    folder, _ = run
    scenes = generate(tmp_path / "scenes", n_unlabeled=0, n_train=2, n_val=1, short_side=96, seed=1)
    data = ["--train-json", str(scenes["train"]), "--train-images", str(scenes["images"])]
    data += ["--val-json", str(scenes["val"]), "--val-images", str(scenes["images"])]
    small = ["solver.iterations=2", "solver.steps=[1]", "solver.warmup_iters=1", "solver.batch_size=1"]
    small += ["model.roi_batch_size=16", "model.rpn_batch_size=32", "input.min_size_train=[96]"]
    small += ["input.min_size_test=96", "data.num_workers=0", "checkpoint_period=0", "model.precise_bn_images=0"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        argv = ["finetune", *data, "--init", f"untrained:{folder}", "--threads", "1", "-o", str(tmp_path / "ft")]
        rc = main([*argv, "--recipe", "finetune_tiny_cpu", "--device", "cpu", *small])
        assert rc == 0
        assert torch.get_num_threads() == 1  # the setting reached torch
    finally:
        torch.set_num_threads(before)
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["cpu_threads"] == 1 and saved["model"]["init"] == f"untrained:{folder.resolve()}"
    assert saved["model"]["fpn_channels"] == 16  # the widths of the run's network
    assert "bbox" in json.loads((tmp_path / "ft" / "metrics.json").read_text())


def test_finetune_threads_must_be_positive(tmp_path, capsys):
    from soco_det.commands.main import main

    assert main(["finetune", "-o", str(tmp_path / "ft"), "--threads", "0"]) == 2
    assert "cpu_threads" in capsys.readouterr().err
