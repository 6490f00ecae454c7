"""The simulator's nemesis: what the network, the disks and the clocks suffer in a run
(``Faults``), and the shapes of its partitions."""
from __future__ import annotations

import random

import msgspec


class Faults(msgspec.Struct, kw_only=True, frozen=True):
    """What the network and the nodes suffer. Probabilities are per message or per event."""

    drop: float = 0.05
    duplicate: float = 0.03
    min_delay: float = 0.0005
    max_delay: float = 0.015
    #: Mean seconds between partitions, and how long one lasts (0 disables).
    partition_every: float = 1.0
    partition_for: float = 0.6
    #: Mean seconds between crashes, and how long a node stays down (0 disables).
    crash_every: float = 1.2
    down_for: float = 0.4
    #: Delay of a simulated fsync.
    min_fsync: float = 0.0002
    max_fsync: float = 0.004
    #: Delay of a read of entries that left a leader's memory (``ReadLog``), and the
    #: chance that it fails.
    min_read: float = 0.0001
    max_read: float = 0.002
    read_fail: float = 0.0
    #: Leader flapping (the Figure 8 nemesis): the chance that a node that just won an
    #: election, or a leader sending entries of an earlier term than its own, is cut off
    #: from every other node, and (half the time) crashed, soon after (within
    #: ``flap_within`` seconds of an election, a round trip of such a send): leaders that
    #: replicate to a minority, then lose to a node of a later term, again and again.
    flap_leader: float = 0.0
    flap_within: float = 0.02
    #: The chance that a leader that appends the entry that ends a change (C_new, §6)
    #: and sends it at once to a node that change removes is lost for good: crashed as
    #: it flushes those sends (each leaves or not, at random), never restarted, and
    #: left out of the final convergence check. One node at most in a run: the one
    #: failure a cluster must survive, at the worst moment of a change (C_new held by
    #: some nodes only: a removed one among them may be the only node able to win,
    #: thesis §4.1).
    lose_at_change: float = 0.0
    #: The chance that a membership change removing a voter picks one that is down, when
    #: one is (an operator removing a dead node): the leader's farewell to it is lost,
    #: and it learns it is out, or not, when it comes back and campaigns.
    remove_down: float = 0.0
    #: The chance that a membership change, when there are learners, removes one
    #: (with ``remove_down``, one that is down if any): one that missed its farewell
    #: learns it is out only by asking (a pre-vote).
    remove_learners: float = 0.0
    #: The chance that a partition is one-way: one side's messages to the other are
    #: lost, the other side's arrive (a broken link in one direction).
    one_way: float = 0.0
    #: Slow disks: the chance that an fsync takes ``slow_fsync`` seconds instead.
    slow_fsync_chance: float = 0.0
    slow_fsync: float = 0.2
    #: Crashes between write and sync: the chance that a crash leaves some of the
    #: unsynced writes on disk (a random prefix of them, as a kernel flushing its cache
    #: in order would), and that a crash picks a node with writes in flight.
    torn_crash: float = 0.0
    #: The chance that a crash of a leader is a clean stop instead: it resigns first
    #: (``Engine.resign``: TimeoutNow to its fullest voter, a heartbeat to the others),
    #: as ``RaftNode.stop`` does.
    graceful_stop: float = 0.0
    #: Clock drift: each node's clock runs at a rate drawn from [1 - clock_drift,
    #: 1 + clock_drift] (at each start); its timers and its read lease measure time by
    #: it (leases need ``Config(lease_reads=True)``).
    clock_drift: float = 0.0
    #: Mean seconds between clock skews (0 disables): the leader's clock slows to
    #: 1 - clock_drift and every other node's speeds up to 1 + clock_drift, the worst
    #: case for a leader's lease (it outlives the followers' promise not to vote).
    skew_every: float = 0.0
    #: Mean seconds between leadership transfers (0 disables): the leader is asked to
    #: hand over to another voter picked at random (``Engine.transfer_leadership``,
    #: thesis §3.10), while it keeps being proposed to.
    transfer_every: float = 0.0
    #: The chance that a transfer is a rolling restart's instead: a node picked at
    #: random steps down (``Engine.leaving``, as ``RaftNode.step_down`` sets it: it
    #: declines leadership handed to it) and stops cleanly within 0.2 s, for
    #: ``down_for``. A leader hands over to its successor first; to a follower, half the
    #: time, the leader hands leadership (as a host's balancer might), which it declines.
    leaving: float = 0.0
    #: The chance that a leader that hands over (sends ``TimeoutNow``) stops hearing the
    #: others while they still hear it, for ``partition_for``: it learns of its
    #: successor late, the worst case for a read lease (the successor's election skips
    #: the followers' promise not to vote, thesis §3.10).
    deafen_on_handover: float = 0.0
    #: The chance that a crash also damages the node's log, which it restarts repaired
    #: (``FileStorage(repair=True)``, docs/storage.md "Repairing a node"): the log cut
    #: at a random entry after its floor, the commit mark lowered to what it holds,
    #: ``recovering`` set, term and vote kept. As that page asks, one node at a time,
    #: with no membership change under way (``_may_damage``). Memory disks only.
    damage: float = 0.0
    #: The chance that a partition is a bridge (Jepsen's nemesis): one node, picked at
    #: random, still talks with both sides, which do not talk to each other.
    bridge: float = 0.0
    #: The chance that a bridge partition bounces its bridge, the shape that tests the
    #: vote promise a read lease rests on (§4.2.3, §6.4.1): the leader on the smaller side,
    #: the bridge a follower whose answers keep its lease, crashed just before the far
    #: side's first election timer runs out and restarted before it, on the far side
    #: only (its links to the leader not back yet), where a node cut off from the
    #: leader campaigns and asks it for a vote.
    bounce: float = 0.0
    #: The chance that a partition puts the leader and every learner on one side, with
    #: as many voters as leaves the other side a majority of the voters: learners do
    #: not count toward a quorum (thesis §4.2.1), so the leader's side commits nothing
    #: and the other side elects a leader of its own.
    learner_side: float = 0.0


NO_FAULTS = Faults(drop=0, duplicate=0, partition_every=0, crash_every=0)


#: The side of a bridge partition's bridge node: it hears and is heard by both sides.
BRIDGE = 2
#: A bounced bridge crashes up to this many seconds before the far side's first election
#: timer runs out, and restarts before it (``Faults.bounce``).
BOUNCE_LEAD = 0.02


def random_partition(rng: random.Random, node_ids: list[int]) -> dict[int, int]:
    """Nodes split into two non-empty sides at random: node id -> side (0 or 1)."""
    ids = list(node_ids)
    rng.shuffle(ids)
    cut = rng.randint(1, len(ids) - 1)
    return {i: (0 if k < cut else 1) for k, i in enumerate(ids)}
