"""The config layer: recipe defaults, key=value overrides, rejected unknown keys and wrong types."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from soco_det.config import ConfigError, build_config, from_dict, load_config, parse_overrides, save_config


@dataclasses.dataclass
class Inner:
    size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)
    mode: Literal["all_levels", "assigned_level"] = "all_levels"

    def validate(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")


@dataclasses.dataclass
class Outer:
    name: str = "run"
    lr: float = 1.0
    amp: bool = False
    steps: Optional[int] = None
    sizes: list[int] = dataclasses.field(default_factory=lambda: [224, 112])
    inner: Inner = dataclasses.field(default_factory=Inner)


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_recipe_and_overrides_layer_in_order(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"lr": 2.0, "inner": {"size": 112}})
    cfg = build_config(Outer, recipe, ["inner.mode=assigned_level", "lr=0.5", "sizes=[96,48]", "steps=10"])
    assert cfg.lr == 0.5  # override beats recipe
    assert cfg.inner.size == 112  # recipe beats default
    assert cfg.inner.scale == (0.5, 1.0)  # default kept
    assert cfg.inner.mode == "assigned_level"
    assert cfg.sizes == [96, 48] and cfg.steps == 10 and cfg.name == "run"


def test_base_recipe_is_merged_underneath(tmp_path):
    write(tmp_path / "base.yaml", {"lr": 3.0, "amp": True, "inner": {"size": 64}})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "inner": {"mode": "assigned_level"}})
    cfg = build_config(Outer, child)
    assert (cfg.lr, cfg.amp, cfg.inner.size, cfg.inner.mode) == (3.0, True, 64, "assigned_level")


@pytest.mark.parametrize(
    "override, key",
    [("inner.sise=3", "inner.sise"), ("learning_rate=1", "learning_rate"), ("inner.size.x=1", "inner.size")],
)
def test_unknown_key_is_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(Outer, None, [override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("inner.size=abc", "inner.size"),
        ("inner.size=1.5", "inner.size"),
        ("amp=3", "amp"),
        ("lr=fast", "lr"),
        ("sizes=[1,x]", r"sizes\[1\]"),
        ("inner.mode=sometimes", "inner.mode"),
        ("inner.scale=[0.5]", "inner.scale"),
    ],
)
def test_wrong_type_is_rejected_by_name(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config(Outer, None, [override])


def test_unknown_key_in_recipe_is_rejected(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"inner": {"colour": 1}})
    with pytest.raises(ConfigError, match=r"inner\.colour"):
        build_config(Outer, recipe)


def test_validate_errors_name_the_section():
    with pytest.raises(ConfigError, match="inner: scale"):
        build_config(Outer, None, ["inner.scale=[0.9,0.1]"])


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = build_config(Outer, None, ["lr=2", "steps=null"])
    assert cfg.lr == 2.0 and isinstance(cfg.lr, float) and cfg.steps is None


def test_malformed_override_and_missing_recipe():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="no_such_recipe"):
        build_config(Outer, "no_such_recipe")


def test_resolved_config_round_trips_through_the_run_folder(tmp_path):
    cfg = build_config(Outer, None, ["inner.size=96", "sizes=[1,2,3]"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(Outer, path) == cfg
    assert not list((tmp_path / "run").glob(".*tmp"))  # atomic write left no temporary file


def test_from_dict_rejects_non_mapping_section():
    with pytest.raises(ConfigError, match="inner"):
        from_dict(Outer, {"inner": 5})
