"""Text from peers and from DICOM libraries, made safe to log and to store.

Two dangers: a peer-supplied string with a raw newline forges a second log
line, and an exception text from pydicom or highdicom quotes the value it
choked on, which may be a patient's name, ID or birth date.
"""

from __future__ import annotations

import re

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# A quoted run of text, as Python's repr and the libraries' messages write it.
_QUOTED = re.compile(r"""'([^'\\]{0,2000}(?:\\.[^'\\]*)*)'|"([^"\\]{0,2000}(?:\\.[^"\\]*)*)\"""")
# Quoted things that are safe to keep: UIDs and numbers, VR codes, tags;
# absolute file paths of word characters (a traceback's "File ..." lines: our
# spool paths are UIDs, and a caret, as in a DICOM person name, is not a word
# character); APScheduler's job names ("seal (trigger: interval[...], ...)").
_SAFE = re.compile(
    r"^(?:[0-9.]{1,64}|[A-Z]{2}|\([0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\)|"
    r"/[\w.+-]+(?:/[\w.+-]+)*/?|"
    r"[a-z][\w.-]{0,63} \(trigger: [\w\[\]:., +-]{0,160}\)|)$"
)
REDACTED = "<value>"


def printable(value: object, limit: int | None = 200) -> str:
    """`value` as one line: control and other non-printable characters escaped.

    A calling AE title is whatever the peer put in its request; with a raw
    newline in it a peer could forge a second log line.
    """
    text = str(value) if limit is None else str(value)[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")


def scrub_values(text: str) -> str:
    """`text` with every quoted value replaced by <value>, except UIDs, numbers, VRs, tags.

    For exception texts from DICOM libraries before they are logged or
    stored: "Unable to convert '1923-04-19' to 'DA' object" keeps 'DA' and
    loses the birth date.
    """

    def keep_or_redact(m: re.Match[str]) -> str:
        inner = m.group(1) if m.group(1) is not None else m.group(2)
        return m.group(0) if _SAFE.match(inner) else f"'{REDACTED}'"

    return _QUOTED.sub(keep_or_redact, text)


def safe_error(exc: BaseException) -> str:
    """An exception as "Type: message", its quoted values scrubbed and on one line."""
    return printable(f"{type(exc).__name__}: {scrub_values(str(exc))}", limit=2000)
