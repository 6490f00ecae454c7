"""``fastraft bench``: throughput and latency, side by side with PySyncObj and the ceiling.

Every cluster benchmark starts real processes on 127.0.0.1. Each process runs one node
(or one ``RaftHost``); the node that becomes leader generates the load in its own process
(as the issue specifies), prints one JSON line with the result and exits; the orchestrator
then stops every process it started, by pid. Each figure is the median of ``--repeat``
runs, with the spread reported. Nothing here is a test: tests check behaviour, this
measures.

- ``load``: the load generator and its latency histogram, run inside a node's process;
- ``nodes``: what a benchmark process runs (``python -m fastraft.benchmark bench-node``,
  ``bench-host``), and ``peer``: a PySyncObj node under the same load;
- ``clusters``: starting those processes and merging what they report;
- ``ceiling``: a raw uvloop pump, the most that loopback and fsync allow;
- ``report``: the ``fastraft bench`` command, its table, JSON and plot.
"""
from fastraft.benchmark.report import main

__all__ = ["main"]
