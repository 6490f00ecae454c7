"""The simulator's nemeses: how the faults of ``Faults`` are inflicted on a run —
membership churn (removing voters that are down, too), crashes (torn writes, damaged
logs, planned stops), partitions (one-way, bridged, bounced, the leader with its
learners), leader flapping, a leader lost for good mid-change, leadership transfers and
clock skew — and the network's fate of each message. ``Simulator`` runs them; they
act on its nodes through ``_boot``, ``_execute`` and ``_transmit``."""
from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from fastraft.engine import AppendLog, Role, Send, Timer, write_order
from fastraft.errors import FastRaftError
from fastraft.messages import AppendEntries, EntryKind, HardState, decode_membership
from fastraft.testing.faults import BOUNCE_LEAD, BRIDGE, Faults, random_partition
from fastraft.testing.simdisks import Disk
from fastraft.testing.simnode import EventQueue, SimNode


def _c_new_sent(c: Any) -> tuple[int, bool]:
    """If ``c`` sends the entry that ends a change, C_new (§6): its index, and whether
    it goes to a node it removes; else (0, False)."""
    if type(c) is Send and type(c.message) is AppendEntries:
        for e in c.message.entries:
            if e.kind == EntryKind.CONFIG:
                m = decode_membership(e.data)
                if not m.joint:
                    return e.index, c.to not in m.members
    return 0, False


class Nemeses(EventQueue):
    """The fault events of a ``Simulator`` (see the module docstring)."""

    faults: Faults
    nodes: dict[int, SimNode]
    stats: dict[str, int]
    reconfigure_every: float
    #: The sides of the partition in force (None: none), and whether it is one-way.
    _partition: dict[int, int] | None
    _one_way: bool
    #: False once the run heals: no more faults.
    _faults_on: bool
    _repairing: set[int]
    _lost: int | None
    # the Simulator's: start a node, run an engine's commands, send a message
    _boot: Callable[[SimNode], None]
    _execute: Callable[[SimNode, list[Any]], None]
    _transmit: Callable[[int, int, Any], None]

    def _ev_reconfigure(self) -> None:
        """Membership churn: add a learner, promote one, remove a voter (maybe the
        leader), or replace a voter — whatever the current configuration allows — or
        (``Faults.remove_learners``) remove a learner."""
        self._schedule(self._exp(self.reconfigure_every), "reconfigure")
        if not self._faults_on or self._repairing and self._still_repairing():
            # no membership change while a repaired node recovers (docs/storage.md)
            return
        leaders = [n for n in self.nodes.values() if n.alive and n.engine.role == Role.LEADER]
        if not leaders:
            return
        ldr = self.rng.choice(leaders)
        m = ldr.engine.membership
        voters, learners = set(m.voters), set(m.learners)
        spares = [i for i in self.nodes if i not in m.members]
        choices = []
        if spares:
            choices.append("add-learner")
        if learners and len(voters) < 5:
            choices.append("promote")
        if len(voters) > 3:
            choices.append("remove")
        if learners and len(voters) >= 3:
            choices.append("replace")
        if not choices:
            return
        op = self.rng.choice(choices)
        if learners and self.faults.remove_learners \
                and self.rng.random() < self.faults.remove_learners:
            op = "remove-learner"
        if op == "remove-learner":
            learners.discard(self._to_remove(learners))
            self.stats["learners_removed"] += 1
        elif op == "add-learner":
            learners.add(self.rng.choice(spares))
        elif op == "promote":
            x = self.rng.choice(sorted(learners))
            learners.discard(x)
            voters.add(x)
        elif op == "remove":
            voters.discard(self._to_remove(voters))
        else:
            x = self.rng.choice(sorted(learners))
            learners.discard(x)
            voters.discard(self._to_remove(voters))
            voters.add(x)
        try:
            ldr.engine.propose_membership(frozenset(voters), frozenset(learners),
                                          {i: f"sim:{i}" for i in voters | learners})
        except FastRaftError:
            return  # a change is still in progress
        self.stats["reconfigurations"] += 1
        self._execute(ldr, ldr.engine.take_commands())

    def _to_remove(self, nodes: set[int]) -> int:
        """Any of ``nodes``, or (``Faults.remove_down`` of the time) one that is down."""
        if self.faults.remove_down:
            down = sorted(v for v in nodes if not self.nodes[v].alive)
            if down and self.rng.random() < self.faults.remove_down:
                self.stats["removed_down"] += 1
                return self.rng.choice(down)
        return self.rng.choice(sorted(nodes))

    def _crash(self, node: SimNode, clean: bool = False) -> None:
        if node.engine.role == Role.LEADER and (clean or self.faults.graceful_stop and
                                                self.rng.random() < self.faults.graceful_stop):
            farewell = node.engine.resign()
            for to, message in farewell:
                self._transmit(node.id, to, message)
            self.stats["graceful_stops"] += bool(farewell)
        node.alive = False
        if node.fsyncs and self.rng.random() < self.faults.torn_crash:
            # Written, not yet synced: what reaches the disk is a prefix of the writes.
            writes = [w for batch in node.fsyncs for w in write_order(batch[0])[0]]
            for w in writes[:self.rng.randint(0, len(writes))]:
                node.disk.write(w)
            self.stats["torn_crashes"] += 1
        node.disk.crash()
        if self.faults.damage and type(node.disk) is Disk and \
                self.rng.random() < self.faults.damage and self._may_damage(node):
            self._damage(node)
        node.fsyncs = []  # unsynced writes and the replies waiting on them are lost
        for t in node.timer_tokens:
            node.timer_tokens[t] += 1
        self.stats["crashes"] += 1

    def _take_down(self, node: SimNode, clean: bool = False) -> None:
        """Crash ``node`` (or stop it cleanly) and restart it ``down_for`` later."""
        self._crash(node, clean)
        self._schedule(self.faults.down_for, "restart", node.id)

    def _still_repairing(self) -> set[int]:
        """The nodes damaged and not yet durably out of recovery (a crash before that
        is durable brings one back recovering)."""
        nodes = self.nodes
        self._repairing = {i for i in self._repairing
                           if nodes[i].disk.store.hard_state.recovering}
        return self._repairing

    def _may_damage(self, node: SimNode) -> bool:
        """As docs/storage.md asks of an operator: one node at a time, and only while
        every node that has a configuration holds the same one, and no change is under
        way. (During a change, or with a voter behind one, a recovering voter, which
        counts for no election, can leave no one able to win one.)"""
        if self._still_repairing() - {node.id}:
            return False
        held = [n.engine.membership for n in self.nodes.values() if n.engine.membership.members]
        return all(m == held[0] and not m.joint for m in held)

    def _damage(self, node: SimNode) -> None:
        """What a repair leaves of a damaged log: ``FileStorage``'s keeps the term and
        vote (``_mark_recovering``); a ``SharedWAL``'s, half of the time here, may have
        dropped them with the log, and starts the node past its term ceiling, which is
        at least the term it had, with no vote (``WalGroup._start_past``)."""
        store = node.disk.store
        st = store.load_state()
        held = st.last_index
        if st.last_index >= st.first_index:
            cut = self.rng.randint(st.first_index, st.last_index)
            store.truncate_suffix(cut)
            held = cut - 1
        hs = st.hard_state
        term, vote = hs.current_term, hs.voted_for
        if self.rng.random() < 0.5:
            term, vote = term + self.rng.choice((0, 1, 1000)) + 1, None
            self.stats["ceiling_repairs"] += 1
        store.save_hard_state(HardState(term, vote, min(hs.commit, held), True))
        self._repairing.add(node.id)
        self.stats["repairs"] += 1

    def _timeout_now_sent(self, frm: int) -> None:
        if self.nodes[frm].engine.role != Role.LEADER:
            self.stats["declines"] += 1  # a leaving follower's answer to a transfer
        elif self.faults.deafen_on_handover and self._faults_on and \
                self.rng.random() < self.faults.deafen_on_handover:
            cut = self._partition = {i: int(i == frm) for i in self.nodes}
            self._one_way = True  # side 1 (the leader) is heard, hears nobody
            self.stats["deafened"] += 1
            self._schedule(self.faults.partition_for, "unflap", cut)

    def fate(self, rng: random.Random, frm: int, to: int) -> tuple[float, ...]:
        """The delays after which a message from ``frm`` reaches ``to``: none if it is
        lost, two if it is duplicated."""
        f = self.faults
        if self._faults_on:
            if rng.random() < f.drop or not self._connected(frm, to):
                return ()
            if rng.random() < f.duplicate:
                return (rng.uniform(f.min_delay, f.max_delay),
                        rng.uniform(f.min_delay, f.max_delay))
        return (rng.uniform(f.min_delay, f.max_delay),)

    def _connected(self, a: int, b: int) -> bool:
        p = self._partition
        return p is None or p[a] == p[b] or (self._one_way and p[a] == 1) or \
            p[a] == BRIDGE or p[b] == BRIDGE

    def _ev_partition(self) -> None:
        if not self._faults_on:
            return
        self._partition = random_partition(self.rng, list(self.nodes))
        self._one_way = self.rng.random() < self.faults.one_way
        self.stats["one_way_partitions"] += self._one_way
        if self.faults.learner_side and self.rng.random() < self.faults.learner_side and \
                self._learner_side_partition():
            self.stats["learner_sides"] += 1
        if self.faults.bridge and len(self.nodes) > 2 and self.rng.random() < self.faults.bridge:
            bounced = self.faults.bounce and self.rng.random() < self.faults.bounce and \
                self._bounce_partition()
            if not bounced:
                sides = self._partition
                bridge = self.rng.choice([i for i in sides
                                          if sum(s == sides[i] for s in sides.values()) > 1])
                sides[bridge] = BRIDGE
            self.stats["bridges"] += 1
        self._schedule(self.faults.partition_for, "unpartition")

    def _latest_leader(self) -> SimNode | None:
        """The live leader of the latest term, if a node leads."""
        leaders = [n for n in self.nodes.values() if n.alive and n.engine.role == Role.LEADER]
        return max(leaders, key=lambda n: n.engine.term) if leaders else None

    def _learner_side_partition(self) -> bool:
        """Put the leader and its learners on one side with as many voters as leaves the
        other side a majority of the voters (``Faults.learner_side``). False if no node
        leads or it has no learners."""
        leader = self._latest_leader()
        if leader is None:
            return False
        m = leader.engine.membership
        if not m.learners or len(m.voters) < 3:
            return False
        voters = sorted(m.voters - {leader.id})
        self.rng.shuffle(voters)
        near = voters[:(len(m.voters) + 1) // 2 - 2]  # the far side keeps a majority
        self._split([leader.id, *near, *m.learners])
        return True

    def _split(self, near: list[int]) -> dict[int, int]:
        """Put in force a two-way partition (the far side must not hear the near one):
        ``near`` on side 0, every other node on side 1. Returns it."""
        self._one_way = False
        cut = self._partition = {i: 1 for i in self.nodes}
        for i in near:
            cut[i] = 0
        return cut

    def election_timers_due(self, node_ids: set[int]) -> list[float]:
        """When the armed election timers of ``node_ids`` run out (read from the event
        queue: a timer armed anew has a new token, the old event fires for nothing)."""
        armed = {(i, Timer.ELECTION, self.nodes[i].timer_tokens[Timer.ELECTION])
                 for i in node_ids}
        return [at for at, _, kind, args in self._events if kind == "timer" and args in armed]

    def _bounce_partition(self) -> bool:
        """Cut the leader off from the far side but for the bridge, and bounce the bridge
        just before the far side's first election timer runs out (``Faults.bounce``).
        False if no node leads or no far node's timer runs."""
        leader = self._latest_leader()
        if leader is None:
            return False
        voters = sorted(leader.engine.membership.voters - {leader.id})
        if len(voters) < 2:
            return False  # no far side: nobody to campaign
        self.rng.shuffle(voters)
        # the far side and the bridge together are a majority, so are the leader's side
        # and the bridge: the lease the bridge's answers kept, the election its vote wins
        far, bridge, near = voters[:len(voters) // 2], voters[-1], voters[len(voters) // 2:-1]
        due = self.election_timers_due({i for i in far if self.nodes[i].alive})
        if not due:
            return False
        cut = self._split(near + [leader.id])
        cut[bridge] = BRIDGE
        lead = self.rng.uniform(0.001, BOUNCE_LEAD)
        self._schedule(max(min(due) - self.now - lead, 0.0), "bounce", bridge, cut, lead)
        return True

    def _ev_bounce(self, node_id: int, cut: dict[int, int], lead: float) -> None:
        node = self.nodes[node_id]
        if not self._faults_on or not node.alive or self._partition is not cut:
            return
        self._crash(node)
        self.stats["bounces"] += 1
        cut[node_id] = 1  # it comes back on the far side only: no link to the leader yet
        self._schedule(self.rng.uniform(0.0, lead), "restart", node.id)

    def _maybe_flap(self, node: SimNode, term: int, within: float) -> None:
        if self.rng.random() < self.faults.flap_leader:
            self._schedule(self.rng.uniform(0, within), "flap", node.id, term)

    def _ev_flap(self, node_id: int, term: int) -> None:
        node = self.nodes[node_id]
        if not self._faults_on or not node.alive or node.engine.term != term:
            return
        self.stats["flaps"] += 1
        cut = self._partition = {i: int(i == node_id) for i in self.nodes}
        self._one_way = False
        self._schedule(self.faults.partition_for, "unflap", cut)
        if self.rng.random() < 0.5:
            self._take_down(node)

    def _losing_at(self, node: SimNode, commands: list[Any]) -> bool:
        """Whether ``node`` is lost as it flushes ``commands``: a batch in which it appends
        a C_new and sends it to a node it removes."""
        appended = [e.index for c in commands if type(c) is AppendLog for e in c.entries
                    if e.kind == EntryKind.CONFIG and not decode_membership(e.data).joint]
        return bool(appended) and any(_c_new_sent(c) == (appended[-1], True)
                                      for c in commands) \
            and self.rng.random() < self.faults.lose_at_change

    def _lose(self, node: SimNode, commands: list[Any]) -> None:
        """Crash ``node`` for good as it flushes ``commands`` (``Faults.lose_at_change``):
        each of their sends of C_new leaves or not, at random; nothing else does."""
        for c in commands:
            if _c_new_sent(c)[0] and self.rng.random() < 0.5:
                self._transmit(node.id, c.to, c.message)
        self._lost = node.id
        self.stats["lost"] += 1
        self._crash(node)

    def _ev_unflap(self, cut: dict[int, int]) -> None:
        if self._partition is cut:  # not replaced by another partition meanwhile
            self._partition = None

    def _ev_unpartition(self) -> None:
        self._partition = None
        if self._faults_on:
            self._schedule(self._exp(self.faults.partition_every), "partition")

    def _ev_crash(self) -> None:
        if not self._faults_on:
            return
        alive = [n for n in self.nodes.values() if n.alive]
        writing = [n for n in alive if n.fsyncs]
        if writing and self.rng.random() < self.faults.torn_crash:
            alive = writing
        if alive:
            self._take_down(self.rng.choice(alive))
        self._schedule(self._exp(self.faults.crash_every), "crash")

    def _ev_transfer(self) -> None:
        self._schedule(self._exp(self.faults.transfer_every), "transfer")
        if not self._faults_on:
            return
        alive = [n for n in self.nodes.values() if n.alive]
        leader = self._latest_leader()
        target: int | None = None
        if alive and self.rng.random() < self.faults.leaving:
            node = self.rng.choice(alive)
            if not node.engine.leaving:
                node.engine.leaving = True
                self.stats["leaving"] += 1
                self._schedule(self.rng.uniform(0.0, 0.2), "stop", node.id, node.boots)
            if node is leader:
                target = node.engine.successor()
            elif self.rng.random() < 0.5:
                target = node.id  # a host's balancer handing it a group back: declined
        elif leader is not None:
            others = sorted(leader.engine.membership.voters - {leader.id})
            target = self.rng.choice(others) if others else None
        if leader is None or target is None:
            return
        try:
            leader.engine.transfer_leadership(target)
        except FastRaftError:
            return  # not a voter of the configuration in force (a change under way)
        self.stats["transfers"] += 1
        self._execute(leader, leader.engine.take_commands())

    def _ev_stop(self, node_id: int, boots: int) -> None:
        """The planned stop of a node that stepped down (``leaving``), unless it crashed
        and restarted since, or the run is healing."""
        node = self.nodes[node_id]
        if node.alive and node.boots == boots and self._faults_on:
            self._take_down(node, clean=True)

    def _ev_skew(self) -> None:
        self._schedule(self._exp(self.faults.skew_every), "skew")
        if not self._faults_on:
            return
        drift = self.faults.clock_drift
        for n in self.nodes.values():
            leads = n.alive and n.engine.role == Role.LEADER
            rate = 1.0 - drift if leads else 1.0 + drift
            # the clock keeps its reading, it only runs at another rate from now on
            n.clock_offset += (n.clock_rate - rate) * self.now
            n.clock_rate = rate
        self.stats["skews"] += 1

    def _ev_restart(self, node_id: int) -> None:
        node = self.nodes[node_id]
        if not node.alive and node_id != self._lost:
            self._boot(node)
