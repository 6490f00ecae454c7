"""Tools for testing fastraft and the state machines built on it."""
from fastraft.testing.cluster import LocalCluster, wait_until
from fastraft.testing.simulator import NO_FAULTS, Faults, InvariantViolation, Simulator

__all__ = ["Simulator", "Faults", "NO_FAULTS", "InvariantViolation", "LocalCluster",
           "wait_until"]
