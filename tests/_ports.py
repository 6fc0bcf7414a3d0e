"""A free localhost TCP port for a process group's rendezvous (torchrun, spawned gloo ranks)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
