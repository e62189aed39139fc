"""Logging to stdout (journald picks it up), plain or one JSON object per line.

Patient attributes are never passed to a logger at INFO or above anywhere in
the code base; we log UIDs and internal IDs. Two more lines of defence sit
in the formatters, for text that is not ours (exception messages of pydicom,
highdicom and pynetdicom, peer-supplied strings):

* every quoted value in a message or traceback is replaced by <value>, except
  UIDs, numbers, VR codes and tags (`dicom_io.text.scrub_values`): those
  libraries quote the value they choked on, a birth date or a name;
* control characters are escaped, so that a newline in a calling AE title
  cannot forge a log line;
* the libraries' own tracebacks are dropped below DEBUG: one line per event.

The JSON formatter never serialises `extra` fields it does not know.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

from dicom_io.guard import UnidentifiedPeerFilter
from dicom_io.protocol_log import narrate
from dicom_io.text import printable, scrub_values

_KNOWN_EXTRA = ("study_uid", "series_uid", "sop_uid", "job_id", "calling_ae")
_LIBRARIES = ("pynetdicom", "pydicom", "highdicom", "py.warnings")


def _safe(text: str) -> str:
    return printable(scrub_values(text), limit=None)


def _safe_exception(formatted: str) -> str:
    # One escaped line per traceback line: the lines stay, forged ones cannot.
    return "\n".join(_safe(line) for line in formatted.splitlines())


class _LibraryTracebacks(logging.Filter):
    """Drop the tracebacks third-party libraries attach to their own records."""

    def __init__(self, keep: bool) -> None:
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.keep and record.name.startswith(_LIBRARIES) and record.exc_info:
            record.exc_info = None
            record.exc_text = None
        return True


class _NoEmptyLines(logging.Filter):
    """A record whose message is empty says what it is instead, or is dropped.

    pynetdicom logs `LOGGER.exception(exc)` with the exception as the
    message; an exception without text (and its traceback dropped above)
    made an empty ERROR line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True  # logging reports its own formatting errors
        if text.strip():
            return True
        if record.exc_info and record.exc_info[1] is not None:
            record.msg, record.args = f"{type(record.exc_info[1]).__name__} (no message)", ()
            return True
        return False


class _Repeats(logging.Filter):
    """APScheduler's warnings, once per job and message a minute, with a count.

    A job still running at its next tick (the database locked, say) makes
    APScheduler warn at every tick: 120 lines a minute for the completer.
    """

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._lock = threading.Lock()
        # (message template, first argument) -> (when last let through, suppressed since)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("apscheduler") or record.levelno < logging.WARNING:
            return True
        first = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        # A job's text ends in its next run time, new at every tick: the name is the key.
        key = (str(record.msg), str(first).split(" (trigger:", 1)[0])
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 1000:  # forget the old ones, keep memory bounded
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
            last, suppressed = self._seen.get(key, (-self.interval, 0))
            if now - last < self.interval:
                self._seen[key] = (last, suppressed + 1)
                return False
            self._seen[key] = (now, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more like it in {self.interval:g} s)"
        return True


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        record.message = _safe(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging API)
        return _safe_exception(super().formatException(ei))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub_values(record.getMessage()),
        }
        for key in _KNOWN_EXTRA:
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exception"] = scrub_values(self.formatException(record.exc_info))
        return json.dumps(doc)


def setup_logging(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSONFormatter() if json_format else PlainFormatter())
    # Before the tracebacks go: an empty message is named by its exception.
    handler.addFilter(_NoEmptyLines())
    handler.addFilter(_LibraryTracebacks(keep=level == "DEBUG"))
    # pynetdicom's lines about a connection that never became an association:
    # folded into the guard's one line per address and interval.
    handler.addFilter(UnidentifiedPeerFilter())
    handler.addFilter(_Repeats())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pydicom reports invalid values through warnings: into the log (scrubbed).
    logging.captureWarnings(True)
    # pynetdicom logs every DIMSE message at INFO; at DEBUG it dumps datasets,
    # patient attributes included. Keep it at WARNING unless debugging.
    logging.getLogger("pynetdicom").setLevel("WARNING" if level != "DEBUG" else "INFO")
    # Nor let it format, for every message, the lines nobody reads.
    narrate(level == "DEBUG")
    logging.getLogger("apscheduler").setLevel("WARNING")
    logging.getLogger("alembic").setLevel("WARNING")
    # highdicom narrates every attribute it copies at INFO.
    logging.getLogger("highdicom").setLevel("WARNING")
