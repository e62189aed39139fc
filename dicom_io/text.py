"""Text from peers and from DICOM libraries, made safe to log and to store.

Two dangers: a peer-supplied string with a raw newline forges a second log
line, and an exception text from pydicom or highdicom quotes the value it
choked on, which may be a patient's name, ID or birth date.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

# A quoted run of text, as Python's repr and the libraries' messages write it.
_QUOTED = re.compile(r"""'([^'\\]{0,2000}(?:\\.[^'\\]*)*)'|"([^"\\]{0,2000}(?:\\.[^"\\]*)*)\"""")
# Quoted things that are safe to keep: UIDs and numbers, VR codes, tags.
_SAFE = re.compile(r"^(?:[0-9.]{1,64}|[A-Z]{2}|\([0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\)|)$")
# Also kept: Python source files under the interpreter's or our own folders
# (a traceback's "File ..." lines; any other path may name a patient's
# folder), and the job names our scheduler registered (`allow_job_name`), as
# APScheduler quotes them: 'seal-audit (trigger: interval[0:00:05], ...)'.
_CODE_ROOTS = tuple(
    {str(Path(p).resolve()) + "/" for p in (sys.prefix, sys.base_prefix, Path(__file__).parents[1])}
)
_CODE_PATH = re.compile(r"^/[\w./+-]+\.py$")
_JOB = re.compile(r"^([\w.-]{1,64}) \(trigger: [\w\[\]:., +-]{0,160}\)$")
_JOB_NAMES: set[str] = set()


def allow_job_name(name: str) -> None:
    """A scheduled job's name, ours: kept readable when a library quotes it."""
    _JOB_NAMES.add(name)


def _safe(inner: str) -> bool:
    if _SAFE.match(inner):
        return True
    if _CODE_PATH.match(inner):
        return inner.startswith(_CODE_ROOTS)
    job = _JOB.match(inner)
    return job is not None and job.group(1) in _JOB_NAMES


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
        return m.group(0) if _safe(inner) else f"'{REDACTED}'"

    return _QUOTED.sub(keep_or_redact, text)


def safe_error(exc: BaseException) -> str:
    """An exception as "Type: message", its quoted values scrubbed and on one line."""
    return printable(f"{type(exc).__name__}: {scrub_values(str(exc))}", limit=2000)
