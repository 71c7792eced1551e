"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

With ``Type=notify`` systemd waits for READY=1 before it calls the unit
started, and shows STATUS= in ``systemctl status``.
"""

import os
import socket


def notify(message):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        # An abstract socket: the leading @ stands for a NUL byte.
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), path)
        except OSError:
            return False
    return True
