"""Small asyncio helpers: running a program's loop, calling hooks, failing futures."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on uvloop (plain asyncio where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


async def call_hook(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a hook that may be a plain function or a coroutine function."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def fail_future(fut: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail ``fut`` with ``exc`` unless it is already done (answered or cancelled)."""
    if not fut.done():
        fut.set_exception(exc)
