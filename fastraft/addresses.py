"""Address formats: ``HOST:PORT`` and cluster specs ``ID=HOST:PORT,...``."""
from __future__ import annotations

from fastraft.errors import ConfigError


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); an empty host is 127.0.0.1."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"address {address!r} is not HOST:PORT")
    if int(port) > 65535:
        raise ConfigError(f"address {address!r}: port {port} is out of range (0-65535)")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_addresses(spec: str) -> list[str]:
    """``HOST:PORT,HOST:PORT,...`` as a list, each checked as ``parse_address`` does."""
    addresses = [a.strip() for a in spec.split(",") if a.strip()]
    for address in addresses:
        parse_address(address)
    return addresses


def parse_cluster(spec: str, flag: str = "--cluster") -> dict[int, str]:
    """``1=127.0.0.1:7001,2=127.0.0.1:7002`` → {1: "127.0.0.1:7001", ...}; ``flag`` names
    the option it came from, in the messages."""
    members = {}
    for part in spec.split(","):
        node_id, sep, address = part.strip().partition("=")
        if not sep or not node_id.isdigit() or int(node_id) < 1 or ":" not in address:
            raise ConfigError(f"{flag}: bad member {part!r}: expected ID=HOST:PORT "
                              "with ID >= 1")
        parse_address(address)
        if int(node_id) in members:
            raise ConfigError(f"{flag}: node {int(node_id)} appears twice")
        members[int(node_id)] = address
    return members
