"""Checks of the ids and addresses a user passes in: what the wire cannot carry is refused
with ``InvalidArgument`` at the call, not by a peer later."""
from __future__ import annotations

from fastraft.errors import InvalidArgument
from fastraft.messages import MAX_ADDRESS_LENGTH, MAX_NODE_ID


def check_node_id(node_id: object) -> None:
    """Raise ``InvalidArgument`` unless ``node_id`` is an int the wire takes (not a bool)."""
    if not isinstance(node_id, int) or isinstance(node_id, bool) \
            or not 1 <= node_id <= MAX_NODE_ID:
        raise InvalidArgument(f"node ids are positive ints up to 2**63 - 1, got {node_id!r}")


def check_address(address: object) -> None:
    """Raise ``InvalidArgument`` unless ``address`` is a str the wire takes."""
    if not isinstance(address, str) or not 1 <= len(address) <= MAX_ADDRESS_LENGTH:
        raise InvalidArgument(f"addresses are non-empty strs of at most "
                              f"{MAX_ADDRESS_LENGTH} characters, got {address!r:.80}")


def check_timeout(timeout: object, name: str = "timeout") -> None:
    """Raise ``InvalidArgument`` unless ``timeout`` is a positive number of seconds (None
    is for the caller to take or refuse before)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 0 < timeout < float("inf"):
        raise InvalidArgument(f"{name} is a positive number of seconds, got {timeout!r:.80}")


def check_count(value: object, name: str) -> None:
    """Raise ``InvalidArgument`` unless ``value`` is an int of at least 1 (an index, an
    offset, a bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{name} is an int of at least 1, got {value!r:.80}")
