"""Cheap coercion of plain command-line values, so a command does not pay for Pydantic.

Typer (≥ 0.26) coerces every parameter through a Pydantic ``TypeAdapter`` that it builds on first
use: importing Pydantic and building one adapter per parameter costs ~0.1–0.4 s before any
command runs, which is most of `hw --help` and a large part of a fast `hw bucket`. The values
``hw`` takes are almost all plain: an int or float written in decimal, a string, a path, a flag.
:func:`install` gives each such parameter a coercer that handles exactly those plain forms and
hands *anything else* (another spelling, an out-of-range number, an unusual type) to Typer's own
adapter, so results and error messages stay Typer's. tests/test_cli_startup.py checks both
against Typer's adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typer._click.core import Parameter
from typer._coercion import RuntimeParam, build_runtime_param
from typer._param_types import coerce_cli_path, lenient_issubclass, routes_to_path

_INT = re.compile(r"-?[0-9]{1,18}", re.ASCII)
_FLOAT = re.compile(r"-?[0-9]{1,15}(?:\.[0-9]{1,15})?", re.ASCII)


@dataclass(frozen=True)
class FastParam(RuntimeParam):
    """A parameter's coercion: plain values here, everything else through Typer's adapter."""

    kind: str = ""

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        fast = self._fast(value, param, ctx)
        if fast is not _SLOW:
            return fast
        # Not a plain value (or out of range): Typer's own coercion decides, with its messages.
        return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)

    def _fast(self, value: Any, param: Any, ctx: Any) -> Any:
        info, kind = self.parameter_info, self.kind
        if kind == "bool":
            return value if type(value) is bool else _SLOW
        if kind == "str":
            return value if type(value) is str else _SLOW
        if kind in ("int", "float"):
            if type(value) is str:
                if not (_INT if kind == "int" else _FLOAT).fullmatch(value):
                    return _SLOW
                value = int(value) if kind == "int" else float(value)
            elif not (type(value) is int or (kind == "float" and type(value) is float)):
                return _SLOW
            if kind == "float":
                value = float(value)
            if (info.min is not None and value < info.min) or (info.max is not None and value > info.max):
                return _SLOW
            return value
        if kind == "path" and type(value) is str and value:
            # Typer would turn the str into the annotation's Path type through Pydantic, which
            # for a non-empty str is the constructor; the checks (exists, file/dir, ...) are Typer's.
            path_type = info.path_type or self.annotation
            return coerce_cli_path(path_type(value), info, path_type=path_type, param=param, ctx=ctx)
        return _SLOW


_SLOW = object()


def kind_of(param: Any) -> str | None:
    """The plain kind of a Typer parameter ("bool", "str", "int", "float", "path"), or None."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None or desc.file_annotation is not None:
        return None
    info, ann = desc.parameter_info, desc.annotation
    if info.parser is not None or getattr(info, "click_type", None) is not None:
        return None
    if ann is bool:
        return "bool"
    if ann is str:
        return "str"
    if ann in (int, float):
        return None if info.clamp else ann.__name__
    if lenient_issubclass(ann, Path) and routes_to_path(ann, info):
        path_type = info.path_type or ann
        return "path" if lenient_issubclass(path_type, Path) else None
    return None


def install(params: list[Parameter]) -> None:
    """Give every plain Typer parameter of ``params`` the fast coercion (once)."""
    for p in params:
        if getattr(p, "_runtime_param", "absent") is not None:
            continue  # not a Typer parameter, or already set up
        kind = kind_of(p)
        if kind is not None:
            desc = p.type_descriptor  # type: ignore[attr-defined]
            p._runtime_param = FastParam(desc.parameter_info, desc.annotation, kind)  # type: ignore[attr-defined]
