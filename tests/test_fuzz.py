"""A bounded, seeded slice of the fuzzing in CI (tests/fuzz_targets.py runs it long):
the frame splitter, the handshake, every message type, a multi-group frame's sections,
the entry codec in both kernel modes, and FileStorage and SharedWAL recovery raise
nothing but their documented errors."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz_targets import TARGETS, inputs

#: Inputs per target in CI (the storage targets open a directory per input: fewer).
SLICE = {"storage": 300, "shared_storage": 300}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeded_mutations(target):
    fn = TARGETS[target]
    for data in inputs(target, SLICE.get(target, 3000), seed=0):
        fn(data)


@pytest.mark.parametrize("target", sorted(set(TARGETS) - {"storage", "shared_storage"}))
@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes(target, data):
    TARGETS[target](data)
