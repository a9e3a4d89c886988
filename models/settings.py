"""Typed TOML settings: frozen dataclass sections whose fields carry their own rules and docs.

Both the device (agent/config.py) and the fleet (fleet/config.py) parse their
configuration through these functions, so a value is coerced, range-checked and
reported the same way on both sides, and both README tables come from the same
field metadata. Each side keeps its own sections, error class, environment
prefix and cross-field checks.

Supported field types: bool, int, float, str, Path and tuple[str, ...]. An
environment value is a string, so it is converted ("yes"/"no", "8883",
"a, b"); a TOML value must already have the right type.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping

ErrorType = type[ValueError]


class SettingsError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def option(default: Any, doc: str, **rules: Any) -> Any:
    """A dataclass field with validation rules (min, max, choices) and a doc line."""
    return dataclasses.field(default=default, metadata={"doc": doc, **rules})


def unknown(kind: str, name: str, allowed: list[str], error: ErrorType = SettingsError) -> ValueError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return error(f"unknown {kind} '{name}'{hint}; allowed: {', '.join(sorted(allowed))}")


def coerce(key: str, value: Any, kind: Any, from_env: bool, error: ErrorType = SettingsError) -> Any:
    """Turn a TOML or environment value into the field's type, or say what is allowed."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and str(value).strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).strip().lower() in ("1", "true", "yes", "on")
        raise error(f"{key}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if kind is float:
                return float(value)
            if isinstance(value, int):
                return value
        elif from_env:
            try:
                return kind(str(value).strip())
            except ValueError:
                pass
        raise error(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise error(f"{key}: expected a string, got {value!r}")
    if kind is Path:
        if isinstance(value, str) and value:
            return Path(value).expanduser()
        raise error(f"{key}: expected a non-empty path, got {value!r}")
    if typing.get_origin(kind) is tuple:
        if from_env and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise error(f"{key}: expected a list of strings, got {value!r}")
    raise error(f"{key}: unsupported type {kind}")  # pragma: no cover - programming error


def check_rules(key: str, value: Any, meta: Mapping[str, Any], error: ErrorType = SettingsError) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise error(f"{key}: expected one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise error(f"{key}: must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise error(f"{key}: must be <= {meta['max']}, got {value!r}")


def section_types(config_cls: type, exclude: tuple[str, ...] = ()) -> dict[str, type]:
    """{section name: section class} of a top-level config dataclass."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls) if f.name not in exclude}


def build_section(name: str, cls: type, raw: Mapping[str, Any], env: Mapping[str, str], *,
                  env_prefix: str, error: ErrorType = SettingsError) -> Any:
    """One section from its TOML table and its environment overrides ({key: string})."""
    if not isinstance(raw, Mapping):
        raise error(f"{name}: expected a [{name}] table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in list(raw) + list(env):
        if key not in fields:
            raise unknown("key", f"{name}.{key}", [f"{name}.{k}" for k in fields], error)
    values: dict[str, Any] = {}
    for key, f in fields.items():
        if key in env:
            label = f"{name}.{key} (from {env_prefix}{name.upper()}_{key.upper()})"
            value = coerce(label, env[key], hints[key], True, error)
        elif key in raw:
            value = coerce(f"{name}.{key}", raw[key], hints[key], False, error)
        else:
            continue
        check_rules(f"{name}.{key}", value, f.metadata, error)
        values[key] = value
    try:
        return cls(**values)
    except ValueError as exc:  # a section's own __post_init__ check
        raise error(str(exc)) from None


def read_toml(path: Path, error: ErrorType = SettingsError) -> dict[str, Any]:
    """The parsed file, or one clear line saying why not."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(f"config file {path}: not found") from None
    except PermissionError:
        raise error(f"config file {path}: permission denied") from None
    except IsADirectoryError:
        raise error(f"config file {path}: is a directory") from None
    except OSError as exc:
        raise error(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"config file {path}: invalid TOML: {exc}") from None


def type_name(kind: Any) -> str:
    return "list of strings" if typing.get_origin(kind) is tuple else getattr(kind, "__name__", str(kind))


def reference_rows(sections: Mapping[str, type]) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every key: the README tables and the example files."""
    rows = []
    for name, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append((f"{name}.{f.name}", type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return rows
