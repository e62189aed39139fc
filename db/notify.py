"""Wake-ups across processes on PostgreSQL: NOTIFY when work is queued, LISTEN to wake.

In one process the stages wake each other directly (daemon/scheduler.py).
Across processes (`secondreader worker` beside `serve`) PostgreSQL carries
the wake-up: the transaction that queues a job (or records a run) also
NOTIFYs, delivered at its commit, and the other process LISTENs. On SQLite
there is no such channel; the short polls (worker.poll_seconds,
report.check_interval_seconds) carry it. The polls stay the safety net on
both: a lost notification only delays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

JOBS = "secondreader_jobs"  # a job was queued: workers look at once
RUNS = "secondreader_runs"  # a run was recorded: the report stage looks at once


def notify(session: Session, channel: str) -> None:
    """NOTIFY `channel` when this transaction commits (PostgreSQL; nothing on SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})


class Listener:
    """A thread that LISTENs on channels and calls their callback on each NOTIFY."""

    def __init__(self, url: str, callbacks: Mapping[str, Callable[[], None]]) -> None:
        parsed = make_url(url)
        self.enabled = parsed.get_backend_name() == "postgresql"
        self.conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        self.callbacks = dict(callbacks)
        self._stop = threading.Event()
        self.listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listen", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once LISTEN is in place (or after `timeout`)."""
        if self.enabled:
            self._thread.start()
            self.listening.wait(timeout)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True) as conn:
                    for channel in self.callbacks:
                        conn.execute(f"LISTEN {channel}")  # constants of this module
                    # What was queued before LISTEN took hold sent its NOTIFY to
                    # nobody: one wake-up each, so that it is looked at now.
                    for callback in self.callbacks.values():
                        callback()
                    self.listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            wake = self.callbacks.get(note.channel)
                            if wake is not None:
                                wake()
            except Exception as exc:
                # The database restarted or is unreachable: the polls carry on.
                log.warning("LISTEN connection lost (%s); again in 5 s", type(exc).__name__)
                self._stop.wait(5.0)
