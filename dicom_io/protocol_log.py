"""Whether pynetdicom narrates each PDU and DIMSE message it handles.

pynetdicom binds four "standard" logging handlers to every association. They
run for every PDU and message whatever the log level, under the AE-wide lock
that all associations share, and the one for a C-STORE request copies the
whole dataset to see whether it is empty. Their output goes to the
`pynetdicom` logger, which daemon/logs.py keeps at WARNING (at INFO when we
debug). So they are bound only when debugging.
"""

from __future__ import annotations

from pynetdicom import _config


def narrate(enabled: bool) -> None:
    """Bind pynetdicom's standard handlers to associations made from now on, or not."""
    _config.LOG_HANDLER_LEVEL = "standard" if enabled else "none"
