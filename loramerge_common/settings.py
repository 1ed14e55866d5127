"""Declare a service's settings once, as a dataclass; read them from flags, environment and defaults.

Each dataclass field becomes a command-line flag (``cache_memory_bytes`` -> ``--cache-memory-bytes``)
and an environment variable (prefix + upper-case name, ``LORAMERGE_MERGE_CACHE_MEMORY_BYTES``).
A flag beats the environment, which beats the default. Values are parsed by the field's type:
``int``, ``float``, ``bool``, ``str``, ``Path`` and ``X | None`` (an empty string or "none" gives
None). Fields declared with ``setting(..., byte_size=True)`` accept "512MiB", "2GB", "1.5 GiB" or a
plain integer. ``setting(..., secret=True)`` keeps the value out of ``describe()`` (logs).

Example::

    @dataclass(frozen=True)
    class MySettings(ServerSettings):          # ServerSettings: listen, TLS, auth, logging...
        listen: str = setting("0.0.0.0:50070", "host:port to serve gRPC on")
        cache_bytes: int = setting(256 * MiB, "memory cache bound", byte_size=True)

    settings = load_settings(MySettings, prefix="LORAMERGE_MINE_", argv=sys.argv[1:])
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

KiB = 1024
MiB = 1024**2
GiB = 1024**3

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": KiB,
    "kib": KiB,
    "mi": MiB,
    "mib": MiB,
    "gi": GiB,
    "gib": GiB,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting's value could not be parsed; the message names the flag, the variable and the value."""


def parse_byte_size(text: str | int) -> int:
    """Bytes from "512MiB", "2GB", "1.5 GiB", "4096" (SI units are powers of 1000, *iB of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 4096, 512MiB, 2GB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    return int(value)


def format_byte_size(n: int) -> str:
    """A short human form, e.g. 1536 -> "1.5KiB"."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n}B"


def setting(default: Any, help: str, *, byte_size: bool = False, secret: bool = False) -> Any:
    """A dataclass field carrying its help text and parsing hints (use as the field's default)."""
    meta = {"help": help, "byte_size": byte_size, "secret": secret}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(prefix: str, field_name: str) -> str:
    return prefix + field_name.upper()


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parse_value(raw: str, tp: Any, *, byte_size: bool) -> Any:
    base, optional = _unwrap_optional(tp)
    if optional and raw.strip().lower() in ("", "none", "null"):
        return None
    if base is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"not a boolean: {raw!r} (use true/false)")
    if base is int:
        return parse_byte_size(raw) if byte_size else int(raw.strip())
    if base is float:
        return float(raw.strip())
    if base is Path:
        return Path(raw).expanduser()
    if base is str:
        return raw
    raise TypeError(f"unsupported setting type {tp!r}")


def build_parser(cls: type, prefix: str, *, prog: str | None = None, description: str | None = None):
    """The argparse parser for ``cls``: one flag per field, help naming the variable and the default."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        base, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        shown = "***" if f.metadata.get("secret") and default else default
        help_text = f"{f.metadata.get('help', '')} [env {env_name(prefix, f.name)}; default {shown}]"
        if base is bool:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=argparse.SUPPRESS, metavar="VALUE", help=help_text
            )
    return parser


def load_settings(
    cls: type[T],
    prefix: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
) -> T:
    """Settings of type ``cls`` from ``argv`` (flags), then ``environ`` (default ``os.environ``), then
    the field defaults. ``argv=None`` reads no flags (not ``sys.argv``: callers pass that explicitly).
    Raises SettingsError naming the flag/variable and the bad value; argparse exits on unknown flags."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    parser = build_parser(cls, prefix, prog=prog, description=description)
    ns = vars(parser.parse_args(list(argv or [])))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        env = env_name(prefix, f.name)
        byte_size = bool(f.metadata.get("byte_size"))
        if f.name in ns:
            raw, origin = ns[f.name], flag_name(f.name)
        elif env in environ:
            raw, origin = environ[env], env
        else:
            continue
        if isinstance(raw, bool):
            values[f.name] = raw
            continue
        try:
            values[f.name] = _parse_value(raw, hints[f.name], byte_size=byte_size)
        except ValueError as e:
            shown = "***" if f.metadata.get("secret") else repr(raw)
            raise SettingsError(f"{origin} (setting {f.name}) got {shown}: {e}") from None
    return cls(**values)


def describe(settings: Any) -> dict[str, Any]:
    """Field values for a startup log line, secrets replaced by "***" (unset secrets stay None)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.metadata.get("secret") and value:
            value = "***"
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
    return out
