"""``python -m merge_service`` / ``loramerge-merge-service``: run the merge service until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from loramerge_common.logs import setup_logging
from loramerge_common.server import run_server
from loramerge_common.settings import SettingsError, load_settings
from merge_service.settings import ENV_PREFIX, MergeSettings


async def serve(settings: MergeSettings) -> None:
    from merge_service.server import build_server  # torch and friends: after the flags are parsed

    try:
        server, _ = build_server(settings)
    except (ValueError, OSError) as e:  # unreadable TLS/token files, bad settings
        print(f"loramerge-merge-service: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    await run_server(server)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load_settings(
            MergeSettings, ENV_PREFIX, sys.argv[1:] if argv is None else argv, prog="loramerge-merge-service"
        )
        settings.validate()
        setup_logging(settings.log_level, settings.log_format)
    except (SettingsError, ValueError) as e:
        print(f"loramerge-merge-service: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
