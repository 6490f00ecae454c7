"""Run a test coroutine on uvloop (when installed) with a hard deadline."""
import asyncio
import functools

from fastraft.asyncutil import wait_within

try:
    import uvloop
except ImportError:  # pragma: no cover - Windows
    uvloop = None


def run(coro_fn=None, *, deadline: float = 60.0):
    """``@run``, or ``@run(deadline=S)`` for a test whose own length is set from outside
    (``FASTRAFT_DRIVER_SECONDS``): the hard deadline must outlast it."""
    if coro_fn is None:
        return functools.partial(run, deadline=deadline)

    @functools.wraps(coro_fn)
    def wrapper(*args, **kwargs):
        async def bounded():
            return await wait_within(coro_fn(*args, **kwargs), deadline)
        if uvloop is not None:
            return uvloop.run(bounded())
        return asyncio.run(bounded())
    return wrapper


async def until(predicate, what: str, timeout: float = 30.0) -> None:
    """Poll the coroutine function ``predicate`` until it returns true; ``TimeoutError``
    naming ``what`` after ``timeout`` seconds."""
    async def poll():
        while not await predicate():
            await asyncio.sleep(0.02)
    try:
        await wait_within(poll(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"no {what} within {timeout:.0f}s") from None


async def until_applied(clients, index: int, timeout: float = 30.0) -> None:
    """Poll the ``status`` of every KV client's node until each has applied ``index``;
    ``TimeoutError`` after ``timeout`` seconds."""
    async def caught_up():
        return all([(await c.status())["applied_index"] >= index for c in clients])
    await until(caught_up, f"node applying {index}", timeout)


async def until_knows_leader(client, node: int, leader: int, timeout: float = 10.0) -> None:
    """Poll node ``node``'s status through ``client`` until it names ``leader``: a node
    that started (or restarted) last may not have heard from the leader yet, and then
    rightly answers not_leader without one."""
    async def knows():
        return (await client.status())["leader_id"] == leader
    await until(knows, f"node {node} knowing leader {leader}", timeout)


async def put_retrying(clients, key):
    """Put ``key`` through whoever leads; an election in between (ProposalDropped, not
    leader, a closed connection) means it may or may not be in: write it again."""
    from fastraft.kvclient import ClientError, find_leader

    while True:
        leader = await find_leader(clients)
        try:
            return await clients[leader].put(key, key.encode())
        except (ClientError, ConnectionError):
            continue


#: The errors of a request that an election got in the way of (a change of a deposed
#: leader may still be in progress on it).
LEADERSHIP_CHANGED = ("not_leader", "ProposalDropped", "MembershipChangeInProgress")


async def change_membership_retrying(clients, change, voters, learners=()):
    """Make the membership ``voters`` / ``learners`` with ``change(client)`` on whoever
    leads. An election in between (``LEADERSHIP_CHANGED``, a closed connection) means
    the change may or may not have happened: read the leader's membership, and change it
    again if it is not there. A change that returns is there. Returns the leader that
    showed it."""
    from fastraft.kvclient import ClientError, find_leader

    def there(m):
        return m["voters"] == sorted(voters) and m["learners"] == sorted(learners)

    while True:
        leader = await find_leader(clients)
        try:
            if there((await clients[leader].status())["membership"]):
                return leader
            await change(clients[leader])
            m = (await clients[leader].status())["membership"]
            assert there(m), f"node {leader} returned from the change, and shows {m}"
            return leader
        except ClientError as exc:
            if not exc.error.startswith(LEADERSHIP_CHANGED):
                raise
        except ConnectionError:
            pass


async def refusal_retrying(clients, call):
    """The ``ClientError`` that ``call(client)`` on whoever leads is refused with, asked
    again while an election gets in the way."""
    from fastraft.kvclient import ClientError, find_leader

    while True:
        leader = await find_leader(clients)
        try:
            await call(clients[leader])
        except ClientError as exc:
            if not exc.error.startswith(LEADERSHIP_CHANGED):
                return exc
            continue
        except ConnectionError:
            continue
        raise AssertionError(f"node {leader} did not refuse it")
