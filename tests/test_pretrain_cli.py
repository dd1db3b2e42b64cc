"""`soco-det pretrain`: a 2-step run writes config, metrics and checkpoints; bad keys are rejected."""

import json

import pytest
import yaml
from engine_fixtures import TINY_OVERRIDES, pretrain_cli_args, sample_data  # noqa: F401

from soco_det.commands.main import main

cli_args = pretrain_cli_args


def test_two_steps_write_config_metrics_and_checkpoints(sample_data, tmp_path):
    out = tmp_path / "run"
    assert main(cli_args(sample_data, out, "train.loop.max_steps=2", "data.batch_size=2")) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["loop"]["max_steps"] == 2 and cfg["data"]["batch_size"] == 2 and cfg["model"]["depth"] == 18
    assert cfg["data"]["proposals"] == str(sample_data["proposals"].resolve())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {"loss", "loss/1-2", "loss/2-1", "loss/1-3", "loss/3-1", "lr", "momentum", "img_per_s"} <= set(records[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_00000002.pt"]

    # --resume auto on a finished run: nothing left to do, the run stays at step 2.
    assert main(cli_args(sample_data, out, "train.loop.max_steps=2", "--resume", "auto")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("key", ["train.bogus", "model.not_a_field", "nonsense"])
def test_unknown_override_key_is_rejected_by_name(sample_data, tmp_path, capsys, key):
    assert main(cli_args(sample_data, tmp_path / "run", f"{key}=1")) == 2
    err = capsys.readouterr().err
    assert "error" in err and key in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given", [["data.views.legacy=true"], ["model.legacy=true"]])
def test_legacy_switches_must_agree(sample_data, tmp_path, capsys, given):
    assert main(cli_args(sample_data, tmp_path / "run", *given)) == 2
    err = capsys.readouterr().err
    assert "data.views.legacy" in err and "model.legacy" in err and "must agree" in err
    assert not (tmp_path / "run").exists()


def test_legacy_switches_together_are_accepted():
    from soco_det.config import build_config
    from soco_det.engine.config import PretrainConfig

    cfg = build_config(PretrainConfig, "tiny_cpu", ["data.views.legacy=true", "model.legacy=true"])
    assert cfg.data.views.legacy and cfg.model.legacy


def test_recipe_must_exist(tmp_path, capsys):
    assert main(["pretrain", "--recipe", "no_such_recipe", "-o", str(tmp_path / "run")]) == 2
    assert "no_such_recipe" in capsys.readouterr().err


def test_shipped_recipes_resolve():
    from soco_det.config import build_config
    from soco_det.engine.config import PretrainConfig

    expected = {  # recipe: (variant, views, depth, epochs, per-GPU batch)
        "soco_fpn_r50_100ep": ("soco_fpn", "soco_fpn", 50, 100, 128),
        "soco_fpn_r50_400ep": ("soco_fpn", "soco_fpn_400", 50, 400, 128),
        "soco_star_r50_400ep": ("soco_star", "soco_star", 50, 400, 128),
        "soco_c4_r50_100ep": ("soco_c4", "soco_c4", 50, 100, 128),
        "tiny_cpu": ("soco_fpn", "soco_fpn", 18, None, None),
    }
    for name, (variant, views, depth, epochs, batch) in expected.items():
        cfg = build_config(PretrainConfig, name)
        assert (cfg.model.variant, cfg.data.views.recipe, cfg.model.depth) == (variant, views, depth), name
        if epochs is not None:
            assert (cfg.train.loop.epochs, cfg.data.batch_size, cfg.train.optim.base_lr) == (epochs, batch, 1.0)
            assert (cfg.train.optim.warmup_epochs, cfg.train.optim.weight_decay, cfg.train.optim.target_momentum) == (
                10,
                1e-5,
                0.99,
            )


def test_device_photometric_path_trains(sample_data, tmp_path):
    """data.photometric=device: the loader sends uint8 views and the trainer finishes them on the device."""
    out = tmp_path / "run"
    assert (
        main(cli_args(sample_data, out, "train.loop.max_steps=2", "data.batch_size=2", "data.photometric=device")) == 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(-8.0 <= r["loss"] <= 8.0 for r in records)  # four -2cos terms: the loss lies in [-8, 8]
