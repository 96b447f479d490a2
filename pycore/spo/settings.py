"""Resolving an SPO configuration from a preset, a config file, command-line options and KEY=VALUE pairs.

Precedence (later wins): the preset (``--preset``, else the config file's ``preset`` key, else the
base model's family) → the config file (JSON or TOML, any SPOConfig field) → explicit options →
``--set KEY=VALUE`` pairs (values parsed as JSON when they parse, else taken as strings).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pycore.spo.config import PRESETS, SPOConfig, SPOConfigError, from_preset


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON or TOML file holding SPOConfig fields (and optionally ``preset``)."""
    p = Path(path)
    if not p.is_file():
        raise SPOConfigError(f"config file {p} not found")
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SPOConfigError(f"config file {p} is not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise SPOConfigError(f"config file {p} must hold an object of option names and values")
    if isinstance(data.get("spo"), dict) and len(data) == 1:  # allow a [spo] table in TOML
        data = data["spo"]
    data.pop("memory_plan", None)  # a run's spo_config.json records its memory plan next to the options
    return data


def _expected(field: dataclasses.Field) -> tuple[tuple[type, ...], bool]:
    ann = str(field.type)
    optional = "None" in ann
    if ann.startswith("list"):
        return (list,), optional
    for name, types in (("bool", (bool,)), ("int", (int,)), ("float", (int, float)), ("str", (str,))):
        if ann.split(" |")[0].strip() == name:
            return types, optional
    return (object,), optional


def check_types(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Reject unknown names and values of the wrong type (e.g. lora_rank = "64") with one line."""
    fields = {f.name: f for f in dataclasses.fields(SPOConfig)}
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k not in fields:
            close = [n for n in fields if k.replace("-", "_") == n or k in n][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SPOConfigError(f"{where}: unknown SPO option {k!r}{hint}; see `hw spo-train --list-options`")
        types, optional = _expected(fields[k])
        if v is None and optional:
            out[k] = None
            continue
        if isinstance(v, bool) and bool not in types:
            raise SPOConfigError(f"{where}: {k} must be {types[0].__name__}, got {v!r}")
        if float in types and isinstance(v, int):
            v = float(v)
        if not isinstance(v, types):
            raise SPOConfigError(f"{where}: {k} must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
        if isinstance(v, list) and not all(isinstance(x, str) for x in v):
            raise SPOConfigError(f"{where}: {k} must be a list of strings")
        out[k] = v
    return out


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings → a dict; VALUE as JSON if it parses (1e-5, true, null, ["to_q"]), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SPOConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def resolve_config(
    *,
    family: str | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> tuple[SPOConfig, str]:
    """The resolved config and the name of the preset it started from."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = load_config_file(config_file)
    file_preset = file_values.pop("preset", None)
    name = preset or file_preset or family or "sdxl"
    if name not in PRESETS:
        raise SPOConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    changes: dict[str, Any] = {}
    changes.update(check_types(file_values, f"config file {config_file}"))
    changes.update(check_types({k: v for k, v in (options or {}).items() if v is not None}, "option"))
    changes.update(check_types(parse_sets(sets), "--set"))
    cfg = from_preset(name, **changes)
    if family is not None and cfg.model_family != family:
        raise SPOConfigError(f"the base model is {family} but the configuration is for {cfg.model_family} (preset {name!r}); "
                             f"use --preset {family}")  # fmt: skip
    return cfg, name


def explicit_fields(*, config_file: str | Path | None = None, options: Mapping[str, Any] | None = None,
                    sets: Sequence[str] = ()) -> frozenset[str]:
    """The option names the user set (config file, options, --set): `--memory auto` never changes these."""
    names = set(load_config_file(config_file)) - {"preset"} if config_file is not None else set()
    names |= {k for k, v in (options or {}).items() if v is not None}
    names |= set(parse_sets(sets))
    return frozenset(names)


def options_table() -> list[tuple[str, str, str]]:
    """(name, official default of the sdxl preset, help) for every option — `--list-options`."""
    sdxl = from_preset("sdxl").to_dict()
    return [(f.name, json.dumps(sdxl[f.name]), f.metadata.get("help", "")) for f in dataclasses.fields(SPOConfig)]
