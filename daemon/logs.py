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
from datetime import UTC, datetime

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


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        record.message = _safe(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # type: ignore[no-untyped-def]  # noqa: N802
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
    handler.addFilter(_LibraryTracebacks(keep=level == "DEBUG"))
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
