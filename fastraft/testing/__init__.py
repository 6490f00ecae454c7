"""Tools for testing fastraft and the state machines built on it."""
from fastraft.testing.simulator import NO_FAULTS, Faults, InvariantViolation, Simulator

__all__ = ["Simulator", "Faults", "NO_FAULTS", "InvariantViolation"]
