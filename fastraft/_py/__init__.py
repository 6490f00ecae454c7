"""Pure-Python kernels: the typed reference twin of ``fastraft._cy``.

Same names, signatures and results as the compiled module, bit for bit. Used when
``FASTRAFT_NO_EXTENSIONS`` is set or the extension is not built.
"""
from fastraft._py.codec import (
    count_within_bytes,
    decode_entries,
    encode_entries,
    entries_follow,
    first_unfit_payload,
    index_not_of_kind,
    index_of_kind,
    make_entries,
    payload_bytes,
    set_results,
)
from fastraft._py.logindex import LogIndex
from fastraft._py.quorum import (
    MAX_INDEX,
    VOTE_LOST,
    VOTE_PENDING,
    VOTE_WON,
    QuorumTracker,
    committed_index,
    joint_committed_index,
    joint_vote_result,
    vote_result,
)

__all__ = [
    "MAX_INDEX", "VOTE_LOST", "VOTE_PENDING", "VOTE_WON",
    "committed_index", "joint_committed_index", "vote_result", "joint_vote_result",
    "QuorumTracker",
    "LogIndex", "encode_entries", "decode_entries", "index_of_kind", "index_not_of_kind",
    "count_within_bytes", "entries_follow", "set_results", "make_entries", "payload_bytes",
    "first_unfit_payload",
]
