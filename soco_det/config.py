"""Layered, typed configuration.

A config is a tree of dataclasses. Values come in three layers, later layers winning:

1. the dataclass defaults;
2. a recipe file (YAML), either a path or the name of a file in ``soco_det/recipes``; a recipe
   may start from another one with ``_base_: NAME`` (recursively);
3. ``key=value`` overrides from the command line, with dotted keys (``train.optim.base_lr=0.5``) and values
   parsed as YAML (``data.views.geometry.view_sizes=[224,224,112]``, ``train.loop.tensorboard=false``).

Every layer is checked against the schema: an unknown key or a value of the wrong type raises
:class:`ConfigError` with the full dotted name of the key. The resolved config is written next to
a run's outputs with :func:`save_config`, and can be read back with :func:`load_config`.

Keys that moved: a schema class decorated with :func:`moved_keys` lists its old key names and where
they live now (``TrainConfig``: ``max_steps`` -> ``loop.max_steps``). An old key is read at its new
place in every layer (a recipe file, ``key=value``, a run folder's ``config.yaml``), with one
deprecation line per key naming the new one (:func:`upgrade_keys`); the same setting under both
names in one mapping is refused, while on the command line a later ``key=value`` wins as always.
In Python the old names still work as constructor arguments and attributes, with a
``DeprecationWarning``. What is written (``config.yaml``, checkpoints) uses the new keys.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, TypeVar, Union

import yaml

from soco_det.atomic import atomic_write_text
from soco_det.errors import UserError
from soco_det.logs import get_logger

T = TypeVar("T")

log = get_logger(__name__)

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


# ---------------------------------------------------------------------- keys that moved
def moved_keys(table: dict[str, str]) -> Callable[[type[T]], type[T]]:
    """Class decorator for a config dataclass whose fields moved into nested sections: ``table`` maps
    each old name to its new dotted place relative to the class (``{"max_steps": "loop.max_steps"}``).

    :func:`upgrade_keys` (so :func:`from_dict`, :func:`build_config`, :func:`load_config`) reads the
    old names in mappings; in Python, ``Cls(max_steps=2)``, ``cfg.max_steps`` and
    ``cfg.max_steps = 2`` keep working on the new place, each with a ``DeprecationWarning``.
    """

    def decorate(cls: type[T]) -> type[T]:
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for old, new in table.items():
            if old in fields or new.split(".", 1)[0] not in fields:
                raise TypeError(f"{cls.__name__}: moved key {old} -> {new} does not fit its fields")
        cls.MOVED_KEYS = dict(table)  # type: ignore[attr-defined]
        init, setattr_ = cls.__init__, cls.__setattr__

        def warn(old: str) -> None:
            warnings.warn(
                f"{cls.__name__}.{old} is deprecated: use {cls.__name__}.{table[old]}", DeprecationWarning, stacklevel=3
            )

        def locate(obj: Any, old: str) -> tuple[Any, str]:
            *path, last = table[old].split(".")
            for part in path:
                obj = getattr(obj, part)
            return obj, last

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            old_values = {k: kwargs.pop(k) for k in list(kwargs) if k in table}
            init(self, *args, **kwargs)
            for section in {table[k].split(".", 1)[0] for k in old_values}:  # never change a caller's section
                setattr_(self, section, dataclasses.replace(getattr(self, section)))
            for old, value in old_values.items():
                warn(old)
                obj, last = locate(self, old)
                setattr(obj, last, value)

        def __getattr__(self: Any, name: str) -> Any:  # only called when the usual lookup fails
            if name not in table:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            warn(name)
            obj, last = locate(self, name)
            return getattr(obj, last)

        def __setattr__(self: Any, name: str, value: Any) -> None:
            if name not in table:
                setattr_(self, name, value)
                return
            warn(name)
            obj, last = locate(self, name)
            setattr(obj, last, value)

        cls.__init__, cls.__getattr__, cls.__setattr__ = __init__, __getattr__, __setattr__  # type: ignore[method-assign]
        return cls

    return decorate


def _section_types(cls: Any) -> dict[str, Any]:
    """``{field: dataclass type}`` for the fields of ``cls`` that are sections."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _note_moved(old: str, new: str, seen: set[str] | None) -> None:
    if seen is not None and old in seen:
        return
    if seen is not None:
        seen.add(old)
    log.warning("config: %s is deprecated, read as %s (rename it)", old, new)


def upgrade_keys(cls: Any, data: Any, prefix: str = "", seen: set[str] | None = None, quiet: bool = False) -> Any:
    """``data`` (a mapping for schema ``cls``) with every old key of :func:`moved_keys` moved to its new
    place, in ``cls`` and every nested section. Logs one deprecation line per old key (those in
    ``seen`` were logged already; none with ``quiet``); an old key given together with its new key in
    the same mapping is a :class:`ConfigError`. Anything else (unknown keys, types) is left to
    :func:`from_dict`."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = dict(data)
    for old, new in getattr(cls, "MOVED_KEYS", {}).items():
        if old not in data:
            continue
        *path, last = new.split(".")
        node = data
        for part in path:
            node[part] = dict(node[part]) if isinstance(node.get(part), dict) else node.get(part, {})
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"config key {prefix}{part}: expected a mapping, got {node!r}")
        if last in node:
            raise ConfigError(
                f"config keys {prefix}{old} and {prefix}{new} are the same setting (old and new name): give only {prefix}{new}"
            )
        node[last] = data.pop(old)
        if not quiet:
            _note_moved(f"{prefix}{old}", f"{prefix}{new}", seen)
    for name, section in _section_types(cls).items():
        if name in data:
            data[name] = upgrade_keys(section, data[name], f"{prefix}{name}.", seen, quiet)
    return data


def _pop_path(tree: Any, parts: list[str]) -> tuple[bool, Any, Any]:
    """``(found, value, tree without it)`` for the dotted place ``parts``; sections left empty are dropped."""
    if not isinstance(tree, dict) or parts[0] not in tree:
        return False, None, tree
    tree = dict(tree)
    if len(parts) == 1:
        return True, tree.pop(parts[0]), tree
    found, value, sub = _pop_path(tree[parts[0]], parts[1:])
    if found:
        if sub:
            tree[parts[0]] = sub
        else:
            del tree[parts[0]]
    return found, value, tree


def downgrade_keys(cls: Any, data: Any) -> Any:
    """The inverse of :func:`upgrade_keys`: ``data`` with every moved key back at its old place (and
    sections left empty removed). Checkpoints store their config in this layout, that of checkpoint
    format ``soco-det/1``, so that code written for the old keys still reads new checkpoints."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    data = dict(data)
    for name, section in _section_types(cls).items():
        if name in data:
            data[name] = downgrade_keys(section, data[name])
    for old, new in getattr(cls, "MOVED_KEYS", {}).items():
        found, value, data = _pop_path(data, new.split("."))
        if found:
            data[old] = value
    return data


def upgrade_key_path(cls: Any, key: str, seen: set[str] | None = None) -> str:
    """The dotted ``key`` of a ``key=value`` override at its new place (old names of
    :func:`moved_keys` replaced, with one deprecation line each); unknown keys come back as given."""
    parts, done = key.split("."), []
    while parts and dataclasses.is_dataclass(cls):
        moved = getattr(cls, "MOVED_KEYS", {})
        if parts[0] in moved:
            old = ".".join([*done, parts[0]])
            parts = [*moved[parts[0]].split("."), *parts[1:]]
            _note_moved(old, ".".join([*done, *parts]), seen)
        cls = _section_types(cls).get(parts[0])
        done.append(parts.pop(0))
    return ".".join([*done, *parts])


def read_recipe(
    recipe: str | Path, _seen: tuple[Path, ...] = (), schema: Any = None, seen: set[str] | None = None
) -> dict[str, Any]:
    """The recipe's values as a nested dict, with ``_base_`` recipes merged underneath. With a
    ``schema``, old keys of each file are moved to their new places before the merge
    (:func:`upgrade_keys`), so that a file's old key overrides its base's new one."""
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
    if schema is not None:
        try:
            data = upgrade_keys(schema, data, seen=seen)
        except ConfigError as exc:
            raise ConfigError(f"recipe {path}: {exc}") from exc
    if base is None:
        return data
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    base_ref = base_path if base_path.suffix in (".yaml", ".yml") else base
    return merge_dicts(read_recipe(base_ref, _seen + (path,), schema, seen), data)


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge; values of ``top`` win, nested mappings merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: Iterable[str], schema: Any = None, seen: set[str] | None = None) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}``; values are parsed as YAML. With a
    ``schema``, an old key is put at its new place (:func:`upgrade_key_path`): a later item wins
    whichever name each uses."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if schema is not None:
            key = upgrade_key_path(schema, key, seen)
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
    data = upgrade_keys(cls, data, prefix)  # keys that moved (a no-op for what build_config upgraded)
    upgrade = getattr(cls, "upgrade_values", None)  # a section's own changes a move cannot say
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
    """Defaults <- recipe <- ``extra`` (e.g. values from named CLI flags) <- ``key=value`` overrides.
    Old keys (:func:`moved_keys`) are moved to their new places in each layer before the layers
    merge, with one deprecation line per key."""
    seen: set[str] = set()
    data: dict[str, Any] = read_recipe(recipe, schema=cls, seen=seen) if recipe is not None else {}
    if extra:
        data = merge_dicts(data, upgrade_keys(cls, extra, seen=seen))
    data = merge_dicts(data, parse_overrides(overrides, schema=cls, seen=seen))
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
