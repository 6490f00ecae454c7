"""Checks of the ids and addresses a user passes in: what the wire cannot carry is refused
with ``InvalidArgument`` at the call, not by a peer later."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastraft.config import ENTRY_ENVELOPE_BYTES, Config
from fastraft.errors import EntryTooLarge, InvalidArgument
from fastraft.messages import MAX_ADDRESS_LENGTH, check_node_id
from fastraft.network import RaftNetwork
from fastraft.statemachine import StateMachine
from fastraft.storage import RaftStorage


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


def check_members(node_id: int, members: object) -> dict[int, str]:
    """``members`` (node id -> address, this node among them) as a dict, or
    ``InvalidArgument``."""
    if not isinstance(members, Mapping) or node_id not in members:
        raise InvalidArgument(f"members must include this node ({node_id}) and map node "
                              f"ids to addresses, got {members!r:.120}")
    for member, address in members.items():
        check_node_id(member)
        check_address(address)
    return dict(members)


def _methods(protocol: type) -> list[str]:
    return sorted(name for name, value in vars(protocol).items()
                  if callable(value) and not name.startswith("_"))


#: The hooks a node is built on: argument name, what it must be, the methods it must have.
_HOOKS = [("storage", "a RaftStorage", _methods(RaftStorage)),
          ("network", "a RaftNetwork", _methods(RaftNetwork)),
          ("state_machine", "a StateMachine", _methods(StateMachine))]


def check_hooks(config: object = None, **hooks: Any) -> None:
    """Raise ``InvalidArgument`` naming the first of ``hooks`` (storage, network,
    state_machine) that lacks a method of its protocol, or a ``config`` that is not a
    ``Config``: at the call, not as an ``AttributeError`` from deep inside a start."""
    for name, what, methods in _HOOKS:
        if name in hooks:
            missing = [m for m in methods if not callable(getattr(hooks[name], m, None))]
            if missing:
                raise InvalidArgument(f"{name} must be {what}: {type(hooks[name]).__name__} "
                                      f"has no {', '.join(missing)}")
    if config is not None and not isinstance(config, Config):
        raise InvalidArgument(f"config must be a fastraft.Config, got {type(config).__name__}")


def payload(data: object, limit: int, config_limit: int, position: int | None = None) -> bytes:
    """``data`` as an entry's payload: bytes of its own (a bytearray or memoryview is
    copied, as its owner may change it before the entry is sent) of at most ``limit``
    bytes (``Config.max_entry_bytes``, ``config_limit``, or less for the network's
    frames), or ``InvalidArgument`` / ``EntryTooLarge``. ``position``: its place in a
    batch, for the message."""
    where = "" if position is None else f"entry {position} of the batch: "
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{where}an entry's data is bytes (or a bytearray or "
                              f"memoryview), not {type(data).__name__}")
    entry = bytes(data)
    if len(entry) > limit:
        bound = (f"Config.max_entry_bytes is {config_limit}" if limit == config_limit else
                 f"the network's max_frame_bytes is {limit + ENTRY_ENVELOPE_BYTES}, less "
                 f"{ENTRY_ENVELOPE_BYTES} for the message around the entry")
        raise EntryTooLarge(f"{where}an entry of {len(entry)} bytes is larger than the "
                            f"{limit} this node replicates ({bound}): split it, or raise "
                            "that limit on every node")
    return entry
