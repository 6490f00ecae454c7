"""``RaftNode``: runs the engine on an asyncio (uvloop) event loop.

Events (messages, proposals, reads, timer expirations, completed writes) are fed to the
engine as they happen. The first message or proposal of an idle loop iteration is acted
on at once (latency); the engine's commands for everything else that arrives in that
iteration are drained together once, so it shares one storage write and one message per
peer (batching).

The parts, one module each: ``raftnode`` (the public class: lifecycle, client API,
inbound messages), ``runner`` (runs the engine's commands; timers), ``writer`` (durable
writes in order, group commit), ``applier`` (the state machine's task; snapshots taken),
``transfer`` (snapshot chunks sent and received), ``reads`` (ReadIndex and leases),
``logreader`` (the log read back from storage), ``membership`` (membership changes and
their fate), ``observe`` (status, metrics, health), ``metrics`` (the counters and their
values) and ``arguments`` (checks of the ids and addresses users pass in).
"""
from fastraft.node.raftnode import RaftNode

__all__ = ["RaftNode"]
