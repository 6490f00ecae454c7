"""Small asyncio helpers: running a program's loop, calling hooks, failing futures."""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine
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


async def wait_within(aw: Awaitable[T], timeout: float | None) -> T:
    """``asyncio.wait_for(aw, timeout)``: the result of ``aw``, or, once ``timeout``
    seconds have passed, ``asyncio.TimeoutError`` after ``aw`` is cancelled. Without
    ``wait_for``'s flaw on Python 3.10 and 3.11 (CPython issue 86296): a caller cancelled
    just as ``aw`` finishes got the result and the cancellation was lost, so a loop
    around the call went on when told to stop. Here the caller is cancelled, and so is
    ``aw``; the caller's cancellation is raised once ``aw`` has unwound (as ``wait_for``
    does), so what it held is released when the caller goes on."""
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait((fut,), timeout=timeout)
    except asyncio.CancelledError:
        fut.cancel()
        await asyncio.wait((fut,))
        if not fut.cancelled():
            fut.exception()  # finished as it was cancelled: its error is not news
        raise
    if not done:
        fut.cancel()
        await asyncio.wait((fut,))  # until it has unwound, as wait_for does
        if fut.cancelled():
            raise asyncio.TimeoutError()
    return fut.result()
