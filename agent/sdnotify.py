"""systemd readiness notification (``sd_notify``) for ``Type=notify`` units.

A datagram to the socket named by ``NOTIFY_SOCKET``; a no-op when the
process does not run under systemd.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.stdlib.get_logger(__name__)


def notify(state: str) -> bool:
    """Sends ``state`` (e.g. ``READY=1``) to systemd; True when sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        # An abstract socket: the name starts with a NUL byte.
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("systemd.notify_failed", state=state, error=str(exc))
        return False
    return True
