"""Log lines for events a stranger can trigger at will: one line, never a flood."""
from __future__ import annotations

import logging
import time


class Throttle:
    """Logs a warning at most once per ``interval`` seconds per key (a peer address, a
    node id); the next line that gets through says how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 max_keys: int = 4096) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[object, tuple[float, int]] = {}

    def warning(self, key: object, msg: str, *args: object) -> None:
        now = time.monotonic()
        last, held = self._last.get(key, (float("-inf"), 0))
        if now - last < self.interval:
            self._last[key] = (last, held + 1)
            return
        if len(self._last) >= self.max_keys:
            self._last.clear()  # bounded: many keys means a flood; start over
        self._last[key] = (now, 0)
        if held:
            msg += f" ({held} more like it in the last {now - last:.0f}s)"
        self.logger.warning(msg, *args)
