"""Run a test coroutine on uvloop (when installed) with a hard deadline."""
import asyncio
import functools

try:
    import uvloop
except ImportError:  # pragma: no cover - Windows
    uvloop = None


def run(coro_fn):
    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        async def bounded():
            return await asyncio.wait_for(coro_fn(*args, **kwargs), 60)
        if uvloop is not None:
            return uvloop.run(bounded())
        return asyncio.run(bounded())
    return wrapper
