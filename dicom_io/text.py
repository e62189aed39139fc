"""Peer-supplied text made safe to log."""

from __future__ import annotations

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: object, limit: int = 200) -> str:
    """`value` as one line: control and other non-printable characters escaped.

    A calling AE title is whatever the peer put in its request; with a raw
    newline in it a peer could forge a second log line.
    """
    text = str(value)[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
