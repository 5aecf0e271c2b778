"""Typed configs: dataclasses checked on construction, loaded from YAML/TOML plus CLI flags.

Every command has one config dataclass (`kw_only=True, slots=True`), each field declared
with `option(default, "help line")`. A config is built from, in increasing priority, the
dataclass defaults, a `--config FILE` (YAML or TOML; either the fields at top level or
under a section named after the command), and the flags the user gave. A misspelt key or
a value of the wrong type is a `KdpipeError` naming the key, the file and what was
expected. Each run writes the resolved config next to its outputs (`write_resolved`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, get_args, get_origin

import yaml

from kdpipe.schemas.errors import KdpipeError

C = TypeVar("C")


def option(default: Any, help: str) -> Any:
    """A config field with a default and a one-line help text (shown by `--help`)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def required(help: str) -> Any:
    """A config field the user must give."""
    return dataclasses.field(metadata={"help": help})


def field_help(cls: type, name: str) -> str:
    """The help line of a config field, for CLI option help."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "none")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; convert only where lossless (int → float, str → Path)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except KdpipeError as err:
                errors.append(err)
        raise KdpipeError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise KdpipeError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise KdpipeError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise KdpipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise KdpipeError(f"{where}: expected a section of {tp.__name__} options, got {value!r}")
        return from_dict(tp, value, where=where)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise KdpipeError(f"{where}: expected a path, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KdpipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KdpipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise KdpipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise KdpipeError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config annotation {tp!r} at {where}")


def from_dict(cls: type[C], data: Mapping[str, Any], *, where: str = "config") -> C:
    """Build config `cls` from a mapping, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
        raise KdpipeError(f"{where}: unknown key '{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}: {name}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise KdpipeError(f"{where}: missing required option '{missing[0]}' ({fields[missing[0]].metadata.get('help', '')})")
    return cls(**kwargs)


def load_config_file(path: Path, section: str | None = None) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config; take `section` if the file has one."""
    path = Path(path)
    if path.is_dir():
        raise KdpipeError(f"config file {path} is a directory; pass the YAML or TOML file inside it")
    if not path.is_file():
        raise KdpipeError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KdpipeError(f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML or TOML") from None
    except OSError as err:
        raise KdpipeError(f"config file {path} cannot be read ({err.strerror}); check its permissions") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise KdpipeError(f"config file {path}: use a .yaml, .yml or .toml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0]
        raise KdpipeError(f"config file {path} is not valid {path.suffix[1:].upper()}: {first}") from None
    if not isinstance(data, dict):
        raise KdpipeError(f"config file {path}: expected a mapping of options at top level")
    if section is not None and isinstance(data.get(section), dict):
        return data[section]
    return data


def resolve(cls: type[C], *, config_file: Path | None, flags: Mapping[str, Any], section: str) -> C:
    """Defaults < config file < flags the user gave (`None` means not given)."""
    data: dict[str, Any] = {}
    where = "options"
    if config_file is not None:
        data.update(load_config_file(config_file, section))
        where = f"config {config_file}"
    data.update({k: v for k, v in flags.items() if v is not None})
    return from_dict(cls, data, where=where)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, JSON-serialisable dict of a config (paths as strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def write_resolved(config: Any, path: Path) -> None:
    """Write the resolved config as YAML next to a run's outputs (re-loadable with --config)."""
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def config_hash(config: Any) -> str:
    """A short stable hash of a config, for fingerprints."""
    import hashlib

    blob = json.dumps(to_dict(config), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
