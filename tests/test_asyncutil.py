"""``fastraft.asyncutil.wait_within``: ``asyncio.wait_for`` that never loses its caller's
cancellation (CPython issue 86296, Python 3.10 and 3.11)."""
import asyncio

import pytest

from fastraft.asyncutil import wait_within

from aio import run


async def waiting_on(event, wait):
    """A task inside ``wait(event.wait(), 10)``, a few loop turns in."""
    task = asyncio.ensure_future(wait(event.wait(), 10))
    for _ in range(3):
        await asyncio.sleep(0)
    return task


@run
async def test_a_caller_cancelled_as_the_awaited_finishes_is_cancelled():
    """The event set and the caller cancelled in one loop turn: on Python 3.11,
    ``asyncio.wait_for`` returns the result and the cancellation is gone."""
    event = asyncio.Event()
    task = await waiting_on(event, wait_within)
    event.set()
    task.cancel()
    await asyncio.wait((task,), timeout=5)
    assert task.cancelled()


@run
async def test_a_result_a_timeout_and_a_cancellation():
    event = asyncio.Event()
    task = await waiting_on(event, wait_within)
    event.set()
    assert await task is True
    inner = asyncio.ensure_future(asyncio.Event().wait())
    with pytest.raises(asyncio.TimeoutError):
        await wait_within(inner, 0.01)
    assert inner.cancelled()  # unwound before the timeout is raised, as wait_for does
    inner = asyncio.ensure_future(asyncio.Event().wait())
    task = asyncio.ensure_future(wait_within(inner, 10))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait((task,), timeout=5)
    assert task.cancelled()
    await asyncio.sleep(0)
    assert inner.cancelled()

    async def fails():
        raise ValueError("raised inside")
    with pytest.raises(ValueError, match="raised inside"):
        await wait_within(fails(), 10)


@run
async def test_a_cancelled_caller_goes_on_once_the_awaited_has_unwound():
    """What the awaited thing holds (a lock here) is released by the time the caller's
    cancellation reaches it, as with ``asyncio.wait_for``."""
    lock = asyncio.Lock()
    unwound = asyncio.Event()

    async def holds_the_lock():
        async with lock:
            try:
                await asyncio.Event().wait()
            finally:
                await unwound.wait()  # a cleanup that takes a few loop turns
    task = asyncio.ensure_future(wait_within(holds_the_lock(), 10))
    for _ in range(3):
        await asyncio.sleep(0)
    task.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()  # the caller waits while the awaited thing cleans up
    unwound.set()
    await asyncio.wait((task,), timeout=5)
    assert task.cancelled()
    assert not lock.locked()
