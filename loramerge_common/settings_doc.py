"""Configuration tables for README, generated from the settings dataclasses so they cannot drift.

``make readme-settings`` (``python -m loramerge_common.settings_doc README.md NAME=MODULE:CLASS ...``)
rewrites the blocks between ``<!-- settings:NAME -->`` and ``<!-- /settings:NAME -->`` in README.md from
each named settings class (its module's ``ENV_PREFIX`` gives the variables' prefix); a test fails when
the README's tables differ. The services are named by the caller: this shared package imports neither.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from loramerge_common.settings import env_name, flag_name, format_byte_size


def markdown_table(cls: type, prefix: str) -> str:
    """One row per setting: environment variable, flag, default, meaning."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.metadata.get("byte_size") and isinstance(default, int) and default:
            shown = format_byte_size(default)
        elif f.metadata.get("secret") or default is None or default == "":
            shown = ""
        else:
            shown = str(default)
        shown = f"`{shown}`" if shown else "—"
        meaning = str(f.metadata.get("help", "")).replace("|", "\\|")
        rows.append(f"| `{env_name(prefix, f.name)}` | `{flag_name(f.name)}` | {shown} | {meaning} |")
    return "\n".join(rows)


def load_class(target: str) -> tuple[type, str]:
    """``"module:Class"`` → (the class, its module's ``ENV_PREFIX``)."""
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name), module.ENV_PREFIX


def render(readme: str, settings: Mapping[str, tuple[type, str]]) -> str:
    """``readme`` with the block of each name in ``settings`` (name → (class, env prefix)) replaced by
    the generated table."""
    for name, (cls, prefix) in settings.items():
        table = markdown_table(cls, prefix)
        pattern = re.compile(rf"(<!-- settings:{name} -->\n).*?(<!-- /settings:{name} -->)", re.S)
        if not pattern.search(readme):
            raise ValueError(f"README has no <!-- settings:{name} --> block")
        readme = pattern.sub(lambda m, t=table: f"{m.group(1)}{t}\n{m.group(2)}", readme)
    return readme


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not all("=" in a and ":" in a for a in argv[1:]):
        print(
            "usage: python -m loramerge_common.settings_doc README.md NAME=MODULE:CLASS ...", file=sys.stderr
        )
        return 2
    path = Path(argv[0])
    settings = {name: load_class(target) for name, _, target in (a.partition("=") for a in argv[1:])}
    text = path.read_text()
    new = render(text, settings)
    if new != text:
        path.write_text(new)
        print(f"{path}: settings tables updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
