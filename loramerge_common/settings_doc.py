"""Configuration tables for README, generated from the settings dataclasses so they cannot drift.

``python -m loramerge_common.settings_doc`` rewrites the blocks between
``<!-- settings:NAME -->`` and ``<!-- /settings:NAME -->`` in README.md; a test fails when the
README's tables differ from what this module generates.
"""

from __future__ import annotations

import dataclasses
import re
import sys
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


def tables() -> dict[str, str]:
    from inference_service.settings import ENV_PREFIX as INFERENCE_PREFIX
    from inference_service.settings import InferenceSettings
    from merge_service.settings import ENV_PREFIX as MERGE_PREFIX
    from merge_service.settings import MergeSettings

    return {
        "merge": markdown_table(MergeSettings, MERGE_PREFIX),
        "inference": markdown_table(InferenceSettings, INFERENCE_PREFIX),
    }


def render(readme: str) -> str:
    """``readme`` with every settings block replaced by the generated table."""
    for name, table in tables().items():
        pattern = re.compile(rf"(<!-- settings:{name} -->\n).*?(<!-- /settings:{name} -->)", re.S)
        if not pattern.search(readme):
            raise ValueError(f"README has no <!-- settings:{name} --> block")
        readme = pattern.sub(lambda m, t=table: f"{m.group(1)}{t}\n{m.group(2)}", readme)
    return readme


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("README.md")
    text = path.read_text()
    new = render(text)
    if new != text:
        path.write_text(new)
        print(f"{path}: settings tables updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
