"""Tools for testing fastraft and the state machines built on it."""
from fastraft.testing.cluster import LocalCluster, wait_until
from fastraft.testing.faults import NO_FAULTS, Faults
from fastraft.testing.simulator import InvariantViolation, Simulator

__all__ = ["Simulator", "Faults", "NO_FAULTS", "InvariantViolation", "LocalCluster",
           "wait_until"]
