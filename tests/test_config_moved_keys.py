"""Keys that moved into sections (train.optim/loop/probe, data.views.geometry/boxes/photometric/levels):
the old names still read everywhere, with one deprecation line each, and what is written uses the new ones."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import yaml
from engine_fixtures import pretrain_cli_args, sample_data  # noqa: F401 - fixture

from soco_det.commands.main import main
from soco_det.config import ConfigError, build_config, downgrade_keys, load_config, to_dict, upgrade_keys
from soco_det.data.config import VIEWS_MOVED_KEYS, ViewBoxes, ViewsConfig
from soco_det.engine.config import TRAIN_MOVED_KEYS, LoopConfig, PretrainConfig, TrainConfig
from soco_det.probe.network import read_run_config


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


class _Records(logging.Handler):
    """The records of the ``soco_det`` logger (which stops propagating once the CLI set up logging)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_Records":
        logging.getLogger("soco_det").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("soco_det").removeHandler(self)

    def lines(self, text: str = "is deprecated, read as") -> list[str]:
        return [r.getMessage() for r in self.records if text in r.getMessage()]


def test_every_old_key_reads_into_its_new_field():
    """All 60 flat keys (34 of train, 26 of data.views), each given with a value other than the default where one is easy to write."""
    base = to_dict(PretrainConfig())
    for section, table in (("train", TRAIN_MOVED_KEYS), ("data.views", VIEWS_MOVED_KEYS)):
        for old, new in table.items():
            value = _get(PretrainConfig(), f"{section}.{new}")
            if isinstance(value, bool):
                value = not value
            elif isinstance(value, int) and value > 0:
                value = value + 1
            cfg = build_config(PretrainConfig, overrides=[f"{section}.{old}={yaml.safe_dump(value).strip()}"])
            assert _get(cfg, f"{section}.{new}") == value, (old, new)
    assert to_dict(build_config(PretrainConfig)) == base


def test_old_keys_in_each_layer_and_one_deprecation_line_per_key(tmp_path):
    recipe = tmp_path / "old.yaml"
    # an old-key recipe on top of a shipped (new-key) one: its old keys override the base's new ones
    recipe.write_text(
        "_base_: tiny_cpu\ntrain:\n  epochs: 7\n  warmup_epochs: 1\n  probe_tasks: [rank]\n"
        "data:\n  views:\n    view_sizes: [96, 96, 48]\n    cutout_prob: 0.25\n"
    )
    with _Records() as got:
        cfg = build_config(
            PretrainConfig,
            recipe,
            ["train.max_steps=3", "train.epochs=9", "data.views.jitter_prob=0.0"],
            extra={"train": {"device": "cpu"}},
        )
    assert cfg.train.loop.epochs == 9  # the override wins over the recipe, both under the old name
    assert (cfg.train.optim.warmup_epochs, cfg.train.probe.tasks, cfg.train.loop.max_steps) == (1.0, ["rank"], 3)
    assert cfg.train.loop.device == "cpu"
    assert cfg.data.views.geometry.view_sizes == [96, 96, 48] and cfg.data.views.photometric.cutout_prob == 0.25
    assert cfg.data.views.boxes.jitter_prob == 0.0
    assert cfg.train.loop.ckpt_every == 200  # untouched values of the base recipe stay
    lines = got.lines()
    expected = {
        "train.epochs": "train.loop.epochs",
        "train.warmup_epochs": "train.optim.warmup_epochs",
        "train.probe_tasks": "train.probe.tasks",
        "data.views.view_sizes": "data.views.geometry.view_sizes",
        "data.views.cutout_prob": "data.views.photometric.cutout_prob",
        "train.max_steps": "train.loop.max_steps",
        "data.views.jitter_prob": "data.views.boxes.jitter_prob",
        "train.device": "train.loop.device",
    }
    assert sorted(lines) == sorted(f"config: {o} is deprecated, read as {n} (rename it)" for o, n in expected.items())
    with _Records() as got:
        build_config(PretrainConfig, "tiny_cpu", ["train.loop.max_steps=3"])
    assert got.lines() == []  # the shipped recipes use the new keys


def test_old_and_new_name_of_one_setting_in_one_mapping_is_refused(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("train:\n  max_steps: 2\n  loop:\n    max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"both.yaml.*train.max_steps and train.loop.max_steps.*give only"):
        build_config(PretrainConfig, both)
    with pytest.raises(ConfigError, match=r"data.views.padding_k and data.views.boxes.padding_k"):
        upgrade_keys(PretrainConfig, {"data": {"views": {"padding_k": 4, "boxes": {"padding_k": 8}}}})
    # on the command line a later key=value wins, whichever name it uses (as for any repeated key)
    assert build_config(PretrainConfig, overrides=["train.loop.epochs=40", "train.epochs=60"]).train.loop.epochs == 60
    assert build_config(PretrainConfig, overrides=["train.epochs=60", "train.loop.epochs=40"]).train.loop.epochs == 40


def test_python_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="TrainConfig.max_steps is deprecated: use TrainConfig.loop.max_steps"):
        train = TrainConfig(max_steps=2, loop=LoopConfig(epochs=5))
    assert (train.loop.max_steps, train.loop.epochs) == (2, 5)
    with pytest.warns(DeprecationWarning):
        train.log_every = 7
    with pytest.warns(DeprecationWarning):
        assert train.log_every == 7 == train.loop.log_every
    with pytest.warns(DeprecationWarning):
        other = dataclasses.replace(train, ckpt_every=5)
    assert other.loop.ckpt_every == 5 and train.loop.ckpt_every == 1000  # the original is not changed
    with pytest.warns(DeprecationWarning):
        views = ViewsConfig(padding_k=8, select_k=6)
    assert views.boxes == ViewBoxes(padding_k=8, select_k=6)
    with pytest.raises(AttributeError):
        train.no_such_key  # noqa: B018


def test_written_config_uses_new_keys_and_checkpoints_keep_the_format_1_layout():
    cfg = build_config(PretrainConfig, "tiny_cpu")
    written = to_dict(cfg)
    assert set(written["train"]) == {"optim", "loop", "probe"}
    assert set(written["data"]["views"]) == {"recipe", "geometry", "boxes", "photometric", "levels", "legacy"}
    flat = downgrade_keys(PretrainConfig, written)
    assert len(flat["train"]) == 34 and flat["train"]["probe_every"] == 0 and "loop" not in flat["train"]
    # 28 keys of format 1, and geometry.fit_objects / fit_box_side (issue 16) flat beside them
    assert flat["data"]["views"]["view_sizes"] == [64, 64, 32] and len(flat["data"]["views"]) == 30
    assert upgrade_keys(PretrainConfig, flat, quiet=True) == written


def test_an_old_run_folder_still_loads_and_resumes(sample_data, tmp_path):
    run = tmp_path / "run"
    assert main(pretrain_cli_args(sample_data, run, "train.loop.max_steps=2")) == 0
    new = yaml.safe_load((run / "config.yaml").read_text())
    cfg = load_config(PretrainConfig, run / "config.yaml")
    # the run folder of an older soco-det: config.yaml with the flat keys
    (run / "config.yaml").write_text(yaml.safe_dump(downgrade_keys(PretrainConfig, new), sort_keys=False))
    with _Records() as got:
        assert read_run_config(run) == cfg  # what probe and export read
    assert "config: train.max_steps is deprecated, read as train.loop.max_steps (rename it)" in got.lines()
    with _Records() as got:
        assert read_run_config(run / "checkpoints" / "last.pt") == cfg  # a checkpoint's own (flat) config
    assert got.lines() == []  # quietly: the user did not write those keys
    # resuming with the old key on the command line: continues, and compares the checkpoint's flat
    # config at its new places (no "config differs" for keys that only moved)
    with _Records() as got:
        assert main(pretrain_cli_args(sample_data, run, "train.max_steps=3", "--resume", "auto")) == 0
    assert got.lines("config differs") == [] and len(got.lines("resumed from")) == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["loop"]["max_steps"] == 3  # rewritten, new keys
