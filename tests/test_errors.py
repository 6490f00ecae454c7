"""``fastraft.errors``: an error keeps its type, message and attributes across a pickle
round trip, so it can cross a process boundary (a process pool, a queue between a
worker and its parent) as what it is."""
import inspect
import pickle

import pytest

from fastraft import errors

#: The errors whose constructor takes more than a message, with such arguments.
SPECIAL = [
    errors.NotLeader(2, "10.0.0.2:7000"),
    errors.NotLeader(None),
    errors.ProposalDropped("lost leadership; it was not committed", committed=False),
    errors.ProposalDropped("lost leadership; it was committed", committed=True),
    errors.BatchPartlyCommitted("a later leader committed entries 7..8", ["r7", "r8"]),
    errors.BatchRestUnknown("entries 7..8 were committed, the rest is unknown", ["r7", "r8"]),
    errors.NodeStopped("stopped before it appended the entry", committed=False),
    errors.NodeFailed("node 1 stopped: the state machine failed"),
]
PLAIN = [cls("what went wrong") for _, cls in inspect.getmembers(errors, inspect.isclass)
         if issubclass(cls, errors.FastRaftError)
         and cls not in {type(e) for e in SPECIAL}]


@pytest.mark.parametrize("error", SPECIAL + PLAIN, ids=lambda e: type(e).__name__)
def test_an_error_survives_a_pickle_round_trip(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
