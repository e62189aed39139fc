"""Errors an administrator can fix: one line naming the cause and what to do, exit 2.

`secondreader` prints them without a traceback (`--debug` shows it).
"""

from __future__ import annotations

import errno
import socket


class UserError(Exception):
    """Anticipated: the message says what is wrong and what to do."""


class NotMigrated(UserError):
    """No database, or one without our schema: `secondreader db upgrade` first."""


class PortInUse(UserError):
    pass


def check_port_free(part: str, setting: str, host: str, port: int) -> None:
    """Raise PortInUse, naming the part and its setting, when `host:port` is taken.

    Checked before anything starts listening, so that a second daemon (or
    another program) on the port stops this one cleanly at start.
    """
    if port == 0:
        return  # any free port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(
                f"port {port} on {host or 'every address'} is in use: the {part} cannot listen "
                f"there; stop what holds it (`ss -ltnp 'sport = :{port}'`) or change {setting}"
            ) from None
