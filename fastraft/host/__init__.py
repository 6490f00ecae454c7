"""``RaftHost``: many Raft groups in one process over one transport (multi-Raft).

The parts, one module each: ``rafthost`` (the public class: groups created and removed,
the liveness exchange between hosts, status and health), ``balance`` (leadership spread
over the hosts), ``cachebudget`` (a host's log cache budget shared by its awake groups)
and ``sums`` (the groups' counters summed for ``metrics``).
"""
from fastraft.host.balance import BALANCE_SCAN, preferred_leader
from fastraft.host.cachebudget import CACHE_LOAD_INTERVAL
from fastraft.host.rafthost import (
    DEFAULT_MAX_CAMPAIGNS,
    DEFAULT_QUIESCE_AFTER,
    EARLY_GROUPS,
    EARLY_SENDERS,
    METRICS_CHUNK,
    RaftHost,
)
from fastraft.messages import MAX_GROUP_ID

__all__ = ["BALANCE_SCAN", "CACHE_LOAD_INTERVAL", "DEFAULT_MAX_CAMPAIGNS",
           "DEFAULT_QUIESCE_AFTER", "EARLY_GROUPS", "EARLY_SENDERS", "MAX_GROUP_ID",
           "METRICS_CHUNK", "RaftHost", "preferred_leader"]
