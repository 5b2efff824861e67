"""Typed, nested run configs: dataclasses, YAML files and dotted command-line overrides.

Every verb takes `--config FILE key.sub=value ...`. Unknown keys are rejected with the closest valid one.
A field's help lives once, in its `metadata["help"]`; `describe()` prints keys, defaults and help for `--help`.
A renamed key stays loadable through its class's `ALIASES` ({old dotted key: new dotted key}).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prefkd.console import console
from prefkd.errors import ConfigError

T = TypeVar("T")


def opt(default: Any, help: str, keyed: bool = True) -> Any:
    """A dataclass field with a default and one line of help. `keyed=False` marks a setting that says where results
    go, not what is computed (trackers, a Hub repo): it is left out of run and stage keys (`stages.settings`) and
    changing it never makes a run directory hold "other settings" (`stages.unkeyed`)."""
    metadata = {"help": help, "keyed": keyed}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str = "", keyed: bool = True) -> Any:
    return dataclasses.field(default_factory=cls, metadata={"help": help, "keyed": keyed})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _choices(typ: Any) -> list[str]:
    """What a value of `typ` may be, in a config file's words (true, false, auto, int, ...)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        return [c for a in typing.get_args(typ) for c in (["null"] if a is type(None) else _choices(a))]
    if origin is typing.Literal:
        return [str(c) for c in typing.get_args(typ)]
    if typ is bool:
        return ["true", "false"]
    return [getattr(typ, "__name__", str(typ))]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        choices = _choices(typ)
        raise ConfigError(f"config key '{key}': expected {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")
    if origin is typing.Literal:
        # type() as well as ==: a YAML 1 or true must not pass for a choice that equals it (1 == True)
        for choice in typing.get_args(typ):
            if type(value) is type(choice) and value == choice:
                return choice
        raise ConfigError(f"config key '{key}': expected one of {', '.join(_choices(typ))}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(typ) or (Any,)
        if isinstance(value, str):  # "10,20,30" on the command line
            value = [yaml.safe_load(v) for v in value.split(",") if v]
        elif not isinstance(value, list):  # a single item
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if typ is Any:
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"config key '{key}': expected {getattr(typ, '__name__', typ)}, got {value!r}")


def from_dict(cls: type[T], data: dict, prefix: str = "", base: Any = None) -> T:
    """Build `cls` from a nested dict, rejecting unknown keys (with a suggestion) and wrong types.

    Keys not in `data` keep the value of `base` (an instance), else the field's own default; a nested section
    starts from its field's default (e.g. the demo's `teacher_train`), so overriding one key keeps the others."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {data!r}")
    data = _renamed(data, getattr(cls, "ALIASES", {}), prefix)
    hints, fields = _hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            default = getattr(base, key) if base is not None else field_default(fields[key])
            kwargs[key] = from_dict(typ, value or {}, f"{full}.", default)
        else:
            kwargs[key] = _coerce(value, typ, full)
    if base is not None:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def _renamed(data: dict, aliases: dict[str, str], prefix: str) -> dict:
    """`data` with the old keys of a class's `ALIASES` ({old dotted key: new dotted key}, relative to the class)
    moved to their new names, so saved configs still load; each one found prints a deprecation message."""
    data = copy.deepcopy(data) if aliases else data
    for old, new in aliases.items():
        *parents, leaf = old.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if parents and not node:  # an emptied old section (e.g. `pref`) is not a key of the new class
            _pop_path(data, parents)
        *new_parents, new_leaf = new.split(".")
        target = data
        for p in new_parents:
            target = target.setdefault(p, {})
        if new_leaf in target:
            raise ConfigError(f"config keys '{prefix}{old}' and '{prefix}{new}' are the same setting: give only "
                              f"'{prefix}{new}'")
        target[new_leaf] = value
        console.print(f"[yellow]deprecated:[/] config key '{prefix}{old}' is now '{prefix}{new}'; the old name "
                      "still works but will be removed", soft_wrap=True)
    return data


def _pop_path(data: dict, parts: list[str]) -> None:
    node = data
    for p in parts[:-1]:
        node = node[p]
    node.pop(parts[-1])


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML scalars) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = value
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict | None = None) -> T:
    """Defaults < `base` < YAML file < overrides."""
    data: dict = dict(base or {})
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        data = _merge(data, loaded)
    data = apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def describe(cls: type, prefix: str = "", base: Any = None) -> list[str]:
    """One line per key: `key = default  help`, for `--help` (defaults as the verb really uses them)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name) if base is not None else field_default(f)
        if dataclasses.is_dataclass(_hints(cls)[f.name]):
            lines += describe(_hints(cls)[f.name], f"{prefix}{f.name}.", default)
            continue
        lines.append(f"{prefix}{f.name} = {default!r}  {f.metadata.get('help', '')}".rstrip())
    return lines
