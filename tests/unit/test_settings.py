"""Settings from flags, environment and defaults (loramerge_common.settings)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from loramerge_common.server import ServerSettings
from loramerge_common.settings import (
    GiB,
    MiB,
    SettingsError,
    describe,
    load_settings,
    parse_byte_size,
    setting,
)


@dataclass(frozen=True)
class Demo(ServerSettings):
    listen: str = setting("0.0.0.0:50099", "where")
    cache_bytes: int = setting(512 * MiB, "cache", byte_size=True)
    ratio: float = setting(0.5, "a float")
    enabled: bool = setting(False, "a bool")
    root: Path | None = setting(None, "a path")
    name: str | None = setting(None, "optional text")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("512MiB", 512 * MiB),
        ("2GB", 2_000_000_000),
        ("1.5 GiB", int(1.5 * GiB)),
        ("10k", 10_000),
        ("3Ki", 3072),
    ],
)
def test_parse_byte_size(text: str, expected: int) -> None:
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "12 parsecs", "-5", "1e9"])
def test_parse_byte_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="byte size"):
        parse_byte_size(text)


def test_defaults_when_nothing_is_set() -> None:
    s = load_settings(Demo, "T_", [], {})
    assert s == Demo()
    assert s.listen == "0.0.0.0:50099"  # a subclass overrides a base default
    assert s.grace_seconds == 30.0


def test_env_then_flag_precedence_and_types() -> None:
    env = {
        "T_CACHE_BYTES": "1GiB",
        "T_RATIO": "0.25",
        "T_ENABLED": "yes",
        "T_ROOT": "/tmp/adapters",
        "T_NAME": "x",
        "T_LISTEN": "127.0.0.1:1",
        "UNRELATED": "1",
    }
    s = load_settings(Demo, "T_", ["--listen", "127.0.0.1:2", "--no-enabled", "--name", ""], env)
    assert s.cache_bytes == GiB
    assert s.ratio == 0.25
    assert s.enabled is False  # the flag beats the variable
    assert s.root == Path("/tmp/adapters")
    assert s.name is None  # empty text clears an optional
    assert s.listen == "127.0.0.1:2"


def test_bad_value_names_flag_variable_and_value() -> None:
    with pytest.raises(SettingsError, match=r"T_CACHE_BYTES.*cache_bytes.*'lots'"):
        load_settings(Demo, "T_", [], {"T_CACHE_BYTES": "lots"})
    with pytest.raises(SettingsError, match=r"--ratio.*'abc'"):
        load_settings(Demo, "T_", ["--ratio", "abc"], {})
    with pytest.raises(SettingsError, match="T_ENABLED"):
        load_settings(Demo, "T_", [], {"T_ENABLED": "maybe"})


def test_unknown_flag_exits() -> None:
    with pytest.raises(SystemExit):
        load_settings(Demo, "T_", ["--no-such-flag", "1"], {})


def test_secrets_are_not_described() -> None:
    s = load_settings(Demo, "T_", [], {"T_AUTH_TOKEN": "hunter2"})
    assert s.auth_token == "hunter2"
    described = describe(s)
    assert described["auth_token"] == "***"
    assert "hunter2" not in repr(described)
    bad = {"T_AUTH_TOKEN": "hunter2", "T_GRACE_SECONDS": "soon"}
    with pytest.raises(SettingsError) as info:
        load_settings(Demo, "T_", [], bad)
    assert "hunter2" not in str(info.value)
