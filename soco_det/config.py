"""Layered, typed configuration.

A config is a tree of dataclasses. Values come in three layers, later layers winning:

1. the dataclass defaults;
2. a recipe file (YAML), either a path or the name of a file in ``soco_det/recipes``; a recipe
   may start from another one with ``_base_: NAME`` (recursively);
3. ``key=value`` overrides from the command line, with dotted keys (``train.lr=0.5``) and values
   parsed as YAML (``data.sizes=[224,112]``, ``train.amp=false``).

Every layer is checked against the schema: an unknown key or a value of the wrong type raises
:class:`ConfigError` with the full dotted name of the key. The resolved config is written next to
a run's outputs with :func:`save_config`, and can be read back with :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union

import yaml

from soco_det.atomic import atomic_write_text
from soco_det.errors import UserError

T = TypeVar("T")

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(UserError, ValueError):
    """A config value or key that does not fit the schema. The message names the key."""


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe given as a file path, or as the name of a shipped recipe."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = RECIPE_DIR / f"{recipe}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(
        f"recipe {str(recipe)!r} is neither a YAML file nor a shipped recipe "
        f"(shipped: {', '.join(recipe_names()) or 'none'})"
    )


def read_recipe(recipe: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The recipe's values as a nested dict, with ``_base_`` recipes merged underneath."""
    path = resolve_recipe_path(recipe)
    if path in _seen:
        raise ConfigError(f"recipe {path} includes itself through _base_")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must hold a mapping at the top level")
    base = data.pop("_base_", None)
    if base is None:
        return data
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    base_ref = base_path if base_path.suffix in (".yaml", ".yml") else base
    return merge_dicts(read_recipe(base_ref, _seen + (path,)), data)


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge; values of ``top`` win, nested mappings merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is given both as a value and a section")
        node[parts[-1]] = value
    return tree


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; keys missing in ``data`` come from ``base`` or defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    upgrade = getattr(cls, "upgrade_keys", None)  # a section's renamed keys, from older config files
    if callable(upgrade):
        data = upgrade(dict(data))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} "
            f"(known keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))})"
        )
    kwargs: dict[str, Any] = {}
    for name in fields:
        key = f"{prefix}{name}"
        current = getattr(base, name) if base is not None else None
        if name not in data:
            if base is not None:
                kwargs[name] = current
            continue
        kwargs[name] = _coerce(hints[name], data[name], key, current)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, current: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, current)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key {key}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        base = current if dataclasses.is_dataclass(current) else None
        return from_dict(tp, value, prefix=f"{key}.", base=base)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key {key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list form of a config (tuples become lists), for YAML and checkpoints."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def build_config(
    cls: type[T],
    recipe: str | Path | None = None,
    overrides: Iterable[str] = (),
    extra: dict[str, Any] | None = None,
) -> T:
    """Defaults <- recipe <- ``extra`` (e.g. values from named CLI flags) <- ``key=value`` overrides."""
    data: dict[str, Any] = read_recipe(recipe) if recipe is not None else {}
    if extra:
        data = merge_dicts(data, extra)
    data = merge_dicts(data, parse_overrides(overrides))
    return from_dict(cls, data)


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``out_dir`` (atomically) and return the file's path."""
    path = Path(out_dir) / name
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    atomic_write_text(path, text)
    return path


def load_config(cls: type[T], path: str | Path) -> T:
    """Read back a config written by :func:`save_config`."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return from_dict(cls, data)
