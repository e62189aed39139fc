"""Logging to stdout (journald picks it up), plain or one JSON object per line.

Patient attributes are never passed to a logger at INFO or above anywhere in
the code base; we log UIDs and internal IDs. As a second line of defence the
JSON formatter never serialises `extra` fields it does not know.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_KNOWN_EXTRA = ("study_uid", "series_uid", "sop_uid", "job_id", "calling_ae")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _KNOWN_EXTRA:
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if json_format:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every DIMSE message at INFO; at DEBUG it dumps datasets,
    # patient attributes included. Keep it at WARNING unless debugging.
    logging.getLogger("pynetdicom").setLevel("WARNING" if level != "DEBUG" else "INFO")
    logging.getLogger("apscheduler").setLevel("WARNING")
    logging.getLogger("alembic").setLevel("WARNING")
    # highdicom narrates every attribute it copies at INFO.
    logging.getLogger("highdicom").setLevel("WARNING")
