"""What the logs of node processes a test started must not hold."""
from __future__ import annotations

#: Lines asyncio puts between a log record and its traceback.
_CONTEXT = ("handle:", "task:", "future:", "exception:")


def tracebacks(logs: dict[int, str]) -> list[str]:
    """Every traceback in the logs (node id -> its log's text), as its log record and its
    last line: an exception nothing handled (an event loop callback's, a task's), which no
    fault may cause."""
    found = []
    for i, text in logs.items():
        lines = text.splitlines()
        for k, line in enumerate(lines):
            if line.startswith("Traceback (most recent call last)"):
                record = next((t for t in reversed(lines[:k])
                               if t[:1] not in ("", " ") and not t.startswith(_CONTEXT)), "?")
                last = next((t for t in lines[k + 1:] if not t.startswith(" ")), "?")
                found.append(f"node {i}: {record[:160]} ... {last}")
    return found
