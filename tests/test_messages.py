"""Wire messages round-trip through msgspec as one tagged union."""
import msgspec
import pytest

from fastraft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    Entry,
    HardState,
    InstallSnapshot,
    InstallSnapshotResponse,
    Membership,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
    TimeoutNow,
    decode_membership,
    encode_membership,
)

MEMBERSHIP = Membership(voters=frozenset({1, 2, 3}), learners=frozenset({4}),
                        outgoing=frozenset({1, 2}), addresses={1: "127.0.0.1:7001"})

SAMPLES = [
    RequestVote(3, 1, 10, 2, True),
    RequestVoteResponse(3, True, False),
    AppendEntries(3, 1, 9, 2, [Entry(3, 10, 0, b"x"), Entry(3, 11, 2, b"")], 8, 5),
    AppendEntriesResponse(3, False, 9, 4, 2, 5),
    InstallSnapshot(3, 1, SnapshotMeta(100, 2, MEMBERSHIP), 0, b"chunk", False),
    InstallSnapshotResponse(3, 100, 5, True),
    RequestVote(3, 1, 10, 2, False, True),
    TimeoutNow(3, 1),
    ReadIndexRequest(3, 77),
    ReadIndexResponse(3, 77, 12, True),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_the_union(msg):
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(Message)
    assert dec.decode(enc.encode(msg)) == msg


def test_tags_are_unique():
    tags = {type(m): type(m).__struct_config__.tag for m in SAMPLES}
    assert len(set(tags.values())) == len(tags)


def test_membership_helpers():
    assert decode_membership(encode_membership(MEMBERSHIP)) == MEMBERSHIP
    assert MEMBERSHIP.joint and MEMBERSHIP.members == {1, 2, 3, 4}
    assert MEMBERSHIP.is_voter(2) and not MEMBERSHIP.is_voter(4)
    assert HardState() == HardState(0, None, 0)


def test_wrong_type_is_a_validation_error():
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode([1, "x", 2]), type=Message)
