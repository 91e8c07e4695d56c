"""Ports handed to peers the tests start: free, outside the kernel's ephemeral range (so no
bind(0) or outgoing connection takes one between our pick and the peer's bind), never twice."""

from __future__ import annotations

import socket

from harness.localpacs import _ephemeral_low, free_port


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= p < _ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
    with socket.socket() as held:  # a port bound by someone else is never handed out
        held.bind(("127.0.0.1", 0))
        assert held.getsockname()[1] not in {free_port() for _ in range(50)}
