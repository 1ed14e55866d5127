"""Turn SIGTERM/SIGINT into an asyncio.Event, so a server drains instead of dying mid-stream."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_stop_signals(
    event: asyncio.Event, signals: Iterable[signal.Signals] = STOP_SIGNALS
) -> list[signal.Signals]:
    """Set ``event`` on each of ``signals``; a second signal restores the default action, so a
    stuck drain can still be interrupted. Returns the signals installed (none off the main thread)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        if event.is_set():
            log.warning("second %s: giving up the graceful shutdown", sig.name)
            for s in installed:
                loop.remove_signal_handler(s)
            signal.raise_signal(sig)
            return
        log.info("received %s: draining", sig.name)
        event.set()

    for sig in signals:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without signals
        installed.append(sig)
    return installed


def remove_stop_signals(signals: Iterable[signal.Signals]) -> None:
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.remove_signal_handler(sig)
