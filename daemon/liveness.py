"""A process's heartbeat: one row in process_heartbeats, renewed from a thread.

Beats go through their own short transactions; a failed beat (the database
away for a moment) is logged once and tried again at the next interval.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta

from daemon.config import Config
from db import liveness
from db.liveness import no_worker_alert
from db.models import utcnow
from db.session import Database

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self, db: Database, kind: str, seconds: float, alive: Callable[[], bool] = lambda: True
    ) -> None:
        """`alive` says whether the part this beat stands for still works: no beat while it
        does not (a worker thread whose models failed to load is not a live worker)."""
        self.db = db
        self.alive = alive
        self.kind = kind
        self.seconds = seconds
        self.host = socket.gethostname()
        self.name = f"{kind}@{self.host}:{os.getpid()}"
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def beat(self) -> None:
        if not self.alive():
            return
        try:
            with self.db.session() as s:
                liveness.beat(s, name=self.name, kind=self.kind, host=self.host,
                              pid=os.getpid(), started_at=self.started_at)  # fmt: skip
        except Exception as exc:
            if not self._failing:
                log.warning("%s: heartbeat not recorded (%s); trying again", self.name,
                            type(exc).__name__)  # fmt: skip
            self._failing = True
        else:
            self._failing = False

    def start(self) -> Heartbeat:
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.kind}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            self.beat()

    def stop(self) -> None:
        """A clean stop: the row says so, and this process no longer counts as alive."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.seconds + 5)
        try:
            with self.db.session() as s:
                liveness.stopped(s, self.name)
        except Exception as exc:
            log.warning("%s: stop not recorded (%s)", self.name, type(exc).__name__)


def gone_after(config: Config) -> timedelta:
    """A process that missed three beats counts as gone."""
    return timedelta(seconds=3 * config.worker.liveness_seconds)


def worker_alert(db: Database, config: Config) -> str | None:
    """Jobs queued past `worker.no_worker_alert_seconds` with no live worker, in words."""
    limit = gone_after(config)
    try:
        with db.session() as s:
            alert = no_worker_alert(
                s, limit=limit, alert_after=timedelta(seconds=config.worker.no_worker_alert_seconds)
            )
    except Exception:
        return None
    if alert is None:
        return None
    return (f"{alert.queued} job(s) queued, the oldest for {int(alert.waiting.total_seconds())} s,"
            " and no worker is running: start `secondreader worker`, or set "
            "worker.in_process = true for serve's own")  # fmt: skip

