"""Audit rows that must not wait for the database long: written at once, or later.

The receive path refuses an object or an association in milliseconds; its
audit row used to be written before the answer, so a locked database (or a
full disk) delayed the answer by SQLite's busy timeout and then lost the row
("could not audit a refused instance"). Here the row is written at once
within a short budget when nothing is waiting (the usual case: the row is in
before the answer goes out); otherwise it is queued, the answer goes out, and
one thread writes the queue in batches, retrying with a backoff while the
database is unavailable. A queued row keeps the time of its event
(`occurred_at`). Past `capacity` waiting rows, new ones are counted
instead, and the count is audited (`audit.dropped`) and logged once the
database is back. A crash loses what is still queued: those are refusals,
never an acknowledged instance, and the sender was told.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from db import audit
from db.audit import EventType
from db.models import utcnow
from db.session import Database, database_unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingEvent:
    event_type: str
    actor: str
    detail: dict[str, Any]
    sop_instance_uid: str | None = None
    occurred_at: datetime = field(default_factory=utcnow)


class AuditBacklog:
    def __init__(
        self,
        db: Database,
        capacity: int = 10_000,
        batch: int = 200,
        retry_seconds: tuple[float, float] = (0.5, 5.0),
    ) -> None:
        self.db = db
        self.capacity = capacity
        self.batch = batch
        self.retry_seconds = retry_seconds
        self._queue: queue.Queue[PendingEvent | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-backlog", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Rows queued and not yet written."""
        with self._lock:
            return self._waiting

    def record(
        self,
        event_type: str,
        actor: str,
        *,
        budget: float,
        sop_instance_uid: str | None = None,
        **detail: Any,
    ) -> None:
        """Write one row within `budget` seconds, else queue it; never raises."""
        if budget > 0 and self.waiting == 0:
            try:
                with self.db.write_session(time.monotonic() + budget) as s:
                    audit.record(s, event_type, actor, sop_instance_uid=sop_instance_uid, **detail)
                return
            except Exception as exc:
                log.debug("audit row deferred: %s", type(exc).__name__)
        self.put(event_type, actor, sop_instance_uid=sop_instance_uid, **detail)

    def put(
        self,
        event_type: str,
        actor: str,
        *,
        sop_instance_uid: str | None = None,
        **detail: Any,
    ) -> None:
        """Queue one row; never blocks, never raises."""
        with self._lock:
            if self._waiting >= self.capacity:
                self._dropped += 1
                return
            self._waiting += 1
        self._queue.put(PendingEvent(event_type, actor, detail, sop_instance_uid))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for at most `timeout`), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(1.0)
        left = self.waiting
        if left:
            log.error("%d audit event(s) not written at shutdown: database unavailable", left)

    def _run(self) -> None:
        batch: list[PendingEvent] = []
        closing = False
        failures = 0
        while not self._stop.is_set():
            if not batch:
                item = self._queue.get()
                if item is None:
                    return
                batch.append(item)
            while len(batch) < self.batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            if self._write(batch, failures):
                with self._lock:
                    self._waiting -= len(batch)
                batch = []
                failures = 0
                if closing and self._queue.empty():
                    return
                continue
            failures += 1
            low, high = self.retry_seconds
            if self._stop.wait(min(high, low * 2 ** min(failures, 6))):
                return

    def _write(self, batch: list[PendingEvent], failures: int) -> bool:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        try:
            with self.db.session() as s:
                for e in batch:
                    self._record(s, e)
                if dropped:
                    audit.record(
                        s,
                        EventType.AUDIT_DROPPED,
                        "receiver",
                        count=dropped,
                        reason=f"more than {self.capacity} audit events waited for the database",
                    )
        except Exception as exc:
            with self._lock:
                self._dropped += dropped
            if not database_unavailable(exc):
                # Not the database but a row (a value it refuses): write the
                # others one by one, so that one bad row holds back none.
                return self._one_by_one(batch, exc)
            if failures == 0:
                # One line per outage, not one per try.
                log.warning(
                    "audit deferred, database unavailable (%s): %d event(s) waiting",
                    type(exc).__name__,
                    self.waiting,
                )
            return False
        if failures:
            log.warning("audit written after the database came back: %d event(s)", len(batch))
        if dropped:
            log.error("%d audit event(s) could not be queued and are lost (counted)", dropped)
        return True

    @staticmethod
    def _record(s: Any, e: PendingEvent) -> None:
        # Its own time: the trail stays in the order things happened (study_story).
        audit.record(
            s, e.event_type, e.actor, sop_instance_uid=e.sop_instance_uid, at=e.occurred_at,
            **e.detail,
        )  # fmt: skip

    def _one_by_one(self, batch: list[PendingEvent], first: Exception) -> bool:
        """Write `batch` row by row, dropping the rows refused; `batch` keeps what is left."""
        lost = 0
        while batch:
            try:
                with self.db.session() as s:
                    self._record(s, batch[0])
            except Exception as exc:
                if database_unavailable(exc):
                    return False  # the database went: what is left waits
                lost += 1
            batch.pop(0)
            with self._lock:
                self._waiting -= 1
        if lost:
            log.error(
                "%d audit event(s) refused by the database and dropped (%s)",
                lost,
                type(first).__name__,
            )
        return True
