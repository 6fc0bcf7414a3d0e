"""Configuration: YAML files and named presets, `key.sub=value` overrides, typed schemas.

    cfg = load_config(TrainConfig, "tiny", ["lr=1e-3", "distributed.strategy=fsdp"], kind="train")

`source` is a YAML path or a preset name under `configs/<kind>/`. Values are coerced to the
dataclass field types; an unknown key is a `ConfigError` with a "did you mean" suggestion, a
wrong type names the key, the expected type and where the value came from (file:line or the
override). Nested dataclasses are nested mappings in YAML and dotted keys in overrides.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from llmctl.core.registry import did_you_mean
from llmctl.errors import ConfigError

T = TypeVar("T")

# Config kinds with a typed schema ("module:Class", imported lazily by `config show`).
SCHEMAS: dict[str, str] = {
    "model": "llmctl.core.model.config:ModelConfig",
    "train": "llmctl.core.train.config:TrainConfig",
    "prune": "llmctl.core.prune.config:PruneConfig",
    "finetune": "llmctl.core.train.finetune_config:FinetuneConfig",
    "quantize": "llmctl.core.quant.config:QuantizeConfig",
    "distill": "llmctl.core.train.config:TrainConfig",
}


def configs_dir() -> Path:
    """The directory of shipped presets: `configs/`, linked into the package as `llmctl/configs`."""
    return Path(__file__).resolve().parent / "configs"


def list_presets(kind: str) -> list[str]:
    """Preset names available for `kind` (e.g. 'model', 'train')."""
    folder = configs_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def preset_path(name: str, kind: str) -> Path:
    """Resolve a preset name or a YAML path; ConfigError (with suggestions) if neither exists."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if not path.is_file():
            raise ConfigError(f"config file {name} not found")
        return path
    candidate = configs_dir() / kind / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    presets = list_presets(kind)
    raise ConfigError(
        f"unknown {kind} preset '{name}'{did_you_mean(name, presets)}; "
        f"available: {', '.join(presets) or 'none'} (or give a .yaml path)"
    )


# ----------------------------------------------------------------------------------------
# Reading YAML with origins


class Source(dict):
    """A nested mapping of raw values plus `origins`: dotted key → 'file:line' or 'override'."""

    def __init__(self, data: dict | None = None, origins: dict[str, str] | None = None):
        super().__init__(data or {})
        self.origins: dict[str, str] = origins or {}


def read_yaml(path: str | os.PathLike) -> Source:
    """Parse a YAML mapping, remembering the line of every key."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text, so not a YAML config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    origins: dict[str, str] = {}
    _collect_lines(node, "", str(path), origins)
    return Source(data, origins)


def _collect_lines(node: Any, prefix: str, filename: str, out: dict[str, str]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = f"{filename}:{key_node.start_mark.line + 1}"
            _collect_lines(value_node, key + ".", filename, out)


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' → ('a.b', parsed value); values are YAML scalars/lists ('[1, 2]')."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(source: Source, overrides: list[str]) -> Source:
    """Set dotted keys in `source` (in place) from `key=value` strings."""
    for text in overrides:
        key, value = parse_override(text)
        node: dict = source
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value
        source.origins[key] = f"override '{text}'"
    return source


def resolve(source: str | None, overrides: list[str], kind: str) -> Source:
    """Load a preset/file (or nothing) and apply overrides: the raw, untyped result."""
    base = read_yaml(preset_path(source, kind)) if source else Source()
    return apply_overrides(base, list(overrides))


# ----------------------------------------------------------------------------------------
# Typed schemas


def load_config(schema: type[T], source: str | None, overrides: list[str] | None = None, kind: str = "") -> T:
    """Resolve `source` + `overrides` into an instance of the dataclass `schema`."""
    raw = resolve(source, overrides or [], kind)
    return build(schema, raw, raw.origins)


def build(schema: type[T], data: dict, origins: dict[str, str] | None = None, prefix: str = "") -> T:
    """Instantiate dataclass `schema` from a nested mapping, coercing and checking every value."""
    origins = origins or {}
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{dotted}'{did_you_mean(key, fields)}{_where(origins, dotted)}"
            )
        kwargs[key] = coerce(value, hints[key], dotted, origins)
    try:
        return schema(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {prefix.rstrip('.') or schema.__name__} config: {exc}") from None


def _where(origins: dict[str, str], key: str) -> str:
    origin = origins.get(key)
    return f" (from {origin})" if origin else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str, origins: dict[str, str] | None = None) -> Any:
    """Convert `value` to type `tp` or raise ConfigError naming `key`, the type and the origin."""
    origins = origins or {}

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(
            f"config key '{key}': expected {_type_name(tp)}, got {value!r}{extra}{_where(origins, key)}"
        )

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key, origins)
            except ConfigError:
                continue
        raise fail()
    if origin is Literal:
        if value in args:
            return value
        raise fail(did_you_mean(str(value), [str(a) for a in args]))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail()
        return build(tp, value, origins, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise fail()
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]", origins) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if value in (0, 1):
            return bool(value)
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise fail() from None
            if number.is_integer():
                return int(number)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if tp is type(None):
        if value is None:
            return None
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def to_dict(config: Any) -> Any:
    """A dataclass config (possibly nested) as plain data, for YAML/JSON/lineage."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def schema_for(kind: str) -> type | None:
    """The dataclass schema registered for a config kind, or None for an untyped kind."""
    target = SCHEMAS.get(kind)
    if target is None:
        return None
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
