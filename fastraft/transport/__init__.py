"""Built-in networks: ``TcpNetwork`` for real clusters, ``MemoryNetwork`` in one process."""
from fastraft.transport.memory import MemoryHub, MemoryNetwork
from fastraft.transport.tcp import TcpNetwork

__all__ = ["MemoryHub", "MemoryNetwork", "TcpNetwork"]
