"""What this installation holds: the client distribution alone, or the services' engine beside it.

``pip install ./clients`` gives every remote command; the offline ones run the merge engine, which
ships with the services' distribution (torch and all), and the eval charts and tune need the
``eval`` extra. A command that needs a missing part says in one line what to install (exit 2).
"""

from __future__ import annotations

import importlib.util

from loramerge.errors import FailedPrecondition

ENGINE_HINT = "pip install loramerge (the services' distribution: the repository root), which brings torch"
EVAL_HINT = "pip install 'loramerge-client[eval]' (matplotlib, optuna, pyyaml)"


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def require_engine(command: str) -> None:
    """FailedPrecondition naming what to install when the merge engine (merge_service) is absent."""
    if not has_module("merge_service") or not has_module("torch"):
        raise FailedPrecondition(
            f"{command} runs the merge engine on this machine, which the client does not include: "
            f"{ENGINE_HINT}",
            field="install",
        )


def require_extra(command: str, *modules: str) -> None:
    missing = [m for m in modules if not has_module(m)]
    if missing:
        raise FailedPrecondition(
            f"{command} needs {', '.join(missing)}, not installed: {EVAL_HINT}", field="install"
        )
