"""TCP_NODELAY on every DIMSE connection the node has: its associations are request/answer exchanges.

A C-STORE is a command PDU, then the data set's PDUs, then a small answer. With Nagle's algorithm on, the last
small segment of a message waits for the peer's acknowledgement, which the peer delays (40 ms on Linux) while
it waits for more: measured against Orthanc, 21 result objects took 1.8 s to deliver with Nagle on at both
ends, 1.2 s with it off on the node's side, 0.29 s with it off at both (0.18 s for DCMTK's storescu). A PACS
built on DCMTK turns it off when started with the environment variable TCP_NODELAY=1.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any


def no_delay(sock: socket.socket | None) -> None:
    """Turn Nagle's algorithm off on a connected TCP socket (anything else is left as it is)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # already closed by the peer: nothing to tune
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def no_delay_on_open(event: Any) -> None:
    """pynetdicom EVT_CONN_OPEN handler: the association's socket gets TCP_NODELAY."""
    association_socket = getattr(getattr(event.assoc, "dul", None), "socket", None)
    no_delay(getattr(association_socket, "socket", None))
