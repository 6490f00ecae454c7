"""Log lines: throttled ones for events a stranger can trigger at will (one line, never a
flood), and a JSON format for shipping the events the node logs with stable ``extra`` keys
(``event`` names what happened: docs/operations.md lists them)."""
from __future__ import annotations

import json
import logging
import time
from typing import Any

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message",
                                                                             "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the ``extra`` keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record), "level": record.levelname,
            "logger": record.name, "message": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class Throttle:
    """Logs a warning at most once per ``interval`` seconds per key (a peer address, a
    node id); the next line that gets through says how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 max_keys: int = 4096) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[object, tuple[float, int]] = {}

    def warning(self, key: object, msg: str, *args: object,
                extra: dict[str, Any] | None = None) -> None:
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
        if extra is not None and held:
            extra = {**extra, "held_back": held}
        self.logger.warning(msg, *args, extra=extra)
