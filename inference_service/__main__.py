"""``python -m inference_service`` / ``loramerge-inference-service``: run the inference service.

Flags override environment variables (LORAMERGE_INFERENCE_*); ``--help`` lists them all. Exits 3
when the vLLM engine died while serving (with exit_on_engine_death), so that it is restarted.
"""

from __future__ import annotations

import asyncio
import sys

from inference_service.recipes import RecipeError, load_recipes
from inference_service.server import EngineDied, serve
from inference_service.settings import ENV_PREFIX, InferenceSettings
from loramerge_common.logs import setup_logging
from loramerge_common.settings import SettingsError, load_settings

EXIT_ENGINE_DIED = 3


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load_settings(
            InferenceSettings,
            ENV_PREFIX,
            sys.argv[1:] if argv is None else argv,
            prog="loramerge-inference-service",
        )
    except SettingsError as e:
        sys.exit(f"loramerge-inference-service: {e}")
    if not settings.model:
        sys.exit("loramerge-inference-service: --model (LORAMERGE_INFERENCE_MODEL) is required")
    try:
        load_recipes(settings.recipes)  # checked before anything starts: one line naming recipe and field
    except RecipeError as e:
        sys.exit(f"loramerge-inference-service: {e}")
    setup_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except EngineDied as e:
        print(f"loramerge-inference-service: {e}", file=sys.stderr)
        sys.exit(EXIT_ENGINE_DIED)


if __name__ == "__main__":
    main()
